"""The rollout-log-probs PPO row measured in its recompute row's process
(``bench.timing.alternating_ppo_iterations``) and reported as its own row
(``bench.report``). A stub trainer stands in for the backends' ``PPOTrainer``: what is checked
is which old-log-prob rule each iteration ran under, not how fast it ran."""

from __future__ import annotations

import types

import pytest

from bench.report import _rollout_logprobs_row  # noqa: PLC2701 - the row under test
from bench.timing import alternating_ppo_iterations
from shared.old_logprobs import OldLogprobs


class _Timer:
    def pop(self) -> dict[str, float]:
        return {"generation_time": 0.0, "scoring_time": 0.0, "training_time": 0.0}


class _StubTrainer:
    """Records, per iteration, whether scoring would run the actor's forward."""

    rollout_path = "stub"

    def __init__(self, mode: str = "recompute"):
        self.old_logprobs = OldLogprobs(mode=mode, max_gap=0.05, check_interval=10)
        self.timer = _Timer()
        self.seen: list[tuple[int, str, bool]] = []

    def generate_experience(self, prompts, *, iteration, batch_index):
        rule = self.old_logprobs
        self.seen.append((iteration, rule.mode, rule.recompute(iteration)))
        return types.SimpleNamespace(iteration=iteration, mode=rule.mode, prompt_ids=None,
                                     prompt_mask=None, response=None, sample_mask=None)

    def train_on_experience(self, buffer, *, iteration):
        return {"response_length": 4.0}

    def score(self, prompt_ids, prompt_mask, response, sample_mask, *, logprobs=True):
        self.seen.append(("score", "rollout" if not logprobs else "recompute", logprobs))


def test_iterations_alternate_and_rollout_ones_skip_the_actor_forward():
    trainer = _StubTrainer()
    original = trainer.old_logprobs
    out, experience = alternating_ppo_iterations(trainer, None, warmup=1, repeats=2,
                                                 budget_s=None, rss_after_load=None)
    # a recompute warm-up, one scoring pass without the actor (the rollout rule's code),
    # then pairs: recompute, rollout
    assert trainer.seen == [
        (0, "recompute", True), ("score", "rollout", False),
        (1, "recompute", True), (2, "rollout", False),
        (3, "recompute", True), (4, "rollout", False)]
    assert trainer.old_logprobs is original  # the trainer's own rule is put back
    assert (experience.iteration, experience.mode) == (3, "recompute")  # the plain loops'
    assert len(out["warmup"]) == 1 and out["rollout_logprobs"]["warmup"] == []
    assert len(out["iterations"]) == len(out["rollout_logprobs"]["iterations"]) == 2
    assert out["rollout_logprobs"]["warmup_scoring_s"] >= 0


def test_the_budget_counts_both_rows_and_stops_after_a_whole_pair():
    trainer = _StubTrainer()
    out, _ = alternating_ppo_iterations(trainer, None, warmup=1, repeats=5, budget_s=0.0,
                                        rss_after_load=None)
    assert len(trainer.seen) == 4  # the warm-up, its scoring pass and one timed pair
    assert len(out["iterations"]) == len(out["rollout_logprobs"]["iterations"]) == 1


def test_a_trainer_already_on_rollout_is_refused():
    with pytest.raises(ValueError, match="must be recompute"):
        alternating_ppo_iterations(_StubTrainer("rollout"), None, warmup=1, repeats=1,
                                   budget_s=None, rss_after_load=None)


def _iterations(total, scoring):
    return [{"total_s": total, "generation_time": 1.0, "scoring_time": scoring,
             "training_time": total - 1.0 - scoring, "rollout_path": "module",
             "response_length": 4.0}]


def test_the_report_splits_the_task_into_two_rows_sharing_the_plain_reference():
    from bench.report import _ppo_row  # noqa: PLC2701

    shapes = {"ppo_rollout_batch": 4, "ppo_minibatch": 2, "prompt_len": 8, "answer_len": 8}
    counts = {"micro": {"lm": {"matmul": 100}, "value": {"matmul": 100}}}
    plain = {"scoring": {"median_s": 0.5, "times_s": [0.5]},
             "step": {"median_s": 0.5, "times_s": [0.5]}}
    raw = {"iterations": _iterations(4.0, 1.0), "warmup": _iterations(5.0, 1.0),
           "plain": plain, "peak_rss_bytes": 10, "rss_after_load_bytes": 5,
           "rollout_logprobs": {"iterations": _iterations(3.5, 0.5), "warmup": []}}
    task = {"id": "ppo/micro/torch", "size": "micro", "with_rollout_logprobs": True}
    outcome = {"result": raw}
    recompute = _ppo_row(task, outcome, {}, counts, shapes)
    rollout = _rollout_logprobs_row(recompute, task, outcome, {}, counts, shapes)
    assert rollout["id"] == "ppo/micro/torch/rollout-logprobs"
    assert (recompute["old_logprobs"], rollout["old_logprobs"]) == ("recompute", "rollout")
    assert rollout["same_process_as"] == "ppo/micro/torch"
    assert rollout["plain_scoring_s"] == recompute["plain_scoring_s"]
    assert rollout["peak_rss_bytes"] == recompute["peak_rss_bytes"]
    assert rollout["iteration_s"] == 3.5 and rollout["first_iteration_s"] is None
    assert rollout["vs_recompute_same_process"] == pytest.approx(
        {"iteration": 3.5 / 4.0, "scoring": 0.5 / 1.0})
