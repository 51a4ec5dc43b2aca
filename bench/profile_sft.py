"""Where a torch SFT step's time goes, by operator: ``torch.profiler`` over the trainer's step.

``python -m bench.profile_sft [--size small]`` builds the benchmark's SFT trainer (DeepSpeed
ZeRO-0, fp32, batch 8 x 128 tokens), warms it up, times a few ``SFTTrainer.train_step`` calls
and prints the operators that took the most self CPU time in one more, profiled, step; the
share left outside ``aten::mm`` / ``aten::bmm`` is what the framework and the non-matmul layers
cost. docs/performance.md quotes it (before and after the fixes it led to). No pass/fail.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bench.models import SIZES, build_model_dirs
from bench.timing import time_calls
from bench.workspace import Shapes, sft_batch, write_run_config

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_sft",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=20, help="operators listed")
    p.add_argument("--model-cache", type=Path, default=None)
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from torch_rlhf.deepspeed_config import init_distributed
    from torch_rlhf.sft import SFTTrainer

    for name in ("DeepSpeed", "deepspeed", "torch_rlhf", "shared"):
        logging.getLogger(name).setLevel(logging.WARNING)
    shapes = Shapes()
    with tempfile.TemporaryDirectory() as scratch:
        dirs = build_model_dirs(args.size, args.model_cache or Path(scratch) / "models")
        _, config = write_run_config(Path(scratch) / "work", SIZES[args.size], shapes,
                                     lm_dir=dirs["lm"], value_dir=dirs["value"])
        init_distributed()
        trainer = SFTTrainer(config, run_dir=Path(scratch) / "run",
                             model_name_or_path=dirs["lm"])
        batch = sft_batch(shapes.sft_batch, shapes, SIZES[args.size]["vocab_size"])
        timing = time_calls(lambda: trainer.train_step(batch), warmup=2, repeats=args.repeats)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::bmm"))
    print(f"SFT train_step, {args.size}, batch {shapes.sft_batch} x {shapes.seq_len}, "
          f"{torch.get_num_threads()} threads: median {timing['median_s']:.2f} s; "
          f"profiled step: {total / 1e6:.2f} s self CPU, {matmul / total:.0%} in aten::mm/bmm")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
