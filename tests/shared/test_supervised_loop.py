"""shared.supervised_loop and shared.pipeline with a numpy backend: cadences, checkpoint
directories, resume (metrics.jsonl row for row), the summary entry, the pipeline's order,
skipping and model hand-over. No torch, no jax: the backends' own tests run the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from numpy_weights import NumpyWeights

from shared.checkpoints import COMPLETE, CheckpointDir
from shared.config import config_from_dict
from shared.data import DataReport, SFTBatch, StepData
from shared.pipeline import Backend, Session, run_pipeline, step_done
from shared.runlog import RunLogger
from shared.supervised_loop import SupervisedLoop, eval_metrics, model_source


def _config(**sections):
    base = {"model": {"actor_model_name_or_path": "actor"},
            "sft": {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 3,
                    "num_train_epochs": 3},
            "logging": {"progress_bar": False, "enable_tensorboard": False}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(base)


def _batch(rows: int, seed: int) -> SFTBatch:
    ids = np.random.default_rng(seed).integers(1, 9, (rows, 4)).astype(np.int32)
    return SFTBatch(ids, np.ones_like(ids), np.ones_like(ids))


DATA = StepData("sft", train=_batch(8, 0), eval=_batch(7, 1), report=DataReport())
"""8 training rows (4 steps per epoch at 2 rows), 7 eval rows (3 chunks of 3, one padded)."""


class Killed(Exception):
    pass


class NumpyBackend(NumpyWeights):
    """A 'model' of 4 weights pulled towards each batch's mean ids: the steps depend on the
    order of the batches, so a resume that replays the wrong ones shows."""

    step = "sft"
    backend = "numpy"

    def __init__(self, *, background: bool = False, kill_at: int | None = None):
        self.w = np.zeros(4)
        self.saves_in_background = background
        self.kill_at = kill_at
        self.calls = 0

    def train_step(self, batch):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed(self.calls)
        self.w = 0.5 * self.w + 0.5 * batch.input_ids.mean(0)
        return {"loss": float(self.w.sum()), "lr": 0.1, "grad_norm": float(self.w[0]),
                "tokens": float(batch.loss_mask.sum())}

    def eval_sums(self, batch, valid):
        nll = (batch.input_ids @ self.w) * valid
        return {"nll": float(nll.sum()), "tokens": float(valid.sum())}


def _loop(config, run_dir: Path) -> SupervisedLoop:
    run_dir.mkdir(parents=True, exist_ok=True)
    return SupervisedLoop(config, "sft", data=DATA, run_dir=run_dir,
                          run_logger=RunLogger(run_dir, enable_tensorboard=False))


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]


def test_cadences_checkpoints_and_summary(tmp_path):
    config = _config(sft={"max_steps": 7, "eval_interval": 3},
                     logging={"log_interval": 2, "save_interval": 2, "keep_checkpoints": 2})
    loop = _loop(config, tmp_path)
    assert loop.total_steps == 7 and loop.global_batch_size == 2
    entry = loop.run(NumpyBackend())
    rows = _rows(tmp_path)
    train = [r["iteration"] for r in rows if "loss" in r]
    evals = [r["iteration"] for r in rows if "eval_loss" in r]
    assert train == [2, 4, 6, 7] and evals == [3, 6, 7]
    names = [p.name for p in loop.checkpoints.complete()]
    assert names == ["step-00000006", "step-00000007"]  # 2, 4 pruned (keep 2)
    assert set(entry) == {"eval_loss", "eval_perplexity", "heldout", "steps", "final_model",
                          "timings", "data_quality"}
    assert entry["data_quality"]["truncated_fraction"] == 0.0
    assert entry["steps"] == 7 and entry["final_model"] == str(tmp_path / "sft" / "final")
    assert {"training_time", "evaluation_time", "checkpoint_time", "export_time",
            "heldout_evaluation_time", "wall_time"} <= set(entry["timings"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"] == "numpy" and summary["sft"]["steps"] == 7


def test_eval_pads_the_last_chunk_and_counts_only_real_rows(tmp_path):
    loop = _loop(_config(), tmp_path)
    backend = NumpyBackend()
    backend.w = np.array([0.5, 0.25, 0.0, 1.0])
    expected = float((DATA.eval.input_ids @ backend.w).sum()) / 7
    got = loop.evaluate(backend)
    assert got["eval_loss"] == pytest.approx(expected, rel=1e-12)
    assert got["eval_perplexity"] == pytest.approx(np.exp(expected), rel=1e-12)


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_killed_and_resumed_run_logs_row_for_row(tmp_path, background):
    config = _config(sft={"max_steps": 7, "eval_interval": 2}, logging={"save_interval": 2})
    straight = NumpyBackend(background=background)
    _loop(config, tmp_path / "straight").run(straight)

    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):  # dies in step 5, after the checkpoint of step 4
        _loop(config, run_dir).run(NumpyBackend(background=background, kill_at=5))
    assert (run_dir / "sft" / "checkpoints" / "step-00000004" / COMPLETE).is_file()
    assert [r["iteration"] for r in _rows(run_dir)] == [1, 2, 2, 3, 4, 4]
    _loop(config, run_dir).run(NumpyBackend(background=background), resume=True)
    resumed = NumpyBackend()
    resumed.restore(run_dir / "sft" / "checkpoints" / "step-00000007")
    np.testing.assert_array_equal(resumed.w, straight.w)
    assert _rows(run_dir) == _rows(tmp_path / "straight")


class RecordingBackend(NumpyBackend):
    """Records the first id of every batch it trains on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[int] = []

    def train_step(self, batch):
        metrics = super().train_step(batch)
        self.seen.extend(batch.input_ids[:, 0].tolist())
        return metrics


