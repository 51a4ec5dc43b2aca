"""DeepSpeed-Chat's step-3 recipe shapes on a GPU: ``python -m bench.run --gpu-recipe``.

The shapes of DeepSpeed-Chat's single-GPU OPT-1.3B recipe (``configs/opt-1.3b-single-gpu.yaml``,
``training_scripts/opt/single_gpu/run_1.3b.sh``): an OPT-1.3B actor (and reference) with LoRA
dim 128 and gradient checkpointing, an OPT-350m critic (and reward model), fp16, prompt 256 +
answer 256, 16 rollouts per iteration trained in one PPO epoch. One PPO iteration is timed
after one warm-up iteration, three ways, each in a fresh process:

- ``recipe/torch/hybrid-on``: the torch backend with ``engine.torch.hybrid_engine: on``
  (DeepSpeed's inference kernels for the rollouts, DS-Chat's ``--enable_hybrid_engine``);
- ``recipe/torch/hybrid-off``: the torch backend generating through the module;
- ``recipe/jax``: the JAX backend on the same shapes (fp16 runs as bf16 there).

Weights are random (Hugging Face's init; the GPU machine cannot reach the hub) and the data are
synthetic prompts of exactly 256 tokens; answers always run to 256 tokens. Differences from the
recipe, all forced by timing one iteration: ``gradient_accumulation_steps`` 1 (the recipe's 2
would span two iterations), no unsupervised (ptx) data (DS-Chat's example scripts pass none).

Without CUDA every task reports ``skipped``; ``--recipe-dry-run`` runs the same code on tiny
OPT models and short sequences on any device (to test this module).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from bench.workspace import Shapes

__all__ = ["PUBLISHED", "RECIPE_MODELS", "recipe_tasks", "run_recipe"]

_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048,
            pad_token_id=1, bos_token_id=2, eos_token_id=2, enable_bias=True)
RECIPE_MODELS: dict[str, dict[str, Any]] = {
    # facebook/opt-1.3b and facebook/opt-350m config.json sizes
    "opt-1.3b": dict(_OPT, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                     num_attention_heads=32, word_embed_proj_dim=2048,
                     do_layer_norm_before=True),
    "opt-350m": dict(_OPT, hidden_size=1024, ffn_dim=4096, num_hidden_layers=24,
                     num_attention_heads=16, word_embed_proj_dim=512,
                     do_layer_norm_before=False),
    # --recipe-dry-run: the same code on OPT-shaped toys
    "opt-dry-actor": dict(_OPT, vocab_size=512, hidden_size=64, ffn_dim=128,
                          num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                          max_position_embeddings=128, do_layer_norm_before=True),
    "opt-dry-critic": dict(_OPT, vocab_size=512, hidden_size=32, ffn_dim=64,
                           num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=16,
                           max_position_embeddings=128, do_layer_norm_before=False),
}

RECIPE_SHAPES = Shapes(prompt_len=256, answer_len=256, generation_batches=(16,),
                       sft_batch=8, ppo_rollout_batch=16, ppo_minibatch=16)
DRY_RUN_SHAPES = Shapes(prompt_len=16, answer_len=16, generation_batches=(4,), sft_batch=4,
                        ppo_rollout_batch=4, ppo_minibatch=4)

PUBLISHED = [
    {"recipe": "OPT-1.3B actor + OPT-350m reward", "hardware": "1x A6000 48 GB",
     "step3": "1.2 h", "source": "DeepSpeed-Chat README, E2E time breakdown (single GPU)"},
    {"recipe": "OPT-13B actor + OPT-350m reward", "hardware": "8x A100 40 GB (1 node)",
     "step3": "10.8 h", "source": "DeepSpeed-Chat README, E2E time breakdown (single node)"},
]
"""DeepSpeed-Chat's published step-3 wall times for its recipes (whole step 3, not one
iteration)."""

VARIANTS = ("torch/hybrid-on", "torch/hybrid-off", "jax")


def recipe_tasks(options: Any, *, model_root: Path, work_root: Path) -> list[dict[str, Any]]:
    """A prepare task (the random-weight OPT directories), then one task per variant."""
    dry = options.recipe_dry_run
    actor, critic = ("opt-dry-actor", "opt-dry-critic") if dry else ("opt-1.3b", "opt-350m")
    shapes = DRY_RUN_SHAPES if dry else RECIPE_SHAPES
    common = {"kind": "recipe", "threads": options.threads, "model_root": str(model_root),
              "actor": actor, "critic": critic, "shapes": dataclasses.asdict(shapes),
              "dry_run": dry, "warmup": 1 if options.warmup is None else options.warmup,
              "repeats": options.repeats or 1}
    tasks: list[dict[str, Any]] = [{"id": "prepare", "kind": "prepare", "sizes": [],
                                    "recipe_models": [actor, critic], "dry_run": dry,
                                    "threads": options.threads, "model_root": str(model_root)}]
    for variant in VARIANTS:
        if variant.split("/")[0] not in options.backends:
            continue
        tasks.append({"id": f"recipe/{variant}", "variant": variant,
                      "work_dir": str(work_root / variant.replace("/", "-")), **common})
    return tasks


def build_recipe_dirs(task: dict[str, Any]) -> dict[str, str]:
    """``<model_root>/<name>/{lm,value}`` for the recipe's actor (lm) and critic (value),
    skipped without CUDA unless it is a dry run (no point writing 7 GB of random weights)."""
    if not task.get("dry_run") and _no_cuda_reason("torch"):
        return {}
    from parity_tests.harness import build_checkpoint

    out = {}
    for name, kind in zip(task["recipe_models"], ("lm", "value"), strict=True):
        path = Path(task["model_root"]) / name / kind
        if not (path / "config.json").exists():
            build_checkpoint(RECIPE_MODELS[name], path, kind=kind, seed=0, scale=None)
        out[name] = str(path)
    return out


def _no_cuda_reason(backend: str) -> str | None:
    if backend == "torch":
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        return None if torch.cuda.is_available() else "no CUDA device visible to torch"
    try:
        import jax
    except ImportError:
        return "jax is not installed"
    platforms = {d.platform for d in jax.devices()}
    return None if "gpu" in platforms or "cuda" in platforms else (
        f"JAX sees no GPU (devices: {sorted(platforms)}; install jax[cuda12])")


def _gpu_memory(backend: str) -> dict[str, Any]:
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return {}
        return {"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {"gpu_peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def run_recipe(task: dict[str, Any]) -> dict[str, Any]:
    """One variant's PPO iteration on the recipe shapes (``skipped`` without CUDA)."""
    variant, dry = task["variant"], task["dry_run"]
    backend = variant.split("/")[0]
    if not dry:
        reason = _no_cuda_reason(backend)
        if reason:
            return {"skipped": f"{reason}; run `python -m bench.run --gpu-recipe` on a CUDA "
                    "machine"}
    from bench.workspace import write_run_config

    shapes = Shapes(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in task["shapes"].items()})
    root = Path(task["model_root"])
    actor = RECIPE_MODELS[task["actor"]]
    lm_dir, value_dir = str(root / task["actor"] / "lm"), str(root / task["critic"] / "value")
    extra = {
        "model": {"critic_config": RECIPE_MODELS[task["critic"]],
                  "dtype": "fp32" if dry else "fp16"},
        "ppo": {"preset": "deepspeed_chat", "actor": {
            "lora": {"dim": 8 if dry else 128, "module_name": "decoder.layers."},
            "gradient_checkpointing": True, "disable_dropout": True},
            "critic": {"disable_dropout": True}},
        "engine": {"torch": {"hybrid_engine": "on" if variant.endswith("on") else "off"}},
    }
    work = Path(task["work_dir"])
    _, config = write_run_config(work, actor, shapes, lm_dir=lm_dir, value_dir=value_dir,
                                 extra=extra)
    timing = {"warmup": task["warmup"], "repeats": task["repeats"], "plain": False}
    start = time.perf_counter()
    if backend == "torch":
        from bench.torch_workloads import ppo_iteration
    else:
        from bench.jax_workloads import ppo_iteration
    try:
        raw = ppo_iteration(config, work / "run", lm_dir, value_dir, shapes,
                            vocab_size=actor["vocab_size"], **timing)
    except Exception as err:  # noqa: BLE001 - the Hybrid Engine's refusal is a result
        if "Hybrid Engine" not in str(err) and "HybridEngine" not in type(err).__name__:
            raise
        return {"variant": variant, "dry_run": dry,
                "unavailable": f"{type(err).__name__}: {err}"}
    its = raw["iterations"]
    mean = {k: sum(it[k] for it in its) / len(its)
            for k in ("total_s", "generation_time", "scoring_time", "training_time")}
    return {"variant": variant, "dry_run": dry, "shapes": dataclasses.asdict(shapes),
            "iteration_s": mean["total_s"], "generation_s": mean["generation_time"],
            "scoring_s": mean["scoring_time"], "training_s": mean["training_time"],
            "rollout_path": its[0].get("rollout_path"),
            "generation_tokens_per_s": (shapes.ppo_rollout_batch * shapes.answer_len
                                        / mean["generation_time"]),
            "first_iteration_s": raw["warmup"][0]["total_s"] if raw["warmup"] else None,
            "iterations": its, "peak_rss_bytes": raw["peak_rss_bytes"],
            "task_s": time.perf_counter() - start, **_gpu_memory(backend)}
