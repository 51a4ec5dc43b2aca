"""Checkpoints you can trust: every complete checkpoint carries a MANIFEST.json (backend,
config and its hash, library versions, size and sha256 of every file), and a resume refuses a
checkpoint of another backend or config, or one whose files changed, naming what differs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from shared.checkpoints import COMPLETE, MANIFEST, CheckpointDir
from shared.config import config_from_dict
from shared.data import DataReport, SFTBatch, StepData
from shared.manifest import (
    CorruptCheckpointError,
    ResumeMismatchError,
    config_diff,
    hash_file,
    library_versions,
    verify_manifest,
)
from shared.runlog import RunLogger
from shared.supervised_loop import SupervisedLoop


def _config(**sections):
    base = {"model": {"actor_model_name_or_path": "actor"},
            "sft": {"per_device_train_batch_size": 2, "max_steps": 3},
            "logging": {"progress_bar": False, "enable_tensorboard": False,
                        "save_interval": 2}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(base)


_IDS = np.arange(32, dtype=np.int32).reshape(8, 4) % 7 + 1
DATA = StepData("sft", train=SFTBatch(_IDS, np.ones_like(_IDS), np.ones_like(_IDS)),
                eval=None, report=DataReport())


class Backend:
    """Four weights moved by each batch; a checkpoint is two files in a sub-folder."""

    step = "sft"
    saves_in_background = False

    def __init__(self, name: str = "numpy"):
        self.backend = name
        self.w = np.zeros(4)

    def train_step(self, batch):
        self.w = 0.5 * self.w + 0.5 * batch.input_ids.mean(0)
        return {"loss": float(self.w.sum())}

    def eval_sums(self, batch, valid):
        return {}

    def save(self, path, loop_state):
        (path / "model").mkdir(parents=True)
        np.save(path / "model" / "w.npy", self.w)
        (path / "loop.json").write_text(json.dumps(loop_state))

    def wait_until_saved(self):
        pass

    def restore(self, path):
        self.w = np.load(path / "model" / "w.npy")
        return json.loads((path / "loop.json").read_text())

    def export(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer_config.json"):
            (directory / name).write_text("{}")

    def heldout_metrics(self):
        return {}


def _loop(config, run_dir: Path) -> SupervisedLoop:
    run_dir.mkdir(parents=True, exist_ok=True)
    return SupervisedLoop(config, "sft", data=DATA, run_dir=run_dir,
                          run_logger=RunLogger(run_dir, enable_tensorboard=False))


@pytest.fixture
def trained(tmp_path):
    """A finished run (checkpoints at steps 2 and 3) and its config."""
    config = _config()
    _loop(config, tmp_path).run(Backend())
    return config, tmp_path / "sft" / "checkpoints"


def test_every_checkpoint_records_its_manifest(trained):
    config, root = trained
    latest = CheckpointDir(root, keep=2).latest()
    assert latest.name == "step-00000003"
    manifest = json.loads((latest / MANIFEST).read_text())
    assert manifest["backend"] == "numpy" and manifest["format"] == 1
    assert manifest["config"]["sft"]["max_steps"] == 3
    assert set(manifest["files"]) == {"loop.json", "model/w.npy"}  # not COMPLETE, not itself
    size, digest = hash_file(latest / "model" / "w.npy")
    assert manifest["files"]["model/w.npy"] == {"size": size, "sha256": digest}
    assert {"python", "numpy", "transformers"} <= set(manifest["versions"])
    assert manifest["versions"]["numpy"] == np.__version__
    assert verify_manifest(latest, backend="numpy", config=config) == manifest


def test_resume_verifies_and_continues(trained, tmp_path):
    config, _ = trained
    loop = _loop(config, tmp_path)
    assert loop.resume(Backend()) and loop.global_step == 3


def test_a_flipped_byte_is_named(trained, tmp_path):
    config, root = trained
    file = root / "step-00000003" / "model" / "w.npy"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # the same size, another sha256
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"model/w\.npy is corrupt: sha256"):
        _loop(config, tmp_path).resume(Backend())


def test_a_truncated_or_missing_file_is_named(trained, tmp_path):
    config, root = trained
    checkpoint = root / "step-00000003"
    file = checkpoint / "loop.json"
    full = file.stat().st_size
    file.write_bytes(file.read_bytes()[:10])
    (checkpoint / "model" / "w.npy").unlink()
    with pytest.raises(CorruptCheckpointError) as err:
        _loop(config, tmp_path).resume(Backend())
    message = str(err.value)
    assert f"loop.json is truncated or overwritten: 10 bytes, expected {full}" in message
    assert "w.npy is missing" in message and str(checkpoint) in message


def test_another_backends_checkpoint_is_refused(trained, tmp_path):
    config, _ = trained
    with pytest.raises(ResumeMismatchError, match="written by the numpy backend and this run "
                                                  "uses jax.*--backend numpy"):
        _loop(config, tmp_path).resume(Backend("jax"))


def test_a_changed_config_is_refused_naming_the_keys(trained, tmp_path):
    config, _ = trained
    changed = _config(sft={"num_train_epochs": 5}).replace(seed=7)
    with pytest.raises(ResumeMismatchError) as err:
        _loop(changed, tmp_path).resume(Backend())
    message = str(err.value)
    assert f"seed: {config.seed!r} -> 7" in message
    assert f"sft.num_train_epochs: {config.sft.num_train_epochs!r} -> 5" in message


def test_config_diff_names_dotted_keys():
    old = {"a": 1, "b": {"c": [1, 2], "d": None}, "gone": 1}
    new = {"a": 1, "b": {"c": [1, 3], "d": "x"}, "new": 2}
    assert config_diff(old, new) == [("b.c", [1, 2], [1, 3]), ("b.d", None, "x"),
                                      ("gone", 1, "<absent>"), ("new", "<absent>", 2)]


def test_other_library_versions_only_warn(trained, tmp_path, caplog):
    config, root = trained
    manifest_file = root / "step-00000003" / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["versions"]["numpy"] = "0.0.1"
    manifest_file.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="shared.manifest"):
        assert _loop(config, tmp_path).resume(Backend())
    assert f"numpy 0.0.1 -> {np.__version__}" in caplog.text


def test_a_checkpoint_without_manifest_is_resumed_with_a_warning(trained, tmp_path, caplog):
    config, root = trained
    (root / "step-00000003" / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="shared.manifest"):
        assert _loop(config, tmp_path).resume(Backend())
    assert "has no MANIFEST.json" in caplog.text


def test_commit_writes_the_manifest_before_complete(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep=1)
    path = checkpoints.prepare(checkpoints.tag(1))
    path.mkdir()
    (path / "a.bin").write_bytes(b"x" * 3_000_000)  # more than one 1 MiB hashing chunk
    checkpoints.commit(path, backend="torch", config=_config())
    assert (path / COMPLETE).is_file()
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert files["a.bin"]["size"] == 3_000_000
    assert library_versions("torch").keys() >= {"torch", "deepspeed"}
    assert library_versions("jax").keys() >= {"jax", "flax", "optax", "orbax-checkpoint"}
