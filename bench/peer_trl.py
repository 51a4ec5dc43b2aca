"""Issue 16 item 4's peer: TRL's PPO iteration on the bench's work, against ours, in one process.

``python -m bench.peer_trl [--size small|tiny|micro] [--repeats N]`` (``make bench-peer``
installs the pinned ``peer`` extra first). TRL 1.12.0 is the newest release with a PPO trainer
(``trl.experimental.ppo``; 1.13 dropped it). Both sides load the same random Llama
checkpoints of ``bench.models`` (actor and reference from ``lm``, critic and reward model
from ``value``) and run the bench's iteration (``bench.workspace.Shapes``): 16 prompts of 64
tokens, 64 sampled answer tokens each with no EOS stop, then one PPO epoch of 2 actor + critic
optimiser steps of 8 rows, fp32, AdamW. The iterations are timed alternately (TRL, ours with
``old_logprobs: recompute``, ours with ``rollout``) after one warm-up each; medians are
reported with the load average, in ``runs/bench/peer_trl.{json,md}``.

TRL's phases come from wrapping the module-level functions its ``train`` calls:
generation is ``batch_generation``; scoring runs from its end to the first forward with
gradients (reference, critic and reward forwards, GAE, whitening); training is the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.workspace import Shapes

__all__ = ["TRL_VERSION", "main", "run_peer", "trl_ppo_config_kwargs", "trl_work"]

TRL_VERSION = "1.12.0"
"""The pinned peer (pyproject.toml's ``peer`` extra)."""

OUT_DIR = Path("runs/bench")

MICRO_SHAPES = Shapes(prompt_len=16, answer_len=16)
"""The smoke test's shapes: the micro model has 64 positions, the bench's rows and steps."""


def trl_ppo_config_kwargs(shapes: Shapes, *, temperature: float = 1.0, kl_coef: float = 0.1,
                          learning_rate: float = 1e-4, seed: int = 1234,
                          use_cpu: bool = True) -> dict[str, Any]:
    """``trl.experimental.ppo.PPOConfig`` kwargs for one bench iteration per ``train()`` call.

    TRL's batch arithmetic: a rollout is ``per_device_train_batch_size *
    gradient_accumulation_steps`` rows, split into ``num_mini_batches`` mini-batches, each
    split into micro-batches of ``per_device_train_batch_size`` rows under
    ``accelerator.accumulate``, which steps the optimiser every
    ``gradient_accumulation_steps`` micro-batches. So a 16-row rollout with 8-row optimiser
    steps is ``per_device_train_batch_size=16``, ``gradient_accumulation_steps=1``,
    ``num_mini_batches=2`` (each micro-batch slice then holds the mini-batch's 8 rows).
    """
    rollout, minibatch = shapes.ppo_rollout_batch, shapes.ppo_minibatch
    if rollout < 1 or minibatch < 1 or rollout % minibatch:
        raise ValueError(f"Shapes.ppo_rollout_batch ({rollout}) must be a positive multiple of "
                         f"Shapes.ppo_minibatch ({minibatch})")
    if shapes.answer_len < 1:
        raise ValueError(f"Shapes.answer_len must be >= 1, got {shapes.answer_len}")
    return dict(
        response_length=shapes.answer_len,
        per_device_train_batch_size=rollout,
        gradient_accumulation_steps=1,
        num_mini_batches=rollout // minibatch,
        local_rollout_forward_batch_size=rollout,  # generation and scoring in one batch
        num_ppo_epochs=1,
        total_episodes=rollout,  # one update per train() call
        stop_token=None, stop_token_id=None,  # no EOS stop: full-length answers
        missing_eos_penalty=None,
        temperature=temperature,
        kl_coef=kl_coef,
        whiten_rewards=False,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=False, fp16=False,  # fp32 as ours
        gradient_checkpointing=False,
        use_cpu=use_cpu,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1_000_000,
        disable_tqdm=True,
        seed=seed,
    )


def trl_work(kwargs: dict[str, Any]) -> dict[str, int]:
    """The work one ``train()`` update does under ``kwargs``, by TRL 1.12's formulas: rows
    generated, tokens generated (no EOS stop), optimiser steps and rows per step."""
    world = 1
    local_batch = kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"]
    if local_batch % kwargs["num_mini_batches"]:
        raise ValueError(f"per_device_train_batch_size * gradient_accumulation_steps "
                         f"({local_batch}) must be a multiple of num_mini_batches "
                         f"({kwargs['num_mini_batches']})")
    local_mini = local_batch // kwargs["num_mini_batches"]
    micro = kwargs["per_device_train_batch_size"]
    micro_batches = math.ceil(local_mini / micro)
    updates = math.ceil(kwargs["total_episodes"] / (local_batch * world))
    steps_per_mini = micro_batches // kwargs["gradient_accumulation_steps"]
    return {"updates": updates, "rows": local_batch,
            "generated_tokens": local_batch * kwargs["response_length"],
            "optimizer_steps": kwargs["num_ppo_epochs"] * kwargs["num_mini_batches"]
            * steps_per_mini,
            "rows_per_step": min(micro, local_mini) * kwargs["gradient_accumulation_steps"]}


class TRLSide:
    """TRL's ``PPOTrainer`` on the bench's checkpoints, with timing and work counters."""

    def __init__(self, lm_dir: str, value_dir: str, shapes: Shapes, prompts, run_dir: Path,
                 **config_kwargs: Any):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as module

        self.module = module
        kwargs = trl_ppo_config_kwargs(shapes, use_cpu=not torch.cuda.is_available(),
                                       **config_kwargs)
        self.expected = trl_work(kwargs)
        args = PPOConfig(output_dir=str(run_dir / "trl"), **kwargs)
        tokenizer = _tokenizer()
        dataset = Dataset.from_dict({"input_ids": prompts.tolist()})
        load = {"dtype": torch.float32}
        self.trainer = PPOTrainer(
            args=args, processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(lm_dir, **load),
            ref_model=AutoModelForCausalLM.from_pretrained(lm_dir, **load),
            reward_model=AutoModelForSequenceClassification.from_pretrained(value_dir, **load),
            value_model=AutoModelForSequenceClassification.from_pretrained(value_dir, **load),
            train_dataset=dataset)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for callback in (PrinterCallback, ProgressCallback):
            self.trainer.remove_callback(callback)
        kind = self.trainer.accelerator.distributed_type  # NO: no DDP wrapper on one process
        self.distributed_type = str(getattr(kind, "value", kind))
        self.events: dict[str, Any] = {}
        self._wrap()

    def _wrap(self) -> None:
        import torch

        module, events = self.module, self.events
        generate, forward = module.batch_generation, module.forward

        def batch_generation(model, queries, *args, **kwargs):
            events["generation_start"] = time.perf_counter()
            out = generate(model, queries, *args, **kwargs)
            events["generation_end"] = time.perf_counter()
            events["generated_tokens"] = (events.get("generated_tokens", 0)
                                          + out[0].shape[0] * (out[0].shape[1]
                                                               - queries.shape[1]))
            return out

        def timed_forward(model, query_responses, pad_token_id):
            if torch.is_grad_enabled():
                events.setdefault("training_start", time.perf_counter())
                events.setdefault("step_rows", []).append(int(query_responses.shape[0]))
            return forward(model, query_responses, pad_token_id)

        module.batch_generation, module.forward = batch_generation, timed_forward
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)

        def count(*_):
            events["optimizer_steps"] = events.get("optimizer_steps", 0) + 1

        optimizer.register_step_post_hook(count)
        self.optimizer = _optimizer_info(optimizer)

    def iteration(self) -> dict[str, Any]:
        self.events.clear()
        start = time.perf_counter()
        self.trainer.train()
        end = time.perf_counter()
        e = self.events
        return {"total_s": end - start,
                "setup_s": e["generation_start"] - start,
                "generation_time": e["generation_end"] - e["generation_start"],
                "scoring_time": e["training_start"] - e["generation_end"],
                "training_time": end - e["training_start"],
                "generated_tokens": e["generated_tokens"],
                "optimizer_steps": e.get("optimizer_steps", 0),
                "step_rows": e.get("step_rows", [])}


