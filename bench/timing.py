"""Timing: warm-up calls, then timed calls; the median is the figure reported.

Every timed function blocks until its work is done (JAX results are fetched or
``block_until_ready``), so wall-clock time is the time of the work. The first call is reported
on its own: for JAX it holds the compilation, for torch the allocator's warm-up.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.machine import current_rss_bytes, peak_rss_bytes

__all__ = [
    "PROFILE_ENV", "alternating_ppo_iterations", "finish_ppo_iterations", "iteration_record",
    "iterations_done", "memory_snapshot", "one_ppo_iteration", "profile_call", "summarize",
    "time_calls", "time_pairs", "timed_ppo_iterations",
]

PROFILE_ENV = "BENCH_PROFILE_DIR"
"""When set (``--profile``), one more call of each timed function runs under cProfile and its
statistics are written to this directory."""


def summarize(times: list[float], first: float | None = None) -> dict[str, Any]:
    """``median_s`` (the reported figure), ``min_s``, every time, and the first call with its
    excess over the median (``compile_s``: compilation for JAX, warm-up for torch)."""
    median = statistics.median(times)
    out: dict[str, Any] = {"median_s": median, "min_s": min(times),
                           "times_s": [round(t, 6) for t in times]}
    if first is not None:
        out["first_call_s"] = first
        out["compile_s"] = max(first - median, 0.0)
    return out


def profile_call(fn: Callable[[], Any], label: str) -> Any:
    """``fn()``; under ``--profile`` run inside cProfile, with ``<label>.pstats`` and the top
    functions by own and by cumulative time (``<label>.txt``) written to the profile
    directory."""
    directory = os.environ.get(PROFILE_ENV)
    if not directory:
        return fn()
    profiler = cProfile.Profile()
    result = profiler.runcall(fn)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    name = label.replace("/", "-")
    profiler.dump_stats(str(path / f"{name}.pstats"))
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        stats = pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key)
        text.write(f"==== {label}: top 30 by {key}\n")
        stats.print_stats(30)
    (path / f"{name}.txt").write_text(text.getvalue())
    return result


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3,
               budget_s: float | None = None, label: str | None = None) -> dict[str, Any]:
    """Runs ``fn`` ``warmup`` times, then up to ``repeats`` timed times (see :func:`summarize`),
    stopping early once the timed calls add up to ``budget_s`` (at least one is always timed:
    slow workloads get fewer, longer samples). With ``label`` and ``--profile``, one more call
    runs under cProfile."""
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - start
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if budget_s is not None and sum(times) >= budget_s:
            break
    if label is not None and os.environ.get(PROFILE_ENV):
        profile_call(fn, label)
    return summarize(times, first)


def time_pairs(fn_a: Callable[[], Any], fn_b: Callable[[], Any], *, warmup: int = 1,
               repeats: int = 3, budget_s: float | None = None) -> dict[str, Any]:
    """Times ``fn_a`` and ``fn_b`` alternately (a, b, a, b, ...) in this process: an A/B
    comparison that drifts in the machine's speed and differences between processes (where
    the weights landed in memory, which cores) affect equally. Returns both summaries and
    ``b_over_a``, the ratio of their medians. ``budget_s`` bounds the timed pairs' total."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(max(repeats, 1)):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        if budget_s is not None and sum(times_a) + sum(times_b) >= budget_s:
            break
    a, b = summarize(times_a), summarize(times_b)
    return {"a": a, "b": b, "b_over_a": b["median_s"] / a["median_s"]}


def iterations_done(iterations: list[dict[str, Any]], warmup: int,
                    budget_s: float | None) -> bool:
    """Whether the timed iterations (those after ``warmup``, with ``total_s``) fill
    ``budget_s``: the loop form of :func:`time_calls`' early stop."""
    timed = iterations[warmup:]
    return bool(budget_s is not None and timed and sum(it["total_s"] for it in timed) >= budget_s)


PPO_PHASES = ("generation_time", "scoring_time", "training_time")


def iteration_record(total_s: float, phases: dict[str, float], *, rollout_path: str,
                     response_length: float) -> dict[str, Any]:
    """One timed PPO iteration: its wall time, the trainer's phase times (0 when absent)."""
    return {"total_s": total_s, **{key: phases.get(key, 0.0) for key in PPO_PHASES},
            "rollout_path": rollout_path, "response_length": response_length}


def one_ppo_iteration(trainer: Any, prompts: Any, i: int, *,
                      sync: Any = None) -> tuple[dict[str, Any], Any]:
    """Iteration ``i`` of ``trainer`` on ``prompts``, timed: its :func:`iteration_record` and
    its experience."""
    trainer.timer.pop()
    start = time.perf_counter()
    experience = trainer.generate_experience(prompts, iteration=i, batch_index=0)
    metrics = trainer.train_on_experience([experience], iteration=i)
    if sync is not None:
        sync()
    total = time.perf_counter() - start
    return iteration_record(total, trainer.timer.pop(), rollout_path=trainer.rollout_path,
                            response_length=metrics["response_length"]), experience


