"""PNG curves of a run's ``metrics.jsonl``, and of several runs overlaid.

    plot_run("runs/demo")                        # -> runs/demo/plots/{sft,reward,ppo}.png ...
    plot_runs(["runs/torch", "runs/jax"], "plots-compare")

Each step (``sft``, ``reward``, ``ppo``) gets one PNG: a grid of panels, one per kind of
figure that step logged (losses, reward, KL, clip fractions, learning rates, phase times,
...), each titled with its axes labelled. Eval records (``eval_*``, logged every
``eval_interval``) are drawn with markers on the training curves they belong to; the
held-out metric (``heldout_*``, logged once at the end of a step) is a marked point, and
``heldout.png`` shows it after each step side by side (from ``summary.json``). A series that
is 0 throughout (``skipped_steps``, ``ptx_loss`` without ptx) is left out and named in the
figure's footnote. Long noisy curves are drawn faintly with a smoothed line over them.

matplotlib is imported only when a plot is drawn, on the Agg canvas (no display, no pyplot
state). ``rlhf plot`` calls these; each step of a training run calls ``plot_run`` for
itself through ``RunLogger.finish_step`` (a failure there is only a warning).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import InputError

__all__ = ["PANELS", "Panel", "group_panels", "plot_run", "plot_runs", "read_metrics",
           "run_label", "safe_plot_run"]

logger = logging.getLogger(__name__)

STEP_ORDER = ("sft", "reward", "dpo", "ppo")
_NOT_METRICS = ("step", "time", "iteration", "index")
_X_LABEL = {"sft": "optimizer step", "reward": "optimizer step", "dpo": "optimizer step",
            "ppo": "PPO iteration"}
_STEP_TITLE = {"sft": "step 1: SFT", "reward": "step 2: reward model", "dpo": "DPO",
               "ppo": "step 3: PPO"}
_SMOOTH_FROM = 40  # points; longer curves get a smoothed line over the raw one
_NOT_SMOOTHED = ("Learning rate", "KL coefficient", "Skipped steps")  # schedules, counters
_MAX_PANELS = 16


@dataclass(frozen=True)
class Panel:
    """One panel: its title, y label, and the metric names drawn in it."""

    title: str
    ylabel: str
    keys: tuple[str, ...]


def _base(key: str) -> str:
    """``eval_loss`` -> ``loss``: eval figures share the panel of their training figure."""
    return key.removeprefix("eval_")


# (title, y label, rule) in display order; the first rule a key matches places it.
PANELS: tuple[tuple[str, str, Any], ...] = (
    ("Loss", "loss", lambda k: _base(k) in ("loss", "actor_loss", "pg_loss", "ptx_loss")
     or (_base(k).endswith("loss") and "critic" not in k and "value" not in k)),
    ("Critic loss", "loss", lambda k: k.endswith("loss")),
    ("Perplexity", "perplexity", lambda k: "perplexity" in k),
    ("Reward", "reward", lambda k: k in ("reward_score", "returns_mean", "advantages_mean")
     or _base(k) in ("reward", "rewards", "score", "reward_mean")),
    ("Reward-model scores", "score", lambda k: _base(k) in ("chosen_score", "rejected_score")
     or k.endswith("_margin")),
    ("Pair accuracy", "accuracy", lambda k: _base(k) == "accuracy"),
    ("Held-out metric", "score", lambda k: k.startswith("heldout")),
    ("KL", "KL", lambda k: k in ("kl", "approx_kl") or (k.endswith("_kl") and "coef" not in k)),
    ("KL coefficient", "coefficient", lambda k: "kl_coef" in k),
    ("Clip fractions", "fraction", lambda k: "clip_fraction" in k),
    ("Entropy", "nats / token", lambda k: "entropy" in k),
    ("Gradient norms", "norm (before clipping)", lambda k: k.endswith("grad_norm")),
    ("Learning rate", "learning rate", lambda k: k == "lr" or k.endswith("_lr")),
    ("Answers", "tokens / count", lambda k: k in ("response_length", "short_answers")),
    ("Phase times", "seconds", lambda k: k.endswith("_time")),
    ("Tokens", "tokens", lambda k: k == "tokens" or k.endswith("_tokens")),
    ("Rollout log-prob gap", "max |gap|", lambda k: "logprob_gap" in k),
    ("Skipped steps", "count", lambda k: k == "skipped_steps"),
)


def group_panels(keys: Iterable[str]) -> list[Panel]:
    """The panels ``keys`` fall into, in ``PANELS`` order; a key no rule places gets a panel
    of its own (at most ``_MAX_PANELS`` panels in all)."""
    placed: dict[str, list[str]] = {}
    extra: list[Panel] = []
    for key in sorted(set(keys)):
        for title, _, rule in PANELS:
            if rule(key):
                placed.setdefault(title, []).append(key)
                break
        else:
            extra.append(Panel(key.replace("_", " "), key, (key,)))
    panels = [Panel(title, ylabel, tuple(placed[title])) for title, ylabel, _ in PANELS
              if title in placed]
    panels += extra
    if len(panels) > _MAX_PANELS:
        left = [k for p in panels[_MAX_PANELS:] for k in p.keys]
        logger.info("plots: %d more metrics not drawn: %s", len(left), ", ".join(left))
    return panels[:_MAX_PANELS]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (a line that is not a JSON object is skipped
    with a warning). ``InputError`` when ``run_dir`` is not a run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise InputError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not a JSON record; skipped", path, number)
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def run_label(run_dir: str | Path) -> str:
    """``<dir name> (<backend>)``, the backend from ``summary.json`` when it names one."""
    run_dir = Path(run_dir)
    backend = _summary(run_dir).get("backend")
    return f"{run_dir.resolve().name} ({backend})" if backend else run_dir.resolve().name


def _series(records: Sequence[dict[str, Any]], step: str) -> dict[str, tuple[list, list]]:
    """metric -> (x, y) of ``step``'s records, finite numbers only, in x order."""
    out: dict[str, tuple[list, list]] = {}
    for record in records:
        if record.get("step") != step:
            continue
        x = record.get("iteration", record.get("index"))
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            continue
        for key, value in record.items():
            if key in _NOT_METRICS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                xs, ys = out.setdefault(key, ([], []))
                xs.append(x)
                ys.append(value)
    for key, (xs, ys) in out.items():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        out[key] = ([xs[i] for i in order], [ys[i] for i in order])
    return out