def _optimizer_info(optimizer) -> dict[str, Any]:
    defaults = optimizer.defaults
    return {"class": type(optimizer).__name__, "fused": defaults.get("fused"),
            "foreach": defaults.get("foreach"),
            "parameters": sum(p.numel() for g in optimizer.param_groups for p in g["params"])}


def _tokenizer():
    """A word-level tokenizer with the bench models' special ids (pad 0, bos 1, eos 2): TRL
    reads only those ids and pads the (already equal-length) prompts with it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, "<unk>")),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


class OursSide:
    """The torch backend's ``PPOTrainer`` as ``bench.torch_workloads.ppo_iteration`` runs it."""

    def __init__(self, config: Any, run_dir: Path, lm_dir: str, value_dir: str, prompts):
        from bench.torch_workloads import _quiet
        from torch_rlhf.deepspeed_config import init_distributed
        from torch_rlhf.ppo import PPOTrainer

        init_distributed()
        _quiet()
        self.trainer = PPOTrainer(config, run_dir=run_dir, actor_model_name_or_path=lm_dir,
                                  critic_model_name_or_path=value_dir)
        self.trainer.eos_token_id = None  # full-length answers: nothing ends a row
        self.prompts = prompts
        self.index = 0
        self.steps = {"actor": 0, "critic": 0}
        self.optimizer: dict[str, Any] = {}
        for name in self.steps:
            optimizer = getattr(self.trainer.engine, name).optimizer
            while not hasattr(optimizer, "register_step_post_hook") and hasattr(
                    optimizer, "optimizer"):
                optimizer = optimizer.optimizer
            optimizer.register_step_post_hook(lambda *_, name=name: self._count(name))
            self.optimizer[name] = _optimizer_info(optimizer)

    def _count(self, name: str) -> None:
        self.steps[name] += 1

    def iteration(self) -> dict[str, Any]:
        trainer, i = self.trainer, self.index
        self.index += 1
        before = dict(self.steps)
        trainer.timer.pop()
        start = time.perf_counter()
        experience = trainer.generate_experience(self.prompts, iteration=i, batch_index=0)
        metrics = trainer.train_on_experience([experience], iteration=i)
        total = time.perf_counter() - start
        phases = trainer.timer.pop()
        response = experience.response
        return {"total_s": total,
                **{k: phases.get(k, 0.0) for k in
                   ("generation_time", "scoring_time", "training_time")},
                "generated_tokens": int(response.shape[0] * response.shape[1]),
                "response_length": float(metrics["response_length"]),
                "rollout_path": trainer.rollout_path,
                "optimizer_steps": {k: self.steps[k] - before[k] for k in self.steps}}


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("total_s", "generation_time", "scoring_time", "training_time")
    return {f"median_{k}": statistics.median(r[k] for r in records) for k in keys}


