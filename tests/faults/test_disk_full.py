"""A full disk (a filesystem stub: the write raises ``OSError(ENOSPC)``) during a checkpoint
save, the final save and a metrics record, with ``rlhf pipeline`` in this process.

What must hold (shared/errors.py): the run fails with exit status 1 and one line naming the
file; the checkpoint being written is never marked complete; the previous complete
checkpoint still verifies (``CheckpointDir.verify``: its manifest, every file's sha256); once
space is back, ``--resume`` continues from it and ends as the uninterrupted run (metrics row
for row, final weights bit for bit).
"""

from __future__ import annotations

import errno
import io
import json
import os

import pytest
from fault_harness import assert_same_run, checkpoint_dirs, pipeline_argv
from inprocess import assert_one_line, rlhf_main

from shared.checkpoints import CheckpointDir
from shared.config import load_config

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


def _full_disk_in_checkpoint(monkeypatch, backend: str, step: str, nth: int) -> None:
    """The ``nth`` checkpoint of ``step`` meets a full disk part way: torch once the
    DeepSpeed engine states are written (at ``trainer_state.pt``); JAX when orbax's write
    fails (``DirectoryCheckpointer.save``)."""
    calls = {"n": 0}

    def due(path) -> bool:
        if f"/{step}/checkpoints/" not in os.fspath(path):
            return False
        calls["n"] += 1
        return calls["n"] == nth

    if backend == "torch":
        import torch

        original = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith("trainer_state.pt") \
                    and due(f):
                raise _enospc(f)
            return original(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:
        from jax_rlhf.checkpoint import DirectoryCheckpointer

        original = DirectoryCheckpointer.save

        def jax_save(self, path, *args, **kwargs):
            if due(path):
                raise _enospc(path)
            return original(self, path, *args, **kwargs)

        monkeypatch.setattr(DirectoryCheckpointer, "save", jax_save)


@pytest.mark.parametrize(("backend", "step"), [
    ("torch", "ppo"),
    pytest.param("torch", "sft", marks=pytest.mark.slow),
    pytest.param("jax", "ppo", marks=pytest.mark.slow),
    pytest.param("jax", "reward", marks=pytest.mark.slow),
])
def test_full_disk_during_a_checkpoint_save(backend, step, tiny_config, reference_run, tmp_path,
                                            monkeypatch, caplog):
    reference = reference_run(backend)
    run_dir = tmp_path / "run"
    tag = "iter-00000002" if step == "ppo" else "step-00000002"
    with monkeypatch.context() as patch:
        _full_disk_in_checkpoint(patch, backend, step, nth=2)
        outcome = rlhf_main(pipeline_argv(tiny_config, backend, run_dir), caplog)
    assert_one_line(outcome, 1, "no space left on device", f"{step}/checkpoints/{tag}")
    saves = checkpoint_dirs(run_dir, step)
    assert not any(complete for name, complete in saves.items() if name.startswith(tag)), saves
    previous = run_dir / step / "checkpoints" / tag.replace("2", "1")
    assert saves[previous.name], saves
    config = load_config(tiny_config)
    CheckpointDir(previous.parent, keep=1).verify(previous, backend=backend, config=config)
    assert step not in json.loads((run_dir / "summary.json").read_text())

    outcome = rlhf_main(pipeline_argv(tiny_config, backend, run_dir, resume=True), caplog)
    assert outcome.status == 0, outcome.message
    assert_same_run(reference, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_full_disk_during_the_final_save(backend, tiny_config, reference_run, tmp_path,
                                         monkeypatch, caplog):
    """The PPO critic's export meets a full disk (the actor's is written): exit 1, no ppo
    entry in summary.json; --resume exports again and ends as the uninterrupted run."""
    reference = reference_run(backend)
    run_dir = tmp_path / "run"
    name, module = (("save_hf", "torch_rlhf.ppo") if backend == "torch"
                    else ("export_hf", "jax_rlhf.train.ppo"))
    module = __import__(module, fromlist=[name])
    original = getattr(module, name)

    def export(*args, **kwargs):
        out = os.fspath(args[2] if backend == "torch" else args[3])
        if out.endswith("critic"):
            raise _enospc(os.path.join(out, "model.safetensors"))
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, name, export)
        outcome = rlhf_main(pipeline_argv(tiny_config, backend, run_dir), caplog)
    assert_one_line(outcome, 1, "no space left on device", "ppo/critic")
    assert "ppo" not in json.loads((run_dir / "summary.json").read_text())
    outcome = rlhf_main(pipeline_argv(tiny_config, backend, run_dir, resume=True), caplog)
    assert outcome.status == 0, outcome.message
    assert_same_run(reference, run_dir)


class _HalfWrite(io.StringIO):
    """A file whose disk fills half way through the first write: that half lands in the
    real file, then ENOSPC."""

    def __init__(self, path, real):
        super().__init__()
        self.path, self.real = path, real

    def write(self, text: str) -> int:
        self.real.write(text[:len(text) // 2])
        self.real.flush()
        raise _enospc(self.path)

    def __exit__(self, *exc):
        self.real.close()
        return super().__exit__(*exc)


def test_full_disk_during_a_metrics_record(tiny_config, reference_run, tmp_path, monkeypatch,
                                           caplog):
    """PPO iteration 2's metrics record meets a full disk half way: exit 1, half a line in
    metrics.jsonl; --resume drops that torn record (a warning) and ends as the uninterrupted
    run."""
    from shared import runlog

    backend = "torch"
    reference = reference_run(backend)
    run_dir = tmp_path / "run"
    real_open = open
    state = {"ppo": 0, "full": False}

    def stub_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return _HalfWrite(path, file) if state["full"] else file

    original_log = runlog.RunLogger.log

    def log(self, step, index, metrics, **kwargs):
        state["ppo"] += step == "ppo"
        state["full"] = step == "ppo" and state["ppo"] == 2
        try:
            return original_log(self, step, index, metrics, **kwargs)
        finally:
            state["full"] = False

    with monkeypatch.context() as patch:
        patch.setattr(runlog, "open", stub_open, raising=False)
        patch.setattr(runlog.RunLogger, "log", log)
        outcome = rlhf_main(pipeline_argv(tiny_config, backend, run_dir), caplog)
    assert_one_line(outcome, 1, "no space left on device", "metrics.jsonl")
    assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")
    outcome = rlhf_main(pipeline_argv(tiny_config, backend, run_dir, resume=True), caplog)
    assert outcome.status == 0, outcome.message
    assert any("not written whole" in w.getMessage() for w in outcome.warnings)
    assert_same_run(reference, run_dir)
