"""Cost curves: PPO iteration time and peak memory against model size, batch, answer length
and ZeRO stage, a least-squares growth model, and ``rlhf plan``'s estimate against them.

``python -m bench.cost_curves [--out DIR] [--write-docs] [--model-cache DIR]``: every point is
one torch PPO iteration (``PPOTrainer`` on DeepSpeed, fp32, one warm-up iteration and one timed,
full-length answers) in a fresh process, whose peak resident memory (``getrusage`` max RSS) is the
measurement. On a CPU the device's memory *is* the process's, so the planner's figure compared
is ``Plan.process_rss_bytes``: the framework's baseline (``shared.plan.BASELINE_RSS_BYTES``,
re-measured here as the ``micro`` model's point, whose own bytes are under 1 MiB) plus the peak
phase plus the host share.

Fitted (least squares of the relative residuals over the ZeRO-0 points; N = parameters of one
model, T = rollout tokens B x (prompt + answer)):

- iteration time ~ a + b T + c N T (the points over 1M parameters)
- peak RSS ~ d + e N + f T

and ZeRO-3 as a factor on time and extra bytes against the ZeRO-0 point of the same model.

Writes ``<out>/cost_curves.json`` and ``<out>/cost_curves.md``; ``--write-docs`` also replaces
the section between the ``cost-curves`` markers of docs/performance.md
(``bench.docs_writer``). ``make bench`` runs it after ``bench.run``, both on one
``--model-cache`` (the tiny and small models are built once; they are the same checkpoints,
``parity_tests.harness.build_checkpoint`` with seeds 0 and 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.docs_writer import DOCS, replace_section
from bench.models import SIZES

__all__ = ["CURVE_SIZES", "fit", "main", "points"]

_REPO = Path(__file__).resolve().parent.parent
PROMPT_LEN = 32
CURVE_SIZES: dict[str, dict[str, Any]] = {
    "micro": SIZES["micro"],
    "tiny": SIZES["tiny"],
    # ~35M parameters: between tiny (10M) and small (100M).
    "medium": {**SIZES["tiny"], "vocab_size": 16384, "hidden_size": 512,
               "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 4},
    "small": SIZES["small"],
}


def points() -> list[dict[str, Any]]:
    """The measured points: one factor at a time around (tiny, batch 8, answer 32, ZeRO-0):
    the three sizes, batch 16 (at medium, between the other two), answer 64, ZeRO-3 (at tiny
    and medium); and the micro model, the framework's baseline. Eight points, ~2.5 minutes:
    ``make bench`` runs them (the 11 of before added batch 16 at every size and answer 64 at
    medium, another ~1.5 minutes, in a run that has 15 minutes in all)."""
    base = {"size": "tiny", "batch": 8, "answer": 32, "zero": 0}
    chosen = [{**base, "size": "micro"}]  # the baseline
    for size in ("tiny", "medium", "small"):
        chosen.append({**base, "size": size})
    chosen += [{**base, "size": "medium", "batch": 16}, {**base, "answer": 64},
               {**base, "zero": 3}, {**base, "size": "medium", "zero": 3}]
    return chosen


def _point_id(p: dict[str, Any]) -> str:
    return f"{p['size']}/b{p['batch']}/a{p['answer']}/z{p['zero']}"


def _config(point: dict[str, Any], work: Path, model_root: Path):
    from bench.workspace import Shapes, write_run_config

    shapes = Shapes(prompt_len=PROMPT_LEN, answer_len=point["answer"],
                    ppo_rollout_batch=point["batch"], ppo_minibatch=point["batch"] // 2)
    root = model_root / point["size"]
    engine = {"torch": {"actor_zero_stage": point["zero"], "critic_zero_stage": point["zero"]}}
    _, config = write_run_config(work, CURVE_SIZES[point["size"]], shapes,
                                 lm_dir=str(root / "lm"), value_dir=str(root / "value"),
                                 extra={"engine": engine})
    return config, shapes, str(root / "lm"), str(root / "value")


def _measure(task: dict[str, Any]) -> dict[str, Any]:
    """In the child: build the models (``prepare``) or run one point."""
    model_root = Path(task["model_root"])
    if task["kind"] == "prepare":
        from parity_tests.harness import build_checkpoint

        for size, config in CURVE_SIZES.items():
            for kind, seed in (("lm", 0), ("value", 1)):
                path = model_root / size / kind
                if not (path / "config.json").exists():
                    build_checkpoint(config, path, kind=kind, seed=seed, scale=None)
        return {}
    from bench.torch_workloads import ppo_iteration

    point = task["point"]
    config, shapes, lm, value = _config(point, Path(task["work_dir"]), model_root)
    out = ppo_iteration(config, Path(task["work_dir"]) / "run", lm, value, shapes,
                        vocab_size=CURVE_SIZES[point["size"]]["vocab_size"], warmup=1,
                        repeats=1, plain=False)
    return {"iteration_s": out["iterations"][0]["total_s"],
            "peak_rss_bytes": out["peak_rss_bytes"],
            "rss_after_load_bytes": out["rss_after_load_bytes"]}


def _run_child(task: dict[str, Any], scratch: Path, timeout: float) -> dict[str, Any]:
    task_file = scratch / "task.json"
    result_file = scratch / "result.json"
    task_file.write_text(json.dumps(task))
    result_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.cost_curves", "--child",
                           str(task_file), str(result_file)], cwd=_REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"cost curve task {task.get('point') or task['kind']} failed "
                           f"(status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result_file.read_text())


def _predict(point: dict[str, Any], model_root: Path, work: Path) -> dict[str, Any]:
    from shared.model_size import model_shape
    from shared.plan import plan_config

    config, *_ = _config(point, work, model_root)
    plan = plan_config(config, world_size=1, device_memory_gib=24.0)
    return {"params": model_shape(CURVE_SIZES[point["size"]]).params,
            "planned_rss_bytes": plan.process_rss_bytes, "planned_peak_phase": plan.peak_phase,
            "planned_device_bytes": plan.peak_bytes}


def _relative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of the relative residuals (each row weighted by 1 / y): a fit that is as
    good for a 1 s point as for a 10 s one."""
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    return coef


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The growth models (module doc), fitted on the ZeRO-0 points (the time model on the
    points with over 1M parameters: the micro point measures the baseline); ZeRO-3 as its
    factor on time and extra bytes against the ZeRO-0 point of the same model and shapes.
    Residuals are relative, for every row (None where a row is not in a model)."""
    n = np.array([r["params"] for r in rows], float)
    tokens = np.array([r["batch"] * (PROMPT_LEN + r["answer"]) for r in rows], float)
    seconds = np.array([r["iteration_s"] for r in rows], float)
    rss = np.array([r["peak_rss_bytes"] for r in rows], float)
    zero0 = np.array([r["zero"] == 0 for r in rows])
    timed = zero0 & (n > 1e6)
    time_x = np.stack([np.ones_like(n), tokens, n * tokens], 1)
    mem_x = np.stack([np.ones_like(n), n, tokens], 1)
    a, b, c = _relative_lstsq(time_x[timed], seconds[timed])
    d, e, f = _relative_lstsq(mem_x[zero0], rss[zero0])
    time_res = (seconds - time_x @ [a, b, c]) / seconds
    mem_res = (rss - mem_x @ [d, e, f]) / rss
    same = {(r["size"], r["batch"], r["answer"]): r for r in rows if r["zero"] == 0}
    zero3 = [{"size": r["size"], "time_factor": r["iteration_s"] / base["iteration_s"],
              "extra_bytes": r["peak_rss_bytes"] - base["peak_rss_bytes"]}
             for r in rows if r["zero"] == 3
             and (base := same.get((r["size"], r["batch"], r["answer"]))) is not None]
    return {"time": {"a_s": a, "b_s_per_token": b, "c_s_per_param_token": c,
                     "relative_residuals": [float(x) if t else None
                                            for x, t in zip(time_res, timed, strict=True)]},
            "memory": {"d_bytes": d, "e_bytes_per_param": e, "f_bytes_per_token": f,
                       "relative_residuals": [float(x) if z else None
                                              for x, z in zip(mem_res, zero0, strict=True)]},
            "zero3": zero3}


def _markdown(document: dict[str, Any]) -> str:
    rows, f = document["rows"], document["fit"]
    mib = 2**20
    lines = [
        f"Measured by `python -m bench.cost_curves --write-docs` (the last stage of `make bench`) "
        f"in {document['wall_s']:.0f} s "
        f"({document['machine']}; git {document['git'][:10]}). Torch backend, fp32, one PPO "
        f"iteration per point (prompt {PROMPT_LEN}, rollout batch B, 2 actor + critic steps "
        "of B/2 rows), each point in its own process; peak RSS is that process's max RSS.",
        "",
        "| model | params | batch | answer | ZeRO | iteration s | rollout tokens/s | "
        "peak RSS MiB | planned MiB | planned − measured | time fit residual | "
        "memory fit residual |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    def pct(value):
        return "—" if value is None else f"{value:+.1%}"

    for r, tres, mres in zip(rows, f["time"]["relative_residuals"],
                             f["memory"]["relative_residuals"], strict=True):
        tokens = r["batch"] * r["answer"] / r["iteration_s"]
        error = (r["planned_rss_bytes"] - r["peak_rss_bytes"]) / r["peak_rss_bytes"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['answer']} | "
            f"{r['zero']} | {r['iteration_s']:.2f} | {tokens:.0f} | "
            f"{r['peak_rss_bytes'] / mib:.0f} | {r['planned_rss_bytes'] / mib:.0f} | "
            f"{error:+.1%} | {pct(tres)} | {pct(mres)} |")
    t, m = f["time"], f["memory"]
    errors = [abs(r["planned_rss_bytes"] - r["peak_rss_bytes"]) / r["peak_rss_bytes"]
              for r in rows]

    def worst(residuals):
        return max(abs(x) for x in residuals if x is not None)

    zero3 = "; ".join(f"{z['size']} × {z['time_factor']:.2f} time, "
                      f"+{z['extra_bytes'] / mib:.0f} MiB" for z in f["zero3"])
    lines += [
        "",
        f"- time fit (ZeRO-0, the points over 1M parameters): iteration s ≈ {t['a_s']:.2f} + "
        f"{t['b_s_per_token'] * 1e3:.3f} ms · T + {t['c_s_per_param_token'] * 1e12:.1f}e-12 "
        "s · N · T (N parameters of one model, T = B · (prompt + answer) rollout tokens: a "
        "fixed cost, a per-token cost of the layers that do not grow with N, the matmuls); "
        f"largest residual {worst(t['relative_residuals']):.1%}.",
        f"- memory fit (ZeRO-0): peak RSS ≈ {m['d_bytes'] / mib:.0f} MiB + "
        f"{m['e_bytes_per_param']:.1f} B · N + {m['f_bytes_per_token'] / 1024:.0f} KiB · T; "
        f"largest residual {worst(m['relative_residuals']):.1%}.",
        f"- ZeRO-3 against ZeRO-0 on one process (same model and shapes): {zero3 or 'no pair'}."
        " On one process ZeRO-3 partitions nothing away and adds its gathers, hooks and "
        "buffers (docs/plan.md).",
        f"- `rlhf plan` (process RSS = baseline {document['baseline_bytes'] / mib:.0f} MiB "
        "+ peak phase + host) against the measured peak: largest error "
        f"{max(errors):.0%}, mean {np.mean(errors):.0%}; the micro point measures the "
        f"baseline ({document['measured_baseline_bytes'] / mib:.0f} MiB).",
    ]
    return "\n".join(lines)


def write_docs(markdown: str, path: Path = DOCS) -> None:
    """Replaces the text between the cost-curves markers of ``path``."""
    replace_section(path, "cost-curves", markdown)


def run(out: Path, *, timeout: float = 300.0, only: tuple[str, ...] = (),
        model_cache: Path | None = None) -> dict[str, Any]:
    """Measures every point (module doc), fits, compares with the planner; returns and writes
    the document (``<out>/cost_curves.json`` and ``.md``). ``model_cache``: where the models
    are built, or found from an earlier run (``bench.run --model-cache``)."""
    from bench.machine import git_revision, machine_info
    from shared.plan import BASELINE_RSS_BYTES

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    chosen = [p for p in points() if not only or _point_id(p) in only]
    with tempfile.TemporaryDirectory(prefix="cost-curves-", dir=out) as tmp:
        scratch = Path(tmp)
        model_root = model_cache or scratch / "models"
        _run_child({"kind": "prepare", "model_root": str(model_root)}, scratch, timeout)
        rows = []
        for i, point in enumerate(chosen, 1):
            work = scratch / "work" / _point_id(point).replace("/", "-")
            tick = time.perf_counter()
            measured = _run_child({"kind": "point", "point": point, "model_root":
                                   str(model_root), "work_dir": str(work)}, scratch, timeout)
            rows.append({**point, **measured, **_predict(point, model_root, work / "plan")})
            print(f"[{i}/{len(chosen)}] {_point_id(point)}: {measured['iteration_s']:.2f} s, "
                  f"peak RSS {measured['peak_rss_bytes'] / 2**20:.0f} MiB, planned "
                  f"{rows[-1]['planned_rss_bytes'] / 2**20:.0f} MiB "
                  f"({time.perf_counter() - tick:.0f} s)", flush=True)
    machine = machine_info()
    baseline = next((r["peak_rss_bytes"] for r in rows if r["size"] == "micro"), None)
    document = {"rows": rows, "fit": fit(rows), "wall_s": time.perf_counter() - start,
                "baseline_bytes": BASELINE_RSS_BYTES["torch"],
                "measured_baseline_bytes": baseline or 0,
                "machine": f"{machine.get('processor') or 'CPU'}, {machine.get('cpu_count')} cores",
                "git": (git_revision() or {}).get("commit", "") or ""}
    document["markdown"] = _markdown(document)
    (out / "cost_curves.json").write_text(json.dumps(document, indent=1, default=float))
    (out / "cost_curves.md").write_text(document["markdown"] + "\n")
    return document


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        from bench.machine import set_threads

        task = json.loads(Path(argv[1]).read_text())
        set_threads(os.cpu_count() or 1)  # before torch is imported
        Path(argv[2]).write_text(json.dumps(_measure(task)))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.cost_curves", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--write-docs", action="store_true",
                   help="also write the results into docs/performance.md (between markers)")
    p.add_argument("--docs", type=Path, default=DOCS, help="the page --write-docs writes")
    p.add_argument("--model-cache", type=Path, default=None,
                   help="build the models here, or reuse those built there already (e.g. by "
                   "bench.run --model-cache)")
    p.add_argument("--only", action="append", default=[], metavar="POINT",
                   help="only this point id (e.g. tiny/b8/a32/z0); repeatable")
    args = p.parse_args(argv)
    document = run(args.out, only=tuple(args.only), model_cache=args.model_cache)
    print(document["markdown"])
    if args.write_docs:
        write_docs(document["markdown"], args.docs)
    print(f"cost curves: {len(document['rows'])} points in {document['wall_s']:.0f} s; wrote "
          f"{args.out / 'cost_curves.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
