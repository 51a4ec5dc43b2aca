"""shared.dpo_step with numpy: the `dpo:` config section, the comparisons as
PreferenceBatch (answer masks from the prompt lengths), the split-invariant micro-batch loss,
the eval sums, and DPOLoop on a numpy stand-in backend (reference log-probs computed once by
the starting policy, kept in the checkpoint, a killed run resumed row for row). No torch, no
jax: tests/torch/test_torch_dpo.py and tests/jax/test_jax_dpo.py run the real backends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from numpy_weights import NumpyWeights

from shared.config import ConfigError, config_from_dict
from shared.data import DataError, DataReport, PairwiseBatch, RankingBatch, StepData
from shared.dpo_step import (
    METRIC_KEYS,
    DPOEvalMixin,
    DPOLoop,
    DPOOptions,
    PreferenceBatch,
    dpo_eval_sums,
    dpo_metrics,
    dpo_micro_loss,
    preference_batch,
)
from shared.errors import InputError
from shared.runlog import RunLogger


def _config(**dpo):
    return config_from_dict({
        "model": {"actor_model_name_or_path": "actor"},
        "pipeline_steps": ["sft", "dpo"],
        "dpo": {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 3,
                "num_train_epochs": 2, **dpo},
        "logging": {"progress_bar": False, "enable_tensorboard": False}})


# ----------------------------------------------------------------------- config


def test_dpo_section_defaults_and_pipeline():
    config = _config()
    assert config.pipeline_steps == ("sft", "dpo")
    assert (config.dpo.beta, config.dpo.loss_type, config.dpo.label_smoothing) == (
        0.1, "sigmoid", 0.0)


@pytest.mark.parametrize("dpo, message", [
    ({"loss_type": "hinge"}, "dpo.loss_type: 'hinge' is not allowed; choose one of 'sigmoid', "
                             "'ipo'"),
    ({"beta": 0.0}, "dpo.beta: 0.0 is invalid; must be a finite number > 0"),
    ({"beta": float("nan")}, "dpo.beta: nan is invalid"),
    ({"label_smoothing": 0.5}, "dpo.label_smoothing: 0.5 is invalid; must be a finite number "
                               "in [0, 0.5)"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "allowed: 0 (label smoothing is cDPO's"),
    ({"per_device_train_batch_size": 0}, "dpo.per_device_train_batch_size: 0 is invalid"),
])
def test_dpo_section_errors_name_key_and_allowed_values(dpo, message):
    with pytest.raises(ConfigError) as err:
        _config(**dpo)
    assert message in str(err.value)


def test_pipeline_steps_lists_dpo_among_the_allowed_steps():
    with pytest.raises(ConfigError, match="'sft', 'reward', 'ppo', 'dpo'"):
        config_from_dict({"model": {"actor_model_name_or_path": "a"},
                          "pipeline_steps": ["sft", "kto"]})
    with pytest.raises(ConfigError, match="each step may run once"):
        config_from_dict({"model": {"actor_model_name_or_path": "a"},
                          "pipeline_steps": ["sft", "dpo", "dpo"]})


# ----------------------------------------------------------------------- data


def test_preference_batch_marks_the_answers_after_the_prompt():
    ids = np.array([[1, 5, 6, 7, 2, 0], [1, 5, 8, 2, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    rejected = np.array([[1, 5, 6, 9, 9, 2], [1, 5, 9, 2, 0, 0]], np.int32)
    pairs = PairwiseBatch(ids, mask, rejected, (rejected > 0).astype(np.int32),
                          np.array([3, 2], np.int32))
    batch = preference_batch(pairs)
    assert batch.chosen_loss_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert batch.rejected_loss_mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert not batch.has_reference and len(batch.take(np.array([1]))) == 1


def test_preference_batch_refuses_rankings_and_batches_without_prompt_lengths():
    rankings = RankingBatch(np.ones((2, 3, 4), np.int32), np.ones((2, 3, 4), np.int32),
                            np.array([3, 2], np.int32))
    with pytest.raises(InputError, match="rankings of more than two answers; DPO trains on "
                                         "pairs"):
        preference_batch(rankings)
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(InputError, match="no prompt lengths"):
        preference_batch(PairwiseBatch(ids, ids, ids, ids))


def test_data_errors_say_which_comparisons_dpo_reads(monkeypatch):
    import shared.dpo_step as dpo_step

    def no_pairs(config, tokenizer, step):
        assert step == "reward"
        raise DataError("no dataset feeds step 'reward'; check `steps` and `data_split`")

    monkeypatch.setattr(dpo_step, "build_step_data", no_pairs)
    with pytest.raises(DataError, match="dpo trains on the reward step's comparisons: no "
                                        "dataset feeds step 'reward'"):
        DPOLoop.build_data(_config(), None)


# ----------------------------------------------------------------------- the loss


def _logprobs(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.normal(-5.0, 2.0, rows) for _ in range(4)]


@pytest.mark.parametrize("options", [DPOOptions(0.3), DPOOptions(0.3, "sigmoid", 0.2),
                                     DPOOptions(0.3, "ipo")], ids=["dpo", "cdpo", "ipo"])
def test_micro_batches_add_up_to_the_whole_batch(options):
    """Each micro-batch's loss and statistics, divided by the global pair count, sum to the
    whole batch's: accumulation and rank splits do not change the step."""
    arrays = _logprobs(8)
    whole, whole_stats = dpo_micro_loss(*arrays, options, 8.0)
    parts = [dpo_micro_loss(*[a[i:i + 2] for a in arrays], options, 8.0) for i in (0, 2, 4, 6)]
    assert sum(float(p[0]) for p in parts) == pytest.approx(float(whole), rel=1e-12)
    for key in METRIC_KEYS:
        assert sum(float(p[1][key]) for p in parts) == pytest.approx(float(whole_stats[key]),
                                                                     rel=1e-12, abs=1e-15)