def _steps(records: Sequence[dict[str, Any]]) -> list[str]:
    seen = list(dict.fromkeys(str(r["step"]) for r in records))
    return [s for s in STEP_ORDER if s in seen] + [s for s in seen if s not in STEP_ORDER]


def _smooth(ys: Sequence[float]) -> list[float]:
    """A centred moving mean over about 1/12 of the points (at least 5; narrower at the ends),
    so the smoothed curve does not lag the raw one."""
    half = max(5, len(ys) // 12) // 2
    sums = [0.0]
    for y in ys:
        sums.append(sums[-1] + y)
    out = []
    for i in range(len(ys)):
        lo, hi = max(0, i - half), min(len(ys), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def _figure(panels: int, *, extra_height: float = 0.0):
    from matplotlib.figure import Figure

    ncols = 1 if panels == 1 else 2 if panels in (2, 4) else 3
    nrows = -(-panels // ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.5 * nrows + 0.9 + extra_height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


_STYLES = ("-", "--", ":", "-.")


def _draw(ax, xs: list, ys: list, *, color, label: str | None, style: str = "-",
          faint_raw: bool = True, smooth: bool = True) -> None:
    """One series: markers for a few points (their values written beside up to 3 of them), a
    line (with a smoothed line over a faint raw one when long) otherwise."""
    if len(xs) <= 12:
        ax.plot(xs, ys, style, marker="o", markersize=4, color=color, label=label)
        if len(xs) <= 3:
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8, color=color)
    elif smooth and len(xs) >= _SMOOTH_FROM:
        if faint_raw:
            ax.plot(xs, ys, style, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(ys), style, color=color, linewidth=1.6, label=label)
    else:
        ax.plot(xs, ys, style, color=color, linewidth=1.4, label=label)


def _finish_axes(ax, panel: Panel, xlabel: str, values: Sequence[float] = ()) -> None:
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(panel.ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if panel.title == "Phase times" and values and min(values) > 0 \
            and max(values) > 20 * sorted(values)[len(values) // 2]:
        ax.set_yscale("log")  # a first iteration that compiles would flatten the rest
        ax.set_ylabel(f"{panel.ylabel} (log scale)", fontsize=9)
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)


def _drop_zero(series: dict[str, tuple[list, list]]) -> tuple[dict, list[str]]:
    kept = {k: v for k, v in series.items() if any(y != 0 for y in v[1])}
    return kept, sorted(set(series) - set(kept))


def _drop_flat(series: dict[str, tuple[list, list]]) -> tuple[dict, str]:
    """``series`` without those 0 throughout or constant (2 points or more), and the footnote
    naming them."""
    kept, zero = _drop_zero(series)
    constant = {k: v[1][0] for k, v in kept.items() if len(v[1]) > 1 and len(set(v[1])) == 1}
    notes = []
    if zero:
        notes.append("0 throughout: " + ", ".join(zero))
    if constant:
        notes.append("constant: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(constant.items())))
    return ({k: v for k, v in kept.items() if k not in constant},
            ("not drawn: " + "; ".join(notes)) if notes else "")


def _save(fig, path: Path, panels: Sequence[Panel]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(partial, dpi=100, metadata={
        "Title": path.stem, "Software": "rlhf plot",
        "Description": "panels: " + "; ".join(p.title for p in panels)})
    partial.replace(path)
    return path


def _plot_step(run_dir: Path, records: Sequence[dict[str, Any]], step: str,
               out: Path) -> Path | None:
    from matplotlib import colormaps

    series, note = _drop_flat(_series(records, step))
    if not series:
        return None
    xs = [x for xs, _ in series.values() for x in xs]
    span = (min(xs) - 0.03 * (max(xs) - min(xs) or 1), max(xs) + 0.06 * (max(xs) - min(xs) or 1))
    series.update(_heldout_points(run_dir, step, max(xs)))
    panels = group_panels(series)
    fig, axes = _figure(len(panels))
    colors = colormaps["tab10"].colors
    for ax, panel in zip(axes, panels, strict=True):
        bases = list(dict.fromkeys(_base(k) for k in panel.keys))  # eval_x: the colour of x
        for key in panel.keys:
            xs, ys = series[key]
            _draw(ax, xs, ys, color=colors[bases.index(_base(key)) % len(colors)], label=key,
                  smooth=panel.title not in _NOT_SMOOTHED)
        _finish_axes(ax, panel, _X_LABEL.get(step, "iteration"),
                     [y for k in panel.keys for y in series[k][1]])
        if panel.title == "Held-out metric":  # end points: on the step's axis, from 0
            ax.set_xlim(*span)
            before = _heldout_before(run_dir, step)  # the earlier steps' figures, dashed
            for key in panel.keys:
                for label, value in before.get(key.removeprefix("heldout_"), []):
                    ax.axhline(value, linestyle="--", linewidth=1, alpha=0.7,
                               color=colors[bases.index(_base(key)) % len(colors)],
                               label=f"{key} {label}")
            top = max([y for k in panel.keys for y in series[k][1]]
                      + [v for pairs in before.values() for _, v in pairs])
            ax.set_ylim(0, 1.1 if 0 < top <= 1 else max(top * 1.2, 1e-9))
        if len(panel.keys) > 1 or panel.keys[0].replace("_", " ") != panel.title:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{run_label(run_dir)}: {_STEP_TITLE.get(step, step)}", fontsize=13)
    if note:
        fig.supxlabel(note, fontsize=8, color="0.35", x=0.01, ha="left")
    return _save(fig, out / f"{step}.png", panels)


def _heldout_points(run_dir: Path, step: str, x: float) -> dict[str, tuple[list, list]]:
    """``summary.json``'s held-out metric of ``step`` as one-point series at ``x`` (its last
    logged index): ``heldout_<metric>``, ``heldout_ema_<metric>``."""
    entry = _summary(run_dir).get(step)
    points = {}
    for key in ("heldout", "heldout_ema") if isinstance(entry, dict) else ():
        values = entry.get(key)
        for name, value in (values.items() if isinstance(values, dict) else ()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                points[f"{key}_{name}"] = ([x], [float(value)])
    return points


def _heldout_before(run_dir: Path, step: str) -> dict[str, list[tuple[str, float]]]:
    """metric -> [("after <earlier step>", value)] from ``summary.json``."""
    earlier = STEP_ORDER[:STEP_ORDER.index(step)] if step in STEP_ORDER else ()
    out: dict[str, list[tuple[str, float]]] = {}
    for label, values in _heldout_table(run_dir).items():
        if label.split(" ")[1] in earlier and "(EMA)" not in label:
            for name, value in values.items():
                out.setdefault(name, []).append((label, value))
    return out


def _heldout_table(run_dir: Path) -> dict[str, dict[str, float]]:
    """``{"after sft": {metric: value}, "after ppo": ..., "after ppo (EMA)": ...}`` from
    ``summary.json``."""
    summary = _summary(run_dir)
    table: dict[str, dict[str, float]] = {}
    for step in [*STEP_ORDER, *(s for s in summary if s not in STEP_ORDER)]:
        entry = summary.get(step)
        if not isinstance(entry, dict):
            continue
        for key, label in (("heldout", f"after {step}"), ("heldout_ema", f"after {step} (EMA)")):
            values = entry.get(key)
            if isinstance(values, dict):
                numbers = {k: float(v) for k, v in values.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
                if numbers:
                    table[label] = numbers
    return table


def _bars(ax, groups: list[str], values, colors, labels) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per ``labels`` entry."""
    width = 0.8 / max(len(labels), 1)
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))]
        ys = [values(label, g) for g in groups]
        drawn = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if not drawn:
            continue
        bars = ax.bar([x for x, _ in drawn], [y for _, y in drawn], width * 0.95,
                      color=colors[j % len(colors)], label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(groups)), groups, fontsize=9)


def _plot_heldout(run_dirs: Sequence[Path], labels: Sequence[str], path: Path) -> Path | None:
    """Held-out metric after each step; one bar colour per run (per metric for one run)."""
    from matplotlib import colormaps

    tables = [_heldout_table(d) for d in run_dirs]
    metrics = sorted({m for t in tables for row in t.values() for m in row})
    if not metrics:
        return None
    stages = list(dict.fromkeys(stage for t in tables for stage in t))
    colors = colormaps["tab10"].colors
    panels = [Panel(f"Held-out {m}", m, (m,)) for m in metrics]
    fig, axes = _figure(len(panels))
    for ax, metric in zip(axes, metrics, strict=True):
        def value(label, stage, metric=metric):
            return tables[labels.index(label)].get(stage, {}).get(metric)

        _bars(ax, stages, value, colors, list(labels))
        ax.set_title(f"Held-out {metric}", fontsize=11)
        ax.set_ylabel(metric, fontsize=9)
        ax.set_xlabel("model", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        top = max((v for t in tables for row in t.values() for k, v in row.items()
                   if k == metric), default=1.0)
        ax.set_ylim(0, 1.08 if 0 < top <= 1 else max(top * 1.15, 1e-9))
        if len(labels) > 1:
            ax.legend(fontsize=8, loc="lower right")
    title = labels[0] if len(labels) == 1 else f"{len(labels)} runs"
    fig.suptitle(f"{title}: held-out metric after each step", fontsize=13)
    return _save(fig, path, panels)


def plot_run(run_dir: str | Path, *, steps: Iterable[str] | None = None,
             out_dir: str | Path | None = None) -> list[Path]:
    """Write ``<run_dir>/plots/<step>.png`` for each step in ``metrics.jsonl`` (or only
    ``steps``) and ``heldout.png`` when ``summary.json`` holds a held-out metric; returns the
    paths written. ``InputError`` when ``run_dir`` holds no ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    wanted = set(steps) if steps is not None else None
    written = []
    for step in _steps(records):
        if wanted is None or step in wanted:
            path = _plot_step(run_dir, records, step, out)
            if path is not None:
                written.append(path)
    heldout = _plot_heldout([run_dir], [run_label(run_dir)], out / "heldout.png")
    if heldout is not None:
        written.append(heldout)
    return written


def _unique_labels(run_dirs: Sequence[Path]) -> list[str]:
    labels = [run_label(d) for d in run_dirs]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:  # same dir name: prefix the parent
            labels[i] = f"{run_dirs[i].resolve().parent.name}/{label}"
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} #{i + 1}"
    return labels


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Overlay several runs: ``<out_dir>/compare-<step>.png`` per step any of them logged
    (one colour per run, named ``<dir name> (<backend>)`` in the legend; line styles tell a
    panel's metrics apart) and ``compare-heldout.png``; returns the paths written."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    dirs = [Path(d) for d in run_dirs]
    runs = [read_metrics(d) for d in dirs]
    labels = _unique_labels(dirs)
    out = Path(out_dir)
    colors = colormaps["tab10"].colors
    written = []
    steps = list(dict.fromkeys(s for records in runs for s in _steps(records)))
    steps = [s for s in STEP_ORDER if s in steps] + [s for s in steps if s not in STEP_ORDER]
    for step in steps:
        series = [_drop_zero(_series(records, step))[0] for records in runs]
        keys = {k for s in series for k in s}
        if not keys:
            continue
        panels = group_panels(keys)
        fig, axes = _figure(len(panels), extra_height=0.3)
        for ax, panel in zip(axes, panels, strict=True):
            bases = list(dict.fromkeys(_base(k) for k in panel.keys))  # eval_x: x's style
            for r, run_series in enumerate(series):
                for key in panel.keys:
                    if key in run_series:
                        xs, ys = run_series[key]
                        i = bases.index(_base(key))
                        _draw(ax, xs, ys, color=colors[r % len(colors)], label=None,
                              style=_STYLES[i % len(_STYLES)], faint_raw=len(series) <= 2,
                              smooth=panel.title not in _NOT_SMOOTHED)
            _finish_axes(ax, panel, _X_LABEL.get(step, "iteration"),
                         [y for s in series for k in panel.keys if k in s for y in s[k][1]])
            if len(bases) > 1:
                ax.legend([Line2D([], [], color="0.3", linestyle=_STYLES[i % len(_STYLES)])
                           for i in range(len(bases))], bases, fontsize=8, loc="best")
        fig.legend([Line2D([], [], color=colors[r % len(colors)], linewidth=2.5)
                    for r in range(len(labels))], labels, loc="outside lower center",
                   ncols=min(len(labels), 4), fontsize=10)
        fig.suptitle(f"{_STEP_TITLE.get(step, step)}: {len(labels)} runs", fontsize=13)
        written.append(_save(fig, out / f"compare-{step}.png", panels))
    heldout = _plot_heldout(dirs, labels, out / "compare-heldout.png")
    if heldout is not None:
        written.append(heldout)
    return written


def safe_plot_run(run_dir: str | Path, *, steps: Iterable[str] | None = None) -> list[Path]:
    """``plot_run`` for a training run: a failure (matplotlib missing, a full disk, a bug
    here) is logged as a warning and never fails the run."""
    try:
        paths = plot_run(run_dir, steps=steps)
    except Exception as exc:  # noqa: BLE001 (plots must never fail a training run)
        logger.warning("plots of %s not written (%s: %s); the run goes on; `rlhf plot %s` "
                       "retries", run_dir, type(exc).__name__, exc, run_dir)
        return []
    if paths:
        logger.info("plots: %s", ", ".join(str(p) for p in paths))
    return paths