def timed_ppo_iterations(trainer: Any, prompts: Any, *, warmup: int, repeats: int,
                         budget_s: float | None, rss_after_load: int | None,
                         sync: Any = None) -> tuple[dict[str, Any], Any]:
    """PPO iterations of either backend's ``PPOTrainer`` (the one loop of
    ``shared.ppo_loop``: ``generate_experience`` then ``train_on_experience``, which also
    updates the KL controller) on the same prompts, with the phase times of its ``timer``;
    then :func:`finish_ppo_iterations`. ``sync`` waits for the device before a time is read."""
    iterations = []
    experience = None
    for i in range(warmup + repeats):
        record, experience = one_ppo_iteration(trainer, prompts, i, sync=sync)
        iterations.append(record)
        if iterations_done(iterations, warmup, budget_s):
            break
    return finish_ppo_iterations(trainer, prompts, experience, iterations, warmup=warmup,
                                 repeats=repeats, rss_after_load=rss_after_load)


def alternating_ppo_iterations(trainer: Any, prompts: Any, *, warmup: int, repeats: int,
                               budget_s: float | None, rss_after_load: int | None,
                               sync: Any = None) -> tuple[dict[str, Any], Any]:
    """The recompute PPO row and its ``conventions.old_logprobs: rollout`` row from one
    trainer, as ``bench.scoring_ab`` alternates the scoring pass: one process, one model load,
    the machine's drift shared by both rows. First ``warmup`` recompute iterations, then one
    scoring pass without the actor's forward on their last rollout (the only code a rollout
    iteration runs that they did not: JAX compiles that variant there), then timed pairs of
    iterations, recompute then rollout, switching the loop's old-log-prob rule
    (``trainer.old_logprobs``). The rollout rule never checks (a check iteration runs the
    actor's forward, i.e. is a recompute one), so every rollout iteration skips the actor's
    scoring forward, as the timed iterations of a separate rollout run do. Stops once the
    timed pairs add up to ``budget_s`` (both rows' iterations together, as
    :func:`time_pairs` counts a pair; at least one pair, at most ``repeats``).

    Returns the recompute row's result (:func:`finish_ppo_iterations`) with the rollout
    row's iterations under ``"rollout_logprobs"``, and the last recompute experience."""
    from shared.old_logprobs import OldLogprobs

    recompute = trainer.old_logprobs
    if recompute.mode != "recompute":
        raise ValueError("alternating_ppo_iterations: the trainer's conventions.old_logprobs "
                         f"is {recompute.mode!r}; it must be recompute (the rollout rule is "
                         "switched in here)")
    rules = {"recompute": recompute,
             "rollout": OldLogprobs(mode="rollout", max_gap=recompute.max_gap,
                                    check_interval=2**62)}  # checks at iteration 0 only
    iterations: dict[str, list[dict[str, Any]]] = {name: [] for name in rules}
    experience = None

    def one(name: str, i: int) -> Any:
        trainer.old_logprobs = rules[name]
        record, exp = one_ppo_iteration(trainer, prompts, i, sync=sync)
        iterations[name].append(record)
        return exp

    warm_scoring_s = None
    try:
        for i in range(warmup):
            experience = one("recompute", i)
        if experience is not None:  # the rollout rule's scoring, untimed in the rows
            start = time.perf_counter()
            trainer.score(experience.prompt_ids, experience.prompt_mask, experience.response,
                          experience.sample_mask, logprobs=False)
            warm_scoring_s = time.perf_counter() - start
        i = warmup
        for _ in range(max(repeats, 1)):
            experience = one("recompute", i)
            one("rollout", i + 1)
            i += 2
            timed = iterations["recompute"][warmup:] + iterations["rollout"]
            if budget_s is not None and sum(it["total_s"] for it in timed) >= budget_s:
                break
    finally:
        trainer.old_logprobs = recompute
    out, experience = finish_ppo_iterations(trainer, prompts, experience,
                                            iterations["recompute"], warmup=warmup,
                                            repeats=repeats, rss_after_load=rss_after_load)
    out["rollout_logprobs"] = {"iterations": iterations["rollout"], "warmup": [],
                               "warmup_scoring_s": warm_scoring_s,
                               "order": "alternating with recompute, one process"}
    return out, experience


def finish_ppo_iterations(trainer: Any, prompts: Any, experience: Any,
                          iterations: list[dict[str, Any]], *, warmup: int, repeats: int,
                          rss_after_load: int | None) -> tuple[dict[str, Any], Any]:
    """Both backends' PPO workload after its timed loop: the iterations split into warm-up and
    timed ones with the process's memory, and under ``--profile`` one more iteration (its
    ``generate_experience`` and ``train_on_experience``) in cProfile. Returns that result
    and the last experience (what the plain reference steps train on)."""
    out: dict[str, Any] = {"iterations": iterations[warmup:], "warmup": iterations[:warmup],
                           **memory_snapshot(), "rss_after_load_bytes": rss_after_load}
    if os.environ.get(PROFILE_ENV):
        n = warmup + repeats
        experience = profile_call(lambda: trainer.generate_experience(
            prompts, iteration=n, batch_index=0), "generate_experience")
        profile_call(lambda: trainer.train_on_experience([experience], iteration=n),
                     "train_on_experience")
    return out, experience


def memory_snapshot() -> dict[str, int | None]:
    """Peak RSS of this process so far and its RSS now, in bytes."""
    return {"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes()}