def test_policy_equal_to_reference_gives_log_two():
    chosen, rejected = _logprobs(5)[:2]
    loss, stats = dpo_micro_loss(chosen, rejected, chosen, rejected, DPOOptions(0.1), 5.0)
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-12)
    assert all(float(stats[k]) == 0.0 for k in METRIC_KEYS)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_gradient_at_policy_equal_to_reference(framework):
    """The first step (policy = reference, h = 0 exactly): dl/d log pi(y_w) = -beta sigma(0)
    / N = -beta / (2N) and +beta / (2N) for y_l (sigmoid), -1 / (beta N) and +1 / (beta N)
    for IPO. (JAX's max/abs subgradients made the old softplus give 0 at exactly 0.)"""
    beta, n = 0.3, 3
    lp = np.array([-4.0, -7.5, -2.25], np.float32)
    expected = {"sigmoid": beta / 2, "ipo": 1.0 / beta}
    for loss_type, slope in expected.items():
        options = DPOOptions(beta, loss_type)
        if framework == "torch":
            torch = pytest.importorskip("torch")
            chosen = torch.tensor(lp, requires_grad=True)
            rejected = torch.tensor(lp, requires_grad=True)
            ref = torch.tensor(lp)
            dpo_micro_loss(chosen, rejected, ref, ref, options, float(n))[0].backward()
            grads = chosen.grad.numpy(), rejected.grad.numpy()
        else:
            jax = pytest.importorskip("jax")
            ref = jax.numpy.asarray(lp)
            def loss(c, r, ref=ref, options=options):
                return dpo_micro_loss(c, r, ref, ref, options, float(n))[0]

            grads = jax.grad(loss, argnums=(0, 1))(ref, ref)
        np.testing.assert_allclose(np.asarray(grads[0]), -slope / n, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(grads[1]), slope / n, rtol=1e-6)


def test_eval_sums_count_only_valid_rows():
    chosen, rejected, ref_c, ref_r = _logprobs(5, seed=3)
    ids = np.ones((5, 4), np.int32)
    batch = PreferenceBatch(ids, ids, ids, ids, ids, ids, ref_c, ref_r)
    valid = np.array([True, True, True, False, False])
    sums = dpo_eval_sums(chosen, rejected, batch, valid, DPOOptions(0.5))
    loss, stats = dpo_micro_loss(chosen[:3], rejected[:3], ref_c[:3], ref_r[:3],
                                 DPOOptions(0.5), 3.0)
    got = dpo_metrics(sums, "eval_")
    assert sums["pairs"] == 3.0
    assert got["eval_loss"] == pytest.approx(float(loss), rel=1e-12)
    for key in METRIC_KEYS:
        assert got[f"eval_{key}"] == pytest.approx(float(stats[key]), rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------- the loop


def _pairs(rows: int, seed: int) -> PreferenceBatch:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 9, (rows, 4)).astype(np.int32) for _ in range(2)]
    ones = np.ones((rows, 4), np.int32)
    return PreferenceBatch(ids[0], ones, ones, ids[1], ones, ones)


