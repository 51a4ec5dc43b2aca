"""The benchmark: ``python -m bench.run [--out DIR] [--quick] [--gpu-recipe]``.

One run measures, each in a fresh process (``bench.worker``):

1. the machine's limits (fp32 matmul FLOP/s in torch and JAX, bf16 where native, copy
   bandwidth), at the start and again at the end of the run;
2. generation with the torch rollout path, the JAX sampler and Hugging Face ``generate`` on
   the same weights, batch 1 and 16, prompt 64 + answer 64, for each model size (by default
   the small one only; ``--sizes tiny,small`` for both); on the largest size (where the
   targets are judged) also the JAX sampler in bf16 and the torch path with
   ``rollout_decode: packed``, timed in their pairs with HF ``generate`` only
   (``--variants``: every variant of ``bench.generation`` at every size);
3. the SFT step and the PPO actor + critic step of both backends (tokens/s, MFU);
4. a PPO iteration of both backends, split into generation, scoring and training, and on the
   largest size again with ``conventions.old_logprobs: rollout`` (every size with
   ``--variants``), its iterations alternating with the recompute row's in that row's
   process (one model load, one plain reference for both);
5. peak memory (max RSS) of each of those processes.

and writes ``<out>/results.json`` and ``<out>/results.md`` (docs/performance.md explains every
column). A full default run (``python -m bench.run``, what ``make bench`` runs) also rewrites
docs/performance.md's "Latest run" section, between its ``bench`` markers
(``bench.docs_writer``); other runs leave docs/ alone unless given ``--write-docs``.
``--gpu-recipe`` runs DeepSpeed-Chat's OPT-1.3B step-3 shapes instead (needs CUDA).
``bench.run.main(config, args)`` is the entry point ``rlhf bench`` calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.docs_writer import DOCS
from bench.generation import IMPLEMENTATIONS
from bench.machine import CpuMeter, git_revision, library_versions, load_average, machine_info
from bench.report import TARGET_SIZE_ORDER
from bench.workspace import Shapes

__all__ = ["build_parser", "main", "plan"]

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("runs/bench")
DEFAULT_SIZES = ("small",)
"""The default run measures the small model only (the targets are judged there; ``make bench``
must fit in 15 minutes on a 2-core CPU); ``--sizes tiny,small`` adds the tiny one, ``--quick``
runs tiny alone, and ``bench.cost_curves`` keeps its own four sizes."""
QUICK_SIZES = ("tiny",)
BACKENDS = ("torch", "jax")
CORE_IMPLEMENTATIONS = ("hf", "torch", "jax")
"""Generation rows of every size in every run."""
TARGET_IMPLEMENTATIONS = ("jax_bf16", "torch_packed")
"""Generation rows of the largest size only (unless ``--variants``): the bf16 targets and the
``rollout_decode`` verdict are judged there. The other variants (SDPA, static, compiled, torch
bf16) and the rows above at smaller sizes run with ``--variants`` or when ``--only`` names
them: ``make bench`` must fit in 15 minutes on a 2-core CPU (docs/performance.md)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """A run's settings (from the command line or ``rlhf bench``'s namespace)."""

    out: Path = DEFAULT_OUT
    quick: bool = False
    sizes: tuple[str, ...] = DEFAULT_SIZES
    backends: tuple[str, ...] = BACKENDS
    only: tuple[str, ...] = ()
    threads: int = os.cpu_count() or 1
    warmup: int | None = None
    repeats: int | None = None
    shapes: Shapes = Shapes()
    gpu_recipe: bool = False
    recipe_dry_run: bool = False
    in_process: bool = False
    timeout: float = 900.0
    model_cache: Path | None = None
    profile: bool = False
    budget_s: float = 20.0
    variants: bool = False
    write_docs: bool | None = None
    """None: only a full default run writes docs (:func:`writes_docs`)."""
    docs: Path = DOCS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Speed, cost and scale of both backends: generation, SFT and PPO "
        "throughput, MFU, PPO phase times and peak memory (docs/performance.md).")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output directory for results.json / results.md (default: runs/bench)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model only, one timed repeat, short machine probe (~2 min)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated model sizes (tiny, small, micro); default small")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="only this backend's workloads (HF generate always runs as baseline)")
    p.add_argument("--variants", action="store_true",
                   help="every generation variant (SDPA, bf16, static, packed, compiled) and "
                   "the rollout-logprobs PPO rows at every size, not only the core rows and "
                   "the largest size's target rows (~10 minutes more on 2 cores)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="only tasks whose id matches (e.g. 'ppo/small/*'); repeatable")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads for torch (and XLA when 1); default: every core")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls first (default 2 for SFT steps, 1 elsewhere)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls (default 2: generation and SFT calls, PPO iterations; "
                   "1 quick)")
    p.add_argument("--budget", type=float, default=20.0, dest="budget_s", metavar="SECONDS",
                   help="stop timing a workload once its timed calls add up to this (at least "
                   "one call; default 20)")
    p.add_argument("--prompt-len", type=int, default=Shapes.prompt_len)
    p.add_argument("--answer-len", type=int, default=Shapes.answer_len)
    p.add_argument("--gpu-recipe", action="store_true",
                   help="DeepSpeed-Chat's OPT-1.3B + OPT-350m step-3 shapes on the GPU "
                   "(torch with the Hybrid Engine on and off, JAX); skipped without CUDA")
    p.add_argument("--recipe-dry-run", action="store_true",
                   help="with --gpu-recipe: run its code path on tiny OPT models on any device")
    p.add_argument("--in-process", action="store_true",
                   help="run every measurement in this process (faster; peak memory then "
                   "accumulates and is not per measurement)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before one measurement is abandoned (default 900)")
    p.add_argument("--model-cache", type=Path, default=None,
                   help="keep the random-weight model directories here and reuse them")
    p.add_argument("--profile", action="store_true",
                   help="after timing, run each workload once more under cProfile and write "
                   "<out>/profiles/<task>/*.txt and *.pstats (figures are unaffected)")
    p.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite the 'Latest run' section of --docs (between its bench "
                   "markers) from this run's results; default: only a full default run "
                   "(no --quick, --only, --sizes, --backend, --in-process, --gpu-recipe, ...) "
                   "does; a run stopped part-way never does")
    p.add_argument("--docs", type=Path, default=DOCS,
                   help="the page --write-docs writes (default docs/performance.md)")
    return p


