"""One measurement in a fresh process: ``python -m bench.worker TASK.json RESULT.json``.

A fresh process per measurement keeps peak-memory figures apart (``getrusage`` max RSS only
ever grows) and keeps one workload's allocator and thread-pool state out of the next. The task
file is written by ``bench.run``; the result file holds the raw measurement (or the error).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.machine import load_average, set_threads
from bench.workspace import Shapes

__all__ = ["execute", "run_task"]


def run_task(task: dict[str, Any]) -> Any:
    """The raw measurement of one task (see ``bench.run.plan`` for the task fields)."""
    kind = task["kind"]
    if kind == "machine":
        from bench.machine import machine_limits

        return machine_limits(device=task.get("device", "cpu"), quick=task.get("quick", False))
    if kind == "prepare":
        from bench.models import build_model_dirs

        out = {size: build_model_dirs(size, task["model_root"]) for size in task["sizes"]}
        if task.get("recipe_models"):
            from bench.gpu_recipe import build_recipe_dirs

            out.update(build_recipe_dirs(task))
        return out
    if kind == "recipe":
        from bench.gpu_recipe import run_recipe

        return run_recipe(task)
    shapes = Shapes(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in task["shapes"].items()})
    from bench.models import SIZES

    size, backend = task["size"], task["backend"]
    vocab = SIZES[size]["vocab_size"]
    root = Path(task["model_root"]) / size
    lm_dir, value_dir = str(root / "lm"), str(root / "value")
    timing = {"warmup": task["warmup"], "repeats": task["repeats"],
              "budget_s": task.get("budget_s")}
    if kind == "generation":
        from bench.generation import run_generation

        return run_generation(backend, lm_dir, shapes, vocab_size=vocab, **timing)
    from bench.workspace import write_run_config

    work = Path(task["work_dir"])
    # the PPO variant with conventions.old_logprobs rollout (no actor scoring forward)
    extra = ({"ppo": {"conventions": {"old_logprobs": task["old_logprobs"]}}}
             if task.get("old_logprobs") else None)
    _, config = write_run_config(work, SIZES[size], shapes, lm_dir=lm_dir,
                                 value_dir=value_dir, extra=extra)
    if backend == "torch":
        from bench import torch_workloads as workloads
    else:
        from bench import jax_workloads as workloads
    if kind == "sft":
        return workloads.sft_step(config, work / "run", lm_dir, shapes, vocab_size=vocab,
                                  **timing)
    if kind == "ppo":
        # with_rollout_logprobs: the rollout row alternates with this one in this process
        return workloads.ppo_iteration(config, work / "run", lm_dir, value_dir, shapes,
                                       vocab_size=vocab, **timing,
                                       rollout_logprobs=bool(task.get("with_rollout_logprobs")))
    raise ValueError(f"unknown task kind {kind!r}")


def execute(task: dict[str, Any]) -> dict[str, Any]:
    """``run_task`` with its wall time and the load average around it; errors are caught and
    returned as ``{"ok": False, "error": traceback}``."""
    load_start, start = load_average(), time.perf_counter()
    try:
        result, ok, error = run_task(task), True, None
    except Exception:  # noqa: BLE001 - reported in results.json, the run goes on
        result, ok, error = None, False, traceback.format_exc()
    return {"ok": ok, "result": result, "error": error, "wall_s": time.perf_counter() - start,
            "load_average": {"start": load_start, "end": load_average()}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    task_path, result_path = Path(argv[0]), Path(argv[1])
    task = json.loads(task_path.read_text())
    set_threads(task["threads"])  # before torch / jax are imported
    if task.get("profile_dir"):
        import os

        from bench.timing import PROFILE_ENV

        os.environ[PROFILE_ENV] = task["profile_dir"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    outcome = execute(task)
    result_path.write_text(json.dumps(outcome, indent=1, default=str))
    if not outcome["ok"]:
        print(outcome["error"], file=sys.stderr)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