def run_peer(size: str = "small", *, repeats: int = 3, warmup: int = 1,
             model_root: Path | None = None, work_dir: Path | None = None,
             variants: tuple[str, ...] = ("recompute", "rollout"),
             shapes: Shapes | None = None) -> dict[str, Any]:
    """Builds TRL's trainer and ours (one per ``old_logprobs`` variant) on the same
    checkpoints and prompts, then ``warmup`` + ``repeats`` rounds of one iteration each,
    alternating. Returns every iteration, the medians and the ratios to TRL. ``shapes``:
    the bench's by default (:data:`MICRO_SHAPES` for the 64-position micro model)."""
    import tempfile

    from bench.machine import load_average
    from bench.models import SIZES, build_model_dirs
    from bench.workspace import prompt_batch, write_run_config

    shapes = shapes or (MICRO_SHAPES if size == "micro" else Shapes())
    base = Path(work_dir or tempfile.mkdtemp(prefix="peer_trl_"))
    paths = build_model_dirs(size, model_root or base / "models")
    vocab = SIZES[size]["vocab_size"]
    prompts = prompt_batch(shapes.ppo_rollout_batch, shapes, vocab)
    load = {"start": load_average()}
    sides: dict[str, Any] = {}
    configs = {}
    for variant in variants:
        extra = {"ppo": {"conventions": {"old_logprobs": variant},
                         "old_logprobs_check_interval": 1_000_000}}
        _, configs[variant] = write_run_config(base / variant, SIZES[size], shapes,
                                               lm_dir=paths["lm"], value_dir=paths["value"],
                                               extra=extra)
    ppo = configs[variants[0]].ppo
    # TRL first: its Accelerator must see no RANK (ours sets a world of one for DeepSpeed)
    sides["trl"] = TRLSide(paths["lm"], paths["value"], shapes, prompts.prompt_input_ids,
                           base, temperature=ppo.sampling.temperature,
                           learning_rate=ppo.actor_optim.learning_rate)
    for variant in variants:
        sides[f"ours_{variant}"] = OursSide(configs[variant], base / variant / "run",
                                            paths["lm"], paths["value"], prompts)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    warm: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for round_ in range(warmup + repeats):
        for name, side in sides.items():
            record = side.iteration()
            (warm if round_ < warmup else records)[name].append(record)
            print(f"peer_trl: round {round_ + 1}/{warmup + repeats} {name} "
                  f"{record['total_s']:.2f} s", file=sys.stderr, flush=True)
    load["end"] = load_average()
    summary = {name: _summary(rs) for name, rs in records.items()}
    trl_total = summary["trl"]["median_total_s"]
    for name in sides:
        summary[name]["trl_over_this"] = trl_total / summary[name]["median_total_s"]
    return {"size": size, "shapes": dataclasses.asdict(shapes), "warmup": warmup,
            "repeats": repeats, "trl_version": _version("trl"),
            "versions": {n: _version(n) for n in ("torch", "transformers", "accelerate",
                                                    "deepspeed")},
            "trl_expected_work": sides["trl"].expected,
            "trl_distributed_type": sides["trl"].distributed_type,
            "optimizers": {name: side.optimizer for name, side in sides.items()},
            "threads": _threads(), "load_average": load, "summary": summary,
            "iterations": records, "warmup_iterations": warm}


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def render_markdown(result: dict[str, Any]) -> str:
    """The result as a table: median seconds per phase, and TRL's time over each side's."""
    lines = [f"# TRL {result['trl_version']} PPO iteration vs ours ({result['size']}, "
             f"{result['repeats']} alternations after {result['warmup']} warm-up)", "",
             f"Load average start {result['load_average']['start']}, end "
             f"{result['load_average']['end']}; {result['threads']} torch threads; "
             f"versions {result['versions']}.", "",
             "| side | iteration s | generation s | scoring s | training s | TRL / this |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['median_total_s']:.2f} | {s['median_generation_time']:.2f}"
                     f" | {s['median_scoring_time']:.2f} | {s['median_training_time']:.2f} | "
                     f"{s['trl_over_this']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("small", "tiny", "micro"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model-root", type=Path, default=None,
                        help="where the bench checkpoints are (built when missing)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    from bench.machine import set_threads

    set_threads(args.threads)
    result = run_peer(args.size, repeats=args.repeats, warmup=args.warmup,
                      model_root=args.model_root)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_trl.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "peer_trl.md").write_text(render_markdown(result))
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