def _options(args: Any) -> Options:
    def get(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    quick = bool(get("quick", False))
    sizes = get("sizes")
    sizes = tuple(s for s in sizes.split(",") if s) if isinstance(sizes, str) else sizes
    backend = get("backend")
    shapes = Shapes(prompt_len=get("prompt_len", Shapes.prompt_len),
                    answer_len=get("answer_len", Shapes.answer_len))
    return Options(
        out=Path(get("out", DEFAULT_OUT)), quick=quick,
        sizes=tuple(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)),
        backends=(backend,) if backend else BACKENDS, only=tuple(get("only", ())),
        threads=int(get("threads", os.cpu_count() or 1)), warmup=get("warmup"),
        repeats=get("repeats"), shapes=shapes, gpu_recipe=bool(get("gpu_recipe", False)),
        recipe_dry_run=bool(get("recipe_dry_run", False)),
        in_process=bool(get("in_process", False)), timeout=float(get("timeout", 900.0)),
        model_cache=Path(get("model_cache")) if get("model_cache") else None,
        profile=bool(get("profile", False)),
        budget_s=float(get("budget_s", 20.0)), variants=bool(get("variants", False)),
        write_docs=get("write_docs"),
        docs=Path(get("docs", DOCS)))


def writes_docs(options: Options) -> bool:
    """Whether the run rewrites docs/performance.md's "Latest run": as asked by
    ``--write-docs`` / ``--no-write-docs``, else only when it is the full default run (its
    command, ``--out`` aside, is plain ``python -m bench.run``, in isolated processes)."""
    if options.write_docs is not None:
        return options.write_docs
    return _command(dataclasses.replace(options, out=DEFAULT_OUT)) == "python -m bench.run"