def test_max_steps_overrides_epochs_and_resumes_exactly(tmp_path):
    """max_steps is the number of optimiser steps (HF/TRL): 10 steps of 4 batches per epoch
    take epochs 1, 2 and half of 3, each in its own seeded order, whatever
    num_train_epochs says; a run killed in epoch 2 resumes to the same steps."""
    from shared.data import BatchIterator

    config = _config(sft={"max_steps": 10, "num_train_epochs": 1},
                     logging={"save_interval": 3})
    loop = _loop(config, tmp_path / "straight")
    assert loop.total_steps == 10 and loop.num_epochs == 3
    straight = RecordingBackend()
    entry = loop.run(straight)
    assert entry["steps"] == 10 and loop.global_step == 10
    assert [r["iteration"] for r in _rows(tmp_path / "straight") if "loss" in r] == list(
        range(1, 11))
    order = BatchIterator(DATA.train, 2, seed=config.seed, name="expected")
    batches = [order.next_batch() for _ in range(10)]
    expected = [int(x) for batch in batches for x in batch.input_ids[:, 0]]
    assert straight.seen == expected and loop.iterator.epoch == 2

    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):  # dies in step 8 (epoch 2), after the checkpoint of step 6
        _loop(config, run_dir).run(NumpyBackend(kill_at=8))
    resumed_loop = _loop(config, run_dir)
    resumed_loop.run(RecordingBackend(), resume=True)
    assert resumed_loop.global_step == 10
    final = NumpyBackend()
    final.restore(run_dir / "sft" / "checkpoints" / "step-00000010")
    np.testing.assert_array_equal(final.w, straight.w)
    assert _rows(run_dir) == _rows(tmp_path / "straight")


def test_background_saves_are_marked_complete_only_once_written(tmp_path):
    config = _config(sft={"max_steps": 5}, logging={"save_interval": 2, "keep_checkpoints": 5})
    loop = _loop(config, tmp_path)
    backend = NumpyBackend(background=True)
    for _ in range(2):
        backend.train_step(loop.iterator.next_batch())
        loop.global_step += 1
    path = loop.save(backend)
    assert not (path / COMPLETE).exists() and backend.unsaved is not None
    loop.fit(backend, resume=False)  # waits, marks, then trains on
    assert [p.name for p in loop.checkpoints.complete()] == [
        "step-00000002", "step-00000004", "step-00000005"]


def test_checkpoint_dir_ignores_partial_and_prunes(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=1)
    for step in (1, 2):
        path = ckpts.prepare(ckpts.tag(step))
        path.mkdir()
        ckpts.commit(path)
    (tmp_path / ckpts.tag(3)).mkdir()  # killed while writing
    assert ckpts.latest() == tmp_path / "step-00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]