DATA = StepData("reward", train=_pairs(8, 0), eval=_pairs(5, 1), report=DataReport())
"""8 training pairs (4 steps per epoch at 2), 5 eval pairs (2 chunks of 3, one padded)."""


class Killed(Exception):
    pass


class NumpyDPO(DPOEvalMixin, NumpyWeights):
    """A 'policy' whose sequence log-prob is -|w . ids| / 10, trained by a step that needs
    the batch's reference log-probs, so a missing or wrong reference shows in the weights."""

    step = "dpo"
    backend = "numpy"
    def __init__(self, config, *, kill_at: int | None = None):
        self.config = config
        self.w = np.linspace(0.1, 0.4, 4)
        self.kill_at = kill_at
        self.calls = 0
        self.reference_calls = 0  # sequence_logprobs before the first step

    def sequence_logprobs(self, batch):
        if self.calls == 0:
            self.reference_calls += 1
        return (-np.abs(batch.chosen_input_ids @ self.w) / 10,
                -np.abs(batch.rejected_input_ids @ self.w) / 10)

    def train_step(self, batch):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed(self.calls)
        chosen, rejected = self.sequence_logprobs(batch)
        loss, stats = dpo_micro_loss(chosen, rejected, batch.ref_chosen_logprobs,
                                     batch.ref_rejected_logprobs, DPOOptions(0.5), len(batch))
        self.w = self.w + 0.01 * float(loss) * batch.chosen_input_ids.mean(0)
        return {"loss": float(loss), **{k: float(v) for k, v in stats.items()}, "lr": 0.1,
                "grad_norm": 1.0}


def _loop(config, run_dir: Path) -> DPOLoop:
    run_dir.mkdir(parents=True, exist_ok=True)
    return DPOLoop(config, "dpo", data=DATA, run_dir=run_dir,
                   run_logger=RunLogger(run_dir, enable_tensorboard=False))


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]


def test_reference_is_the_starting_policy_and_step_one_loss_is_log_two(tmp_path):
    config = _config(max_steps=3)
    backend = NumpyDPO(config)
    start = backend.w.copy()
    entry = _loop(config, tmp_path).run(backend)
    assert backend.reference_calls == 3 + 2  # 8 train rows in chunks of 3, 5 eval rows
    rows = _rows(tmp_path)
    # the reference is kept in float32: equal to the policy up to its rounding
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    reference = NumpyDPO(config)
    reference.w = start
    state = json.loads((tmp_path / "dpo" / "checkpoints" / "step-00000003" / "loop.json")
                       .read_text())
    expected = reference.sequence_logprobs(DATA.train)[0].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(state["reference"]["train_chosen"], np.float32),
                                  expected)
    assert {f"eval_{k}" for k in ("loss", *METRIC_KEYS)} <= set(entry)
    assert entry["steps"] == 3 and "heldout" in entry


def test_killed_and_resumed_run_is_exact(tmp_path):
    config = _config(max_steps=7, eval_interval=2)
    config = config.replace(logging=config.logging.__class__(
        progress_bar=False, enable_tensorboard=False, save_interval=2))
    straight = NumpyDPO(config)
    _loop(config, tmp_path / "straight").run(straight)

    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):  # dies in step 5, after the checkpoint of step 4
        _loop(config, run_dir).run(NumpyDPO(config, kill_at=5))
    resumed = NumpyDPO(config)
    resumed.calls = 4  # its sequence_logprobs would no longer be the reference's
    _loop(config, run_dir).run(resumed, resume=True)
    np.testing.assert_array_equal(resumed.w, straight.w)
    assert _rows(run_dir) == _rows(tmp_path / "straight")