def _warmup(options: Options, kind: str) -> int:
    # Two for SFT steps: the first timed step after one warm-up was measured 30-50 % slow
    # (allocator and optimizer-state warm-up); a PPO warm-up iteration already takes two steps.
    if options.warmup is not None:
        return options.warmup
    return 2 if kind == "sft" else 1


def _repeats(options: Options, kind: str) -> int:
    if options.repeats is not None:
        return options.repeats
    if options.quick:
        return 1
    return 2  # generation and SFT: 3 before make bench had 15 minutes (a median of 2 = mean)


def plan(options: Options, *, model_root: Path, work_root: Path) -> list[dict[str, Any]]:
    """The run's tasks in order: prepare, machine limits, the workloads, machine again."""
    if options.gpu_recipe:
        from bench.gpu_recipe import recipe_tasks

        return recipe_tasks(options, model_root=model_root, work_root=work_root)
    common = {"threads": options.threads, "model_root": str(model_root),
              "shapes": dataclasses.asdict(options.shapes), "budget_s": options.budget_s}
    every = options.variants or bool(options.only)  # --only picks from every task
    largest = next(s for s in (*TARGET_SIZE_ORDER, *options.sizes) if s in options.sizes)

    def wanted(size: str, impl: str) -> bool:
        return every or impl in CORE_IMPLEMENTATIONS or (
            size == largest and impl in TARGET_IMPLEMENTATIONS)

    workloads = []
    for size in options.sizes:
        for impl in IMPLEMENTATIONS:
            if (impl == "hf" or impl.split("_")[0] in options.backends) and wanted(size, impl):
                workloads.append({"id": f"generation/{size}/{impl}", "kind": "generation",
                                  "size": size, "backend": impl})
    for kind in ("sft", "ppo"):
        for size in options.sizes:
            for backend in options.backends:
                workloads.append({"id": f"{kind}/{size}/{backend}", "kind": kind, "size": size,
                                  "backend": backend})
    for size in options.sizes:  # conventions.old_logprobs rollout: no actor scoring forward
        for backend in options.backends if every or size == largest else ():
            workloads.append({"id": f"ppo/{size}/{backend}/rollout-logprobs", "kind": "ppo",
                              "size": size, "backend": backend, "old_logprobs": "rollout"})
    if options.only:
        workloads = [w for w in workloads
                     if any(fnmatch.fnmatchcase(w["id"], pattern) for pattern in options.only)]
    workloads = _pair_rollout_logprobs(workloads)
    for task in workloads:
        name = task["id"].replace("/", "-")
        task.update(common, warmup=_warmup(options, task["kind"]),
                    repeats=_repeats(options, task["kind"]), work_dir=str(work_root / name))
        if options.profile:
            task["profile_dir"] = str((options.out / "profiles" / name).resolve())
    sizes = sorted({w["size"] for w in workloads})
    machine = {"kind": "machine", "threads": options.threads, "quick": options.quick}
    return [{"id": "prepare", "kind": "prepare", "sizes": sizes, "threads": options.threads,
             "model_root": str(model_root)},
            {"id": "machine/start", **machine}, *workloads, {"id": "machine/end", **machine}]


