"""The PPO scoring phase with and without the actor's forward (``conventions.old_logprobs``
recompute vs rollout), timed alternately in one process:
``python -m bench.scoring_ab {torch|jax} {tiny|small} [--repeats N] [--model-cache DIR]
[--work DIR]``.

Separate bench processes on a loaded machine differ by more than the effect; alternating
calls on one trainer, one rollout, cancel the drift. Models come from ``--model-cache`` (built
there when missing, as ``python -m bench.run --model-cache DIR`` does); prints the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.models import SIZES, build_model_dirs
from bench.workspace import Shapes, prompt_batch, write_run_config


def _trainer(backend: str, config, work: Path, root: Path):
    paths = {"actor_model_name_or_path": str(root / "lm"),
             "critic_model_name_or_path": str(root / "value")}
    if backend == "torch":
        from torch_rlhf.deepspeed_config import init_distributed
        from torch_rlhf.ppo import PPOTrainer

        init_distributed()
        return PPOTrainer(config, run_dir=work / "run", **paths)
    from jax_rlhf.sharding import make_mesh
    from jax_rlhf.train.common import RunContext, load_tokenizer
    from jax_rlhf.train.ppo import PPOTrainer
    from shared.runlog import RunLogger, prepare_run_dir

    run_dir = prepare_run_dir(config, run_dir=work / "run", resume=False)
    ctx = RunContext(config, run_dir, RunLogger(run_dir, enable_tensorboard=False),
                     make_mesh(config.engine.jax.mesh), load_tokenizer(config))
    return PPOTrainer(config, run_dir=run_dir, ctx=ctx, **paths)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scoring_ab", description=__doc__)
    p.add_argument("backend", choices=("torch", "jax"))
    p.add_argument("size", choices=[k for k in SIZES if k != "micro"])  # micro: smoke shapes
    p.add_argument("--repeats", type=int, default=3, help="alternating pairs timed (default 3)")
    p.add_argument("--model-cache", type=Path, default=Path("runs/bench/models"),
                   help="where the bench models are (built there when missing; the layout "
                        "of `python -m bench.run --model-cache DIR`; default runs/bench/models)")
    p.add_argument("--work", type=Path, default=Path("runs/bench/scoring_ab"),
                   help="scratch run directory (default runs/bench/scoring_ab)")
    args = p.parse_args(argv)
    backend, size, repeats = args.backend, args.size, args.repeats
    build_model_dirs(size, args.model_cache)
    shapes, root = Shapes(), args.model_cache / size
    work = args.work / f"{backend}-{size}"
    _, config = write_run_config(work, SIZES[size], shapes, lm_dir=str(root / "lm"),
                                 value_dir=str(root / "value"))
    trainer = _trainer(backend, config, work, root)
    prompts = prompt_batch(shapes.ppo_rollout_batch, shapes, SIZES[size]["vocab_size"])
    ids = np.asarray(prompts.prompt_input_ids, np.int64)
    mask = np.asarray(prompts.prompt_attention_mask, np.int64)
    uniforms = np.random.default_rng(0).random((len(ids), shapes.answer_len))
    response, sample_mask, _ = trainer.generate(ids, mask, uniforms)
    sample_mask = np.asarray(sample_mask, np.float32)
    times: dict[bool, list[float]] = {True: [], False: []}
    for actor in (True, False):  # warm-up (JAX compiles each variant once)
        trainer.score(ids, mask, response, sample_mask, logprobs=actor)
    for _ in range(repeats):
        for actor in (True, False):
            start = time.perf_counter()
            trainer.score(ids, mask, response, sample_mask, logprobs=actor)
            times[actor].append(time.perf_counter() - start)
    recompute, rollout = statistics.median(times[True]), statistics.median(times[False])
    print(f"{backend} {size}: scoring recompute {recompute:.3f} s, rollout {rollout:.3f} s, "
          f"ratio {rollout / recompute:.3f}")


if __name__ == "__main__":
    main()
