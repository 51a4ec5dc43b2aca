"""``rlhf plan --config F [--world-size N] [--device-memory GiB] [--json]``: the table.

Prints ``shared.plan``'s estimate: one row per model the run builds (weights, gradients,
optimiser, activations, KV cache, logits; the host's share in brackets), the device bytes at
the peak of each phase, the verdict against the device's memory less headroom, a CPU run's
expected process memory, and DeepSpeed-Chat's rule of thumb beside it (docs/plan.md).
"""

from __future__ import annotations

import json
from typing import Any

from shared.errors import InputError
from shared.plan import GIB, Plan, plan_config

__all__ = ["format_plan", "main"]

_COLUMNS = ("weights", "gradients", "optimizer", "buffers", "activations", "kv_cache",
            "logits")


def _gib(n: int) -> str:
    return "-" if n == 0 else f"{n / GIB:.3f}" if n < 10 * GIB else f"{n / GIB:.1f}"


def format_plan(plan: Plan) -> str:
    """The plan as a fixed-width table and a few verdict lines (GiB = 2^30 bytes)."""
    header = ["model", "params", *_COLUMNS, "total"]
    rows = []
    for m in plan.models:
        cells = [m.name, f"{m.params / 1e6:,.1f}M"]
        for key in _COLUMNS:
            cell = _gib(m.device[key])
            if m.host[key]:
                cell += f" (+{_gib(m.host[key])} host)"
            cells.append(cell)
        cells.append(_gib(sum(m.device.values())))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"rlhf plan: per-device memory in GiB, world size {plan.world_size}, "
             f"{plan.backend} backend",
             "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    lines.append("phases (device GiB): " + ", ".join(
        f"{k} {_gib(v)}" + (" (peak)" if k == plan.peak_phase else "")
        for k, v in plan.phases.items()))
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"verdict: {verdict}: peak {plan.peak_bytes / GIB:.2f} GiB "
                 f"({plan.peak_phase}) vs {plan.usable_bytes / GIB:.1f} GiB usable "
                 f"({plan.device_memory_gib:g} GiB less {plan.headroom:.0%} headroom)")
    if plan.host_bytes:
        lines.append(f"host (offloaded): {plan.host_bytes / GIB:.2f} GiB per device")
    lines.append(f"on CPU, one process: ~{plan.process_rss_bytes / GIB:.2f} GiB resident "
                 f"(framework baseline included)")
    rule = plan.rule_of_thumb()
    agree = "agrees" if rule["fits"] == plan.fits else "disagrees"
    lines.append(f"DeepSpeed-Chat's rule of thumb (actor + critic <= GB / 6): "
                 f"{rule['actor_critic_billions']:.3f}B vs {rule['limit_billions']:.1f}B: "
                 f"{'fits' if rule['fits'] else 'does not fit'} ({agree})")
    return "\n".join(lines)


def main(config: Any, args: Any) -> int:
    """``rlhf plan``: prints the table (or ``--json``); exit status 0 when it fits, 1 when
    it does not."""
    world = getattr(args, "world_size", 1)
    memory = getattr(args, "device_memory", 80.0)
    if world < 1:
        raise InputError(f"--world-size: {world} must be >= 1")
    if memory <= 0:
        raise InputError(f"--device-memory: {memory} must be > 0 (GiB)")
    plan = plan_config(config, world_size=world, device_memory_gib=memory)
    if getattr(args, "json", False):
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1