def _pair_rollout_logprobs(workloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A rollout-log-probs PPO row whose recompute row is planned too runs in that row's
    process (``with_rollout_logprobs``: ``bench.timing.alternating_ppo_iterations``, the two
    rows' iterations alternating on one trainer, one plain reference for both); alone (an
    ``--only`` that picks it alone) it keeps its own process."""
    ids = {w["id"] for w in workloads}
    out = []
    for w in workloads:
        if w.get("old_logprobs") == "rollout" and w["id"].removesuffix("/rollout-logprobs") in ids:
            continue
        if w["kind"] == "ppo" and not w.get("old_logprobs") and \
                f"{w['id']}/rollout-logprobs" in ids:
            w = {**w, "with_rollout_logprobs": True,
                 "row_ids": [w["id"], f"{w['id']}/rollout-logprobs"]}
        out.append(w)
    return out


def _command(options: Options, task_id: str | list[str] | None = None) -> str:
    """The command line that reproduces the run (or one task of it: its row ids)."""
    parts = ["python", "-m", "bench.run"]
    if options.gpu_recipe:
        parts.append("--gpu-recipe")
        if options.recipe_dry_run:
            parts.append("--recipe-dry-run")
    if options.quick:
        parts.append("--quick")
    default_sizes = QUICK_SIZES if options.quick else DEFAULT_SIZES
    if options.sizes != default_sizes and not options.gpu_recipe:
        parts += ["--sizes", ",".join(options.sizes)]
    if len(options.backends) == 1:
        parts += ["--backend", options.backends[0]]
    if options.threads != (os.cpu_count() or 1):
        parts += ["--threads", str(options.threads)]
    if options.repeats is not None:
        parts += ["--repeats", str(options.repeats)]
    if options.warmup is not None:
        parts += ["--warmup", str(options.warmup)]
    if options.budget_s != 20.0:
        parts += ["--budget", f"{options.budget_s:g}"]
    if options.shapes.prompt_len != Shapes.prompt_len:
        parts += ["--prompt-len", str(options.shapes.prompt_len)]
    if options.shapes.answer_len != Shapes.answer_len:
        parts += ["--answer-len", str(options.shapes.answer_len)]
    if options.variants:
        parts.append("--variants")
    if options.in_process:
        parts.append("--in-process")
    if options.profile:
        parts.append("--profile")
    if task_id is not None:
        for one in [task_id] if isinstance(task_id, str) else task_id:
            parts += ["--only", one]
    elif options.only:
        for pattern in options.only:
            parts += ["--only", pattern]
    if options.out != DEFAULT_OUT:
        parts += ["--out", str(options.out)]
    return shlex.join(parts)


def _run_subprocess(task: dict[str, Any], directory: Path, timeout: float) -> dict[str, Any]:
    name = task["id"].replace("/", "-")
    task_file, result_file = directory / f"{name}.task.json", directory / f"{name}.result.json"
    log_file = directory / "logs" / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    task_file.write_text(json.dumps(task, indent=1))
    result_file.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, "-m", "bench.worker", str(task_file), str(result_file)]
    start = time.perf_counter()
    with log_file.open("w") as log:
        try:
            proc = subprocess.run(command, cwd=_REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, check=False)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    if result_file.exists():
        outcome = json.loads(result_file.read_text())
    else:
        tail = log_file.read_text()[-4000:] if log_file.exists() else ""
        why = (f"timed out after {timeout:.0f} s" if returncode is None
               else f"exited with status {returncode}")
        outcome = {"ok": False, "result": None, "error": f"worker {why}\n{tail}",
                   "wall_s": time.perf_counter() - start, "load_average": None}
    outcome["worker_command"] = shlex.join(command)
    outcome["log"] = str(log_file)
    return outcome


def _run_in_process(task: dict[str, Any]) -> dict[str, Any]:
    from bench.timing import PROFILE_ENV
    from bench.worker import execute

    if task.get("profile_dir"):
        os.environ[PROFILE_ENV] = task["profile_dir"]
    try:
        outcome = execute(task)
    finally:
        os.environ.pop(PROFILE_ENV, None)
    outcome["worker_command"] = None
    return outcome


def run(options: Options, *, command: str | None = None) -> dict[str, Any]:
    """Runs every task of :func:`plan`; writes and returns the results document.

    The results are rewritten after every task: a run stopped part-way (Ctrl-C, a crash)
    leaves ``results.json`` / ``results.md`` with what it measured, marked ``partial``, the
    tasks it did not reach in ``not_run`` and the exception in ``stopped_by``."""
    from bench.report import build_document, write_outputs

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=out))
    model_root = options.model_cache or scratch / "models"
    if options.in_process:
        from bench.machine import set_threads

        set_threads(options.threads, pin=False)  # never pin the caller's process
    tasks = plan(options, model_root=model_root, work_root=scratch / "work")
    started = time.perf_counter()
    load_start = load_average()
    outcomes: dict[str, dict[str, Any]] = {}
    print(f"bench: {len(tasks)} tasks, {options.threads} threads, load average "
          f"{load_start}, output {out}", flush=True)
    run_meter = CpuMeter()
    static = {"machine": machine_info(), "versions": library_versions(), "git": git_revision()}

    def write(stopped_by: str | None = None) -> dict[str, Any]:
        """results.json/.md of what ran so far: after every task, so a run that is
        interrupted or fails leaves what it measured (``partial``, ``not_run``)."""
        document = build_document(
            tasks, outcomes, command=command or _command(options), options=options,
            environment={**static, "threads": options.threads,
                         "load_average": {"start": load_start, "end": load_average()},
                         "cpu": run_meter.stop(),
                         "wall_time_s": time.perf_counter() - started,
                         "isolated_processes": not options.in_process})
        document["not_run"] = [t["id"] for t in tasks if t["id"] not in outcomes]
        document["partial"] = bool(document["not_run"])
        if stopped_by is not None:
            document["stopped_by"] = stopped_by
        write_outputs(document, out)
        return document

    try:
        for index, task in enumerate(tasks, 1):
            tick, meter = time.perf_counter(), CpuMeter()
            if options.in_process:
                outcome = _run_in_process(task)
            else:
                outcome = _run_subprocess(task, scratch, options.timeout)
            outcome["cpu"] = meter.stop()
            outcome["command"] = _command(options, None if task["kind"] in (
                "prepare", "machine") else task.get("row_ids", task["id"]))
            outcomes[task["id"]] = outcome
            status = "ok" if outcome["ok"] else "FAILED"
            share = outcome["cpu"]["other_cpu_share"]
            print(f"[{index}/{len(tasks)}] {task['id']}: {status} in "
                  f"{time.perf_counter() - tick:.1f} s (other processes: "
                  f"{'?' if share is None else f'{share:.0%}'} of the CPUs; load "
                  f"{load_average()})", flush=True)
            if not outcome["ok"]:
                print(outcome["error"].strip().splitlines()[-1] if outcome["error"] else "",
                      flush=True)
            document = write()
    except BaseException as exc:  # Ctrl-C included: keep what was measured
        write(stopped_by=f"{type(exc).__name__}: {exc}".rstrip(": "))
        print(f"bench: stopped ({type(exc).__name__}) after {len(outcomes)} of {len(tasks)} "
              f"tasks; partial results in {out / 'results.json'} and {out / 'results.md'}",
              file=sys.stderr, flush=True)
        raise
    finally:
        if not options.in_process:
            for log in (scratch / "logs").glob("*.log"):
                (out / "logs").mkdir(exist_ok=True)
                shutil.copy(log, out / "logs" / log.name)
        shutil.rmtree(scratch, ignore_errors=True)
    if writes_docs(options):
        _write_docs(options, document)
    return document


def _write_docs(options: Options, document: dict[str, Any]) -> None:
    """docs/performance.md's "Latest run" section from a finished run (never a partial one;
    a default-on write is skipped outside a checkout with the page)."""
    from bench.docs_writer import replace_section
    from bench.report import render_docs_section

    if document.get("partial"):
        print(f"bench: partial run, {options.docs} left as it was", flush=True)
        return
    if options.write_docs is None and not options.docs.exists():
        print(f"bench: no {options.docs} here; results only in {options.out}", flush=True)
        return
    replace_section(options.docs, "bench", render_docs_section(document))
    print(f"bench: rewrote the 'Latest run' section of {options.docs}", flush=True)


def main(config: Any = None, args: Any = None) -> int:
    """``rlhf bench``: runs the benchmark; ``args`` may carry ``out``, ``backend``, ``quick``
    and any other option of :func:`build_parser` (missing ones take their defaults).
    ``config`` is not used: the benchmark's models and shapes are its own, so figures from
    different configs stay comparable. Returns 0 when every measurement ran."""
    options = _options(args or argparse.Namespace())
    document = run(options)
    print(f"bench: wrote {options.out / 'results.json'} and {options.out / 'results.md'} "
          f"in {document['environment']['wall_time_s']:.0f} s")
    failed = [r["id"] for r in document["failures"]]
    if failed:
        print(f"bench: {len(failed)} measurement(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return main(None, args)


if __name__ == "__main__":
    sys.exit(cli())
