"""Exports are read back after writing: a truncated safetensors file, a tensor the index
names but no file holds, or a NaN / infinite weight (float32 or bfloat16) is an ExportError
naming the file and the tensor, and the directory is moved aside so nothing takes it for a
final model. A final directory also carries a tokenizer that loads, a model card and (a causal
LM) a generation config."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from shared.config import config_from_dict
from shared.data import DataReport, SFTBatch, StepData
from shared.exports import ExportError, verify_export
from shared.model_card import GPT2_POSITION_NOTE, ExportCard, complete_export
from shared.runlog import RunLogger
from shared.supervised_loop import SupervisedLoop


def _bf16_file(path, name: str, bits: list[int]) -> None:
    """A safetensors file with one bfloat16 tensor of raw ``bits`` (numpy has no bf16)."""
    header = json.dumps({name: {"dtype": "BF16", "shape": [len(bits)],
                                "data_offsets": [0, 2 * len(bits)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header
                     + np.array(bits, np.uint16).tobytes())


def _model(directory, **overrides) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"embed.weight": np.ones((4, 3), np.float32),
               "head.bias": np.zeros(3, np.float16), "position_ids": np.arange(4)}
    save_file({**tensors, **overrides}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text("{}")


def test_a_finite_export_passes(tmp_path):
    _model(tmp_path / "final")
    _bf16_file(tmp_path / "final" / "extra.safetensors", "ema.weight", [0x3F80, 0xBF80, 0])
    assert verify_export(tmp_path / "final") == {"extra.safetensors": 1,
                                                 "model.safetensors": 3}


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_is_refused_and_moved_aside(tmp_path, value):
    weight = np.ones((4, 3), np.float32)
    weight[2, 1] = value
    _model(tmp_path / "final", **{"embed.weight": weight})
    with pytest.raises(ExportError, match=r"model\.safetensors: tensor embed\.weight \(F32 "
                                          r"\[4, 3\]\) has 1 NaN or infinite values"):
        verify_export(tmp_path / "final")
    assert not (tmp_path / "final").exists()
    assert (tmp_path / "final.rejected" / "model.safetensors").is_file()


@pytest.mark.parametrize("bits", [0x7FC0, 0x7F80, 0xFF80], ids=["nan", "inf", "-inf"])
def test_a_non_finite_bfloat16_weight_is_refused(tmp_path, bits):
    _model(tmp_path / "final")
    _bf16_file(tmp_path / "final" / "model-2.safetensors", "lm_head.weight", [0x3F80, bits])
    with pytest.raises(ExportError, match=r"tensor lm_head\.weight \(BF16 \[2\]\) has 1 NaN"):
        verify_export(tmp_path / "final", reject=False)
    assert (tmp_path / "final").is_dir()


def test_a_truncated_file_and_a_missing_shard_are_named(tmp_path):
    _model(tmp_path / "final")
    file = tmp_path / "final" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-5])
    index = {"weight_map": {"embed.weight": "model.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "final" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError) as err:
        verify_export(tmp_path / "final", reject=False)
    assert "model.safetensors is unreadable or truncated" in str(err.value)
    assert "model-00002-of-00002.safetensors is missing (the index maps lm_head.weight" in str(
        err.value)


class _NaNExport:
    """A backend whose final model comes out with a NaN weight."""

    step, backend, saves_in_background = "sft", "numpy", False

    def train_step(self, batch):
        return {"loss": 1.0}

    def eval_sums(self, batch, valid):
        return {}

    def save(self, path, loop_state):
        path.mkdir(parents=True)

    def wait_until_saved(self):
        pass

    def export(self, directory):
        _model(directory, **{"head.bias": np.array([0.0, np.nan, 0.0], np.float16)})

    def heldout_metrics(self):
        raise AssertionError("a rejected export is not evaluated")


def test_the_loop_never_leaves_a_non_finite_final_model(tmp_path):
    ids = np.ones((4, 4), np.int32)
    data = StepData("sft", train=SFTBatch(ids, ids, ids), eval=None, report=DataReport())
    config = config_from_dict({"model": {"actor_model_name_or_path": "x"},
                               "sft": {"per_device_train_batch_size": 2, "max_steps": 1},
                               "logging": {"progress_bar": False, "enable_tensorboard": False}})
    loop = SupervisedLoop(config, "sft", data=data, run_dir=tmp_path,
                          run_logger=RunLogger(tmp_path, enable_tensorboard=False))
    with pytest.raises(ExportError, match=r"tensor head\.bias"):
        loop.run(_NaNExport())
    assert not (tmp_path / "sft" / "final").exists()
    assert (tmp_path / "sft" / "final.rejected").is_dir()
    assert not (tmp_path / "summary.json").exists()  # the step is not recorded as done


# -- what a final directory carries besides its weights (shared.model_card) -----------------

CARD = ExportCard(backend="jax", step="ppo", role="final", run_dir="runs/a",
                  progress="iteration 2 of 2", base_model="`runs/a/sft/final`",
                  config_sha256="ab" * 32)


def _causal_lm(directory, model_type: str = "llama") -> None:
    _model(directory)
    architecture = "GPT2LMHeadModel" if model_type == "gpt2" else "LlamaForCausalLM"
    (directory / "config.json").write_text(json.dumps({
        "model_type": model_type, "architectures": [architecture], "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0}))


def test_complete_export_writes_generation_config_and_card(tmp_path):
    final = tmp_path / "final"
    _causal_lm(final)
    complete_export(final, CARD)
    generation = json.loads((final / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    card = (final / "README.md").read_text()
    for text in ("backend `jax`", "iteration 2 of 2", "`runs/a`", "`runs/a/sft/final`",
                 "ab" * 32, "parity between the backends: not measured"):
        assert text in card
    assert "position_ids" not in card  # the GPT-2 note only on GPT-2


def test_gpt2_card_says_how_to_score_left_padded_batches(tmp_path):
    _causal_lm(tmp_path / "final", model_type="gpt2")
    complete_export(tmp_path / "final", CARD)
    card = (tmp_path / "final" / "README.md").read_text()
    assert GPT2_POSITION_NOTE in card and "AutoModelForCausalLM" in card
    assert (tmp_path / "final" / "generation_config.json").is_file()  # GPT2LMHeadModel


def test_a_value_model_gets_no_generation_config(tmp_path):
    _model(tmp_path / "rm")
    (tmp_path / "rm" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}))
    complete_export(tmp_path / "rm", CARD)
    assert not (tmp_path / "rm" / "generation_config.json").exists()


def test_a_final_directory_must_carry_tokenizer_card_and_generation_config(tmp_path):
    _causal_lm(tmp_path / "final")
    with pytest.raises(ExportError, match=r"no tokenizer.*no model card.*no "
                                          r"generation_config\.json"):
        verify_export(tmp_path / "final", reject=False, complete=True)
    verify_export(tmp_path / "final", reject=False)  # what a non-final directory needs


def test_a_tokenizer_that_does_not_load_is_named(tmp_path):
    _model(tmp_path / "final")
    (tmp_path / "final" / "tokenizer.json").write_text('{"version": "1.0"')  # truncated
    with pytest.raises(ExportError, match=r"tokenizer\.json does not load"):
        verify_export(tmp_path / "final", reject=False)
