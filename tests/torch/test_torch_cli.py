"""torch_rlhf.cli.run: training commands, export of (ZeRO-3, LoRA) checkpoints, eval, chat."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch
from rlhf_configs import family_models, merge, write_config
from safetensors.torch import load_file
from tiny_hf import LORA_MODULE_NAME

import torch_rlhf.deepspeed_config as ds_config_module
from torch_rlhf.checkpoint import export_checkpoint
from torch_rlhf.cli import chat, run
from torch_rlhf.models import build_causal_lm
from torch_rlhf.runtime import resolve_tokenizer

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]


def _args(**kwargs) -> argparse.Namespace:
    defaults = dict(config=None, resume=False, run_dir=None, actor=None, critic=None,
                    model=None, checkpoint=None, out=None, model_baseline=None,
                    model_finetune=None)
    return argparse.Namespace(**{**defaults, **kwargs})


def _same_weights(one, other) -> None:
    a, b = load_file(one / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("setting", ["zero3", "lora"])
def test_sft_command_and_export(setting, tmp_path, distributed, model_dirs, data_cache,
                                monkeypatch):
    overrides = merge(family_models(model_dirs("gpt2")), {"data": {"cache_dir": data_cache}})
    if setting == "zero3":
        monkeypatch.setattr(ds_config_module, "_PERSISTENCE_THRESHOLD", 0)
        overrides["engine"] = {"torch": {"zero_stage": 3}}
    else:
        overrides["sft"] = {"model": {"lora": {"dim": 4, "module_name": LORA_MODULE_NAME["gpt2"]}}}
    path, config = write_config(tmp_path, overrides)
    run_dir = tmp_path / "run"
    assert run("sft", config, _args(config=path, run_dir=run_dir)) == 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    (checkpoint,) = (run_dir / "sft" / "checkpoints").iterdir()
    assert checkpoint.name == "step-00000002"
    (written,) = export_checkpoint(checkpoint, tmp_path / "exported")
    _same_weights(written, run_dir / "sft" / "final")
    # The command takes a step directory too (its latest checkpoint).
    assert run("export", config, _args(checkpoint=run_dir / "sft", out=tmp_path / "e2")) == 0
    _same_weights(tmp_path / "e2", run_dir / "sft" / "final")
    for exported in (run_dir / "sft" / "final", tmp_path / "e2"):  # model cards, GPT-2's note
        card = (exported / "README.md").read_text()
        assert "backend `torch`" in card and "step: `sft`" in card and "position_ids" in card
    assert "checkpoint `step-00000002`" in (tmp_path / "e2" / "README.md").read_text()


def test_ppo_checkpoint_exports_actor_and_critic(tmp_path, distributed, model_dirs, data_cache):
    overrides = merge(family_models(model_dirs("llama_gqa_tied")),
                      {"data": {"cache_dir": data_cache}, "ppo": {"unsup_coef": 0.0}})
    path, config = write_config(tmp_path, overrides)
    run_dir = tmp_path / "run"
    assert run("ppo", config, _args(config=path, run_dir=run_dir)) == 0
    written = export_checkpoint(next((run_dir / "ppo" / "checkpoints").iterdir()),
                                tmp_path / "exported")
    assert [p.name for p in written] == ["actor", "critic"]
    _same_weights(tmp_path / "exported" / "actor", run_dir / "ppo" / "final")
    _same_weights(tmp_path / "exported" / "critic", run_dir / "ppo" / "critic")


def test_eval_and_chat(tmp_path, distributed, model_dirs, data_cache, capsys):
    overrides = merge(family_models(model_dirs("llama_gqa_untied")),
                      {"data": {"cache_dir": data_cache}})
    _, config = write_config(tmp_path, overrides)
    assert run("eval", config, _args(model=model_dirs("llama_gqa_untied"))) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed.splitlines()[-1])["heldout"]
    assert set(metrics) == {"arithmetic_accuracy", "arithmetic_accuracy_greedy"}
    assert "+" in printed.splitlines()[0] and "expected |" in printed.splitlines()[1]

    tokenizer = resolve_tokenizer(config)
    model = build_causal_lm(model_dirs("llama_gqa_untied")).eval()
    out = io.StringIO()
    assert chat(model, tokenizer, config, stdin=io.StringIO("1+2=\nclear\n3+4=\nquit\n5+5=\n"),
                stdout=out, stderr=io.StringIO()) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("chat:") and lines[4] == "(conversation cleared)"
    # banner, turn, answer, clear, cleared, turn, answer, quit; nothing after quit
    assert [lines[i] for i in (1, 3, 5, 7)] == ["you> 1+2=", "you> clear", "you> 3+4=",
                                                "you> quit"] and len(lines) == 8


def test_eval_detects_a_reward_model_and_compares_two_policies(tmp_path, distributed,
                                                                model_dirs, data_cache, capsys):
    """`rlhf eval`: a *ForSequenceClassification directory gets the rw_eval report (it was
    loaded as a causal LM and printed garbage); --model-baseline/--model-finetune the
    prompt_eval one. Untrained models: the figures are checked for shape, not value."""
    from tiny_hf import FAMILIES

    from torch_rlhf.models import build_value_model

    torch.manual_seed(0)
    reward_dir = tmp_path / "reward"
    build_value_model(config_dict=FAMILIES["llama_gqa_untied"]).model.save_pretrained(reward_dir)
    overrides = merge(family_models(model_dirs("llama_gqa_untied")),
                      {"data": {"cache_dir": data_cache}, "eval": {"max_prompts": 4}})
    _, config = write_config(tmp_path, overrides)
    capsys.readouterr()
    assert run("eval", config, _args(model=str(reward_dir))) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.splitlines()[-1])
    assert result["kind"] == "reward" and result["pairs"] == 4
    assert 0 <= result["pair_accuracy"] <= 1
    assert set(result["chosen"]) == {"mean", "std", "min", "max"}
    assert "pair accuracy" in printed

    policy = model_dirs("llama_gqa_untied")
    assert run("eval", config, _args(model_baseline=policy, model_finetune=policy)) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.splitlines()[-1])
    assert result["kind"] == "policy" and result["baseline"] == policy
    assert result["heldout"]["baseline"] == result["heldout"]["finetune"]  # same weights
    lines = printed.splitlines()
    assert "expected |" in lines[1] and "baseline |" in lines[2] and "finetune |" in lines[3]
    assert lines[2].split("|")[1] == lines[3].split("|")[1]


@pytest.mark.parametrize("command", ["parity", "bench"])
def test_parity_and_bench_are_not_backend_commands(command, tmp_path):
    # shared.cli runs them itself (parity_tests.run.main, bench.run.main)
    _, config = write_config(tmp_path)
    with pytest.raises(ValueError, match=f"rlhf {command}. compares or measures both"):
        run(command, config, _args())
