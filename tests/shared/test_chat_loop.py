"""`shared.chat`: the `rlhf chat` loop (with a fake model), and `rlhf chat` on both backends
with one tiny exported model."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import pytest

from shared import chat as chat_module
from shared.chat import PROMPT_MARKER, ChatOptions, chat_loop, chat_options
from shared.errors import InputError

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"
OPTIONS = ChatOptions(context_tokens=16, max_new_tokens=4, eos_id=2, eos_text="</s>")
"""The demo model's sizes: a window of 12 prompt tokens."""


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(DEMO / "tokenizer")


class FakeModel:
    """An `answer_fn` that records the prompt ids it gets and answers from a list."""

    def __init__(self, answers=("3", "7", "10", "11")):
        self.answers = list(answers)
        self.prompts: list[list[int]] = []

    def __call__(self, ids):
        self.prompts.append(list(ids))
        return self.answers[len(self.prompts) - 1]


def _chat(tokenizer, text, model=None, options=OPTIONS, **kwargs):
    model = model or FakeModel()
    out, err = io.StringIO(), io.StringIO()
    status = chat_loop(model, tokenizer, options, stdin=io.StringIO(text), stdout=out,
                       stderr=err, **kwargs)
    return status, model, out.getvalue(), err.getvalue()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def test_turns_carry_the_conversation_and_quit_ends_it(tokenizer):
    status, model, out, err = _chat(tokenizer, "1+2=\n3+4=\nquit\n5+5=\n")
    assert status == 0 and err == ""
    # The second prompt is the first turn, its answer ended by the eoc token, the second turn.
    assert model.prompts == [_ids(tokenizer, "1+2="), _ids(tokenizer, "1+2=3</s>3+4=")]
    lines = out.splitlines()
    assert lines[0].startswith("chat:")
    assert lines[1:] == [f"{PROMPT_MARKER}1+2=", "3", f"{PROMPT_MARKER}3+4=", "7",
                         f"{PROMPT_MARKER}quit"]  # nothing after quit


@pytest.mark.parametrize("ending", ["exit\n", "  quit  \n", ""], ids=["exit", "quit", "eof"])
def test_exit_quit_and_end_of_input_end_the_chat(tokenizer, ending):
    status, model, out, _ = _chat(tokenizer, "1+2=\n" + ending + "3+4=\n" * (ending != ""))
    assert status == 0 and len(model.prompts) == 1
    assert out.endswith(PROMPT_MARKER + (ending or "\n"))


def test_clear_starts_over(tokenizer):
    _, model, out, _ = _chat(tokenizer, "1+2=\nclear\n3+4=\n")
    assert model.prompts == [_ids(tokenizer, "1+2="), _ids(tokenizer, "3+4=")]
    assert "(conversation cleared)\n" in out


def test_empty_lines_are_ignored(tokenizer):
    _, model, out, _ = _chat(tokenizer, "\n   \n1+2=\n\n3+4=\n")
    assert model.prompts == [_ids(tokenizer, "1+2="), _ids(tokenizer, "1+2=3</s>3+4=")]
    assert out.splitlines()[-1] == PROMPT_MARKER  # re-prompted until the end of input


def test_history_is_cut_from_the_left_with_a_warning(tokenizer):
    # 12 prompt tokens fit: "12+34=" (6) + "46</s>" (3) + "5+6=" (4) is 13, one too many.
    model = FakeModel(["46", "11", "0"])
    _, model, _, err = _chat(tokenizer, "12+34=\n5+6=\n1+1=\n", model)
    full = _ids(tokenizer, "12+34=46</s>5+6=")
    assert len(full) == 13 and model.prompts[1] == full[1:]
    third = _ids(tokenizer, "12+34=46</s>5+6=11</s>1+1=")
    assert model.prompts[2] == third[-12:]
    warnings = err.splitlines()
    assert len(warnings) == 2  # once per turn that is cut, none for the first
    assert "dropped the first 1 tokens" in warnings[0]
    assert f"dropped the first {len(third) - 12} tokens" in warnings[1]
    assert all(len(p) <= OPTIONS.window for p in model.prompts)


def test_a_turn_longer_than_the_window_is_cut_with_the_warning(tokenizer):
    _, model, _, err = _chat(tokenizer, "12345678901234+1=\n")
    assert model.prompts == [_ids(tokenizer, "12345678901234+1=")[-12:]]
    assert "dropped the first 5 tokens" in err


class _Interrupting(io.StringIO):
    def readline(self, *args):
        raise KeyboardInterrupt