def test_model_source_and_eval_metrics():
    config = _config()
    assert model_source(config, "sft") == ("actor", None)
    assert model_source(config, "reward") == ("actor", None)  # a fresh head on the actor
    fresh = {"model_type": "llama"}
    config = _config(model={"actor_model_name_or_path": None, "actor_config": fresh,
                            "critic_config": fresh, "tokenizer_name_or_path": "tok"})
    assert model_source(config, "reward") == (None, fresh)
    sums = {"correct": 3.0, "pairs": 4.0, "chosen_sum": 2.0, "chosen_count": 4.0,
            "rejected_sum": -2.0, "rejected_count": 4.0}
    assert eval_metrics("reward", sums) == {"eval_accuracy": 0.75, "eval_chosen_score": 0.5,
                                            "eval_rejected_score": -0.5}


# -- shared.pipeline ------------------------------------------------------------------------

class _Trainer:
    calls: list = []

    def __init__(self, config, *, run_dir, model_name_or_path=None, **kwargs):
        self.run_dir, self.start = run_dir, model_name_or_path
        self.kwargs = kwargs

    def run(self, *, resume=False):
        _Trainer.calls.append((self.step, self.start, resume, sorted(self.kwargs)))
        final = self.run_dir / self.step / "final"
        final.mkdir(parents=True, exist_ok=True)
        (final / "config.json").write_text("{}")
        return {"steps": 1, "timings": {"wall_time": 0.0}}


class _SFT(_Trainer):
    step = "sft"


class _Reward(_Trainer):
    step = "reward"


class _PPO(_Trainer):
    step = "ppo"

    def __init__(self, config, *, run_dir, actor_model_name_or_path=None,
                 critic_model_name_or_path=None, **kwargs):
        super().__init__(config, run_dir=run_dir, **kwargs)
        self.start = (actor_model_name_or_path, critic_model_name_or_path)


class _FakeBackend(Backend):
    def trainer(self, step):
        return {"sft": _SFT, "reward": _Reward, "ppo": _PPO}[step]

    def open_session(self, config, run_dir):
        logger = RunLogger(run_dir, enable_tensorboard=False)
        return Session(logger, {"run_logger": logger})


def test_pipeline_hands_models_over_and_skips_finished_steps(tmp_path):
    backend = _FakeBackend("fake", {}, session="")
    config = _config(model={"critic_model_name_or_path": None, "critic_config": None})
    _Trainer.calls = []
    summary = run_pipeline(backend, config, tmp_path)
    sft, reward = str(tmp_path / "sft" / "final"), str(tmp_path / "reward" / "final")
    assert _Trainer.calls == [("sft", None, False, ["run_logger"]),
                              ("reward", None, False, ["run_logger"]),
                              ("ppo", (sft, reward), False, ["run_logger"])]
    assert summary["backend"] == "fake"
    assert set(summary["timings"]) == {"sft_wall_time", "reward_wall_time", "ppo_wall_time",
                                       "pipeline_wall_time"}
    assert all(step_done(tmp_path, step) for step in ("sft", "reward", "ppo"))

    summary_file = tmp_path / "summary.json"
    partial = json.loads(summary_file.read_text())
    del partial["ppo"]  # killed during PPO
    summary_file.write_text(json.dumps(partial))
    _Trainer.calls = []
    run_pipeline(backend, config, tmp_path, resume=True)
    assert _Trainer.calls == [("ppo", (sft, reward), True, ["run_logger"])]


class NaNBackend(NumpyBackend):
    """Steps `nan_steps` (1-based) report a non-finite gradient norm and, as the backends do
    for such a step, leave the weights alone."""

    def __init__(self, nan_steps, **kwargs):
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)

    def train_step(self, batch):
        if self.calls + 1 in self.nan_steps:
            self.calls += 1
            return {"loss": float("nan"), "lr": 0.1, "grad_norm": float("nan"), "tokens": 8.0}
        return super().train_step(batch)


def test_non_finite_steps_are_counted_and_stop_the_run(tmp_path):
    from shared.guard import NonFiniteError

    config = _config(sft={"max_steps": 8}, logging={"save_interval": 2},
                     guard={"max_consecutive_skips": 2})
    entry = _loop(config, tmp_path / "a").run(NaNBackend({3, 6}))
    assert entry["steps"] == 8
    skipped = [r["skipped_steps"] for r in _rows(tmp_path / "a") if "loss" in r]
    assert skipped == [0, 0, 1, 1, 1, 2, 2, 2]  # counted, not in a row: the run goes on
    with pytest.raises(NonFiniteError, match=r"sft step 6: loss, grad_norm not finite, 2 skips "
                       r"in a row.*step-00000004"):
        _loop(config, tmp_path / "b").run(NaNBackend({5, 6}))
    assert not (tmp_path / "b" / "sft" / "final").exists()  # no final model written