def test_ctrl_c_while_reading_ends_cleanly(tokenizer):
    out = io.StringIO()
    assert chat_loop(FakeModel(), tokenizer, OPTIONS, stdin=_Interrupting(), stdout=out,
                     stderr=io.StringIO()) == 0
    assert out.getvalue().endswith(PROMPT_MARKER + "\n")


def test_ctrl_c_while_generating_ends_cleanly(tokenizer):
    def answer(ids):
        raise KeyboardInterrupt

    status, _, out, _ = _chat(tokenizer, "1+2=\n3+4=\n", model=answer)
    assert status == 0 and out.endswith(f"{PROMPT_MARKER}1+2=\n\n")


class _RecordingOut(io.StringIO):
    """Text counts as shown only once flushed."""

    shown = ""

    def flush(self):
        self.shown = self.getvalue()


class _CheckingIn(io.StringIO):
    """Checks, before each read, that the prompt marker is the last thing shown."""

    def __init__(self, text, out):
        super().__init__(text)
        self.out = out
        self.reads = 0

    def readline(self, *args):
        assert self.out.shown.endswith(PROMPT_MARKER)
        self.reads += 1
        return super().readline(*args)


def test_the_marker_is_shown_before_each_read(tokenizer):
    out = _RecordingOut()
    stdin = _CheckingIn("1+2=\nclear\n\n3+4=\n", out)
    chat_loop(FakeModel(), tokenizer, OPTIONS, stdin=stdin, stdout=out, stderr=io.StringIO(),
              echo=False)
    assert stdin.reads == 5  # four lines and the end of input
    assert out.getvalue().count(PROMPT_MARKER) == 5 and "1+2=" not in out.getvalue()


def test_chat_options(tokenizer):
    config = types.SimpleNamespace(data=types.SimpleNamespace(
        end_of_conversation_token=None, max_prompt_seq_len=6, max_answer_seq_len=4))
    assert chat_options(config, tokenizer, 16) == OPTIONS
    assert chat_options(config, tokenizer, None).window == 6  # unknown context: the data's
    with pytest.raises(InputError, match="max_answer_seq_len"):
        chat_options(config, tokenizer, 4)


# -- `rlhf chat` on both backends --------------------------------------------------------------

@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """A tiny random Llama in the demo's shape (its context of 16 tokens), saved with the
    demo tokenizer as an exported model is."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    yaml = pytest.importorskip("yaml")
    demo = yaml.safe_load((DEMO.parent / "demo.yaml").read_text())["model"]["actor_config"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO / "tokenizer")
    config = transformers.LlamaConfig(**{**demo, "vocab_size": len(tokenizer)},
                                      initializer_range=0.5)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chat") / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _rlhf_chat(backend, model_dir, text, monkeypatch, capsys):
    """`rlhf chat --backend B --model DIR` on `text`; (stdout, stderr, prompt ids sent)."""
    from shared.cli import main

    sent = []

    def recording_loop(answer_fn, *args, **kwargs):
        return chat_loop(lambda ids: sent.append(list(ids)) or answer_fn(ids), *args, **kwargs)

    monkeypatch.setattr(chat_module, "chat_loop", recording_loop)
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    if backend == "torch":  # a world of one needs no process group for chat
        monkeypatch.setattr("torch_rlhf.deepspeed_config.init_distributed", lambda *a: None)
    capsys.readouterr()
    assert main(["chat", "--backend", backend, "--model", str(model_dir)]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err, sent


def test_rlhf_chat_is_multi_turn_and_the_same_on_both_backends(exported_model, tokenizer,
                                                               monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    text = "1+2=\n\n3+4=\n12+34=\nquit\n5+5=\n"
    runs = {b: _rlhf_chat(b, exported_model, text, monkeypatch, capsys)
            for b in ("torch", "jax")}
    out, err, sent = runs["torch"]
    assert runs["jax"][0] == out and runs["jax"][2] == sent  # same transcript, same prompts
    lines = out.splitlines()
    answers = [lines[i + 1] for i, line in enumerate(lines) if line.startswith(PROMPT_MARKER)
               and line[len(PROMPT_MARKER):] in ("1+2=", "3+4=", "12+34=")]
    assert len(answers) == 3 and lines[-1] == f"{PROMPT_MARKER}quit"  # 5+5= never read
    # The conversation is the prompt: each turn carries the previous ones and their answers.
    assert sent[0] == _ids(tokenizer, "1+2=")
    assert sent[1] == _ids(tokenizer, f"1+2={answers[0]}</s>3+4=")[-12:]
    assert len(sent) == 3 and all(len(p) <= 12 for p in sent)  # 16 positions less 4
    assert "dropped the first" in err and "dropped the first" in runs["jax"][1]
