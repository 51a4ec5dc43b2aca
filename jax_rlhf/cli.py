"""`rlhf ... --backend jax`: what each subcommand does on the JAX backend.

`shared.cli` parses the command line and loads the config, then calls `run(command, config,
args)`. Training commands (sft, rm, ppo, pipeline) run `shared.pipeline` on this backend's
trainers in the run directory of `shared.runlog`; eval, export and chat work on model
directories and checkpoints.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from shared.errors import InputError, Interrupted

logger = logging.getLogger("jax_rlhf")

ISSUE = "jax_rlhf: the JAX backend, flax NNX models, optax, orbax and a sharded jax.jit engine"


def run(command: str, config: Any, args: Any) -> int:
    """Runs one `rlhf` subcommand; returns the exit status."""
    if command in ("parity", "bench"):
        raise NotImplementedError(
            f"`rlhf {command}` is not part of the JAX engine layer yet (issue {ISSUE!r}); "
            "parity runs live in parity_tests/, benchmarks in bench/"
        )
    from jax_rlhf import distributed

    distributed.initialize(config.engine.jax)
    if command in ("sft", "rm", "ppo", "pipeline"):
        return _train(command, config, args)
    if command == "eval":
        return _eval(config, args)
    if command == "export":
        return _export(config, args)
    if command == "chat":
        try:
            return _chat(config, args)
        except KeyboardInterrupt:  # Ctrl-C is a way to leave a chat
            print()
            return 0
    raise ValueError(f"unknown command {command!r}")


def _train(command: str, config: Any, args: Any) -> int:
    import jax

    from jax_rlhf.distributed import agree_on_path
    from shared.pipeline import run_command
    from shared.runlog import prepare_run_dir

    is_main = jax.process_index() == 0
    run_dir = prepare_run_dir(
        config, config_path=args.config, run_dir=agree_on_path(args.run_dir),
        resume=args.resume, is_main=is_main, backend="jax",
    )
    run_dir = agree_on_path(run_dir)
    try:
        summary = run_command("jax", command, config, run_dir, resume=args.resume,
                              actor=getattr(args, "actor", None),
                              critic=getattr(args, "critic", None))
    except KeyboardInterrupt:
        raise Interrupted(run_dir, command) from None
    if is_main:
        logger.info("run directory: %s", run_dir)
        print(json.dumps({k: summary[k] for k in summary if k != "timings"}, indent=2))
    return 0


def _model_dir(config: Any, args: Any) -> str:
    path = getattr(args, "model", None) or config.model.actor_model_name_or_path
    if path is None:
        raise InputError("pass --model DIR (a Hugging Face causal-LM directory, e.g. "
                         "<run>/ppo/final): the config builds its actor from scratch")
    return str(path)


def _load_causal_lm(config: Any, args: Any):
    """`(path, ctx, mdef, params, frozen)` of the HF causal-LM directory `--model` (or the
    config's actor), with its tokenizer as the fallback one."""
    from jax_rlhf.params import ModelDef
    from jax_rlhf.train.common import RunContext, build_model, compute_dtype

    path = _model_dir(config, args)
    ctx = RunContext.open(config, None, fallback_tokenizer=path)
    mdef, params, frozen = ModelDef.split(
        build_model("causal_lm", path=path, seed=config.seed, dtype=compute_dtype(config))
    )
    return path, ctx, mdef, params, frozen


def _eval(config: Any, args: Any) -> int:
    """The held-out metric of an HF causal-LM directory, plus a few answers."""
    from jax_rlhf.train.common import heldout_metrics, load_eval_prompts

    path, ctx, mdef, params, frozen = _load_causal_lm(config, args)
    prompts = load_eval_prompts(ctx)
    result = {"model": path, "heldout": heldout_metrics(ctx, mdef, params, frozen, prompts)}
    print(json.dumps(result, indent=2))
    return 0


def _export(config: Any, args: Any) -> int:
    """Checkpoint -> HF directory (per model of a PPO checkpoint: `<out>/actor`, ...)."""
    import jax

    from jax_rlhf.checkpoint import read_checkpoint
    from jax_rlhf.train.common import export_hf, load_tokenizer
    from shared.model_card import checkpoint_card, complete_export

    if args.checkpoint is None or args.out is None:
        raise InputError("rlhf export needs --checkpoint DIR and --out DIR")
    state, meta, step = read_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer(config)
    models = meta["models"]
    for name, info in models.items():
        mdef = _rebuild(info)
        tree = state[name]
        values = {**tree.get("frozen", {}), **tree["params"]}
        params, frozen = mdef.partition(jax.tree.map(jax.numpy.asarray, values))
        out = Path(args.out) if len(models) == 1 else Path(args.out) / name
        export_hf(mdef, params, frozen, out, tokenizer)
        if jax.process_index() == 0:
            complete_export(out, checkpoint_card(args.checkpoint, backend="jax", role=name,
                                                 progress=f"checkpoint step {step}"))
        print(f"exported {name} (checkpoint {step}) -> {out}")
    return 0


def _rebuild(info: dict):
    """The `ModelDef` of a checkpointed model from its `model_meta`."""
    from flax import nnx

    from jax_rlhf.models import CausalLM, ModelConfig, ValueHeadModel, apply_lora, is_lora_param
    from jax_rlhf.params import ModelDef

    cfg = ModelConfig.from_hf(dict(info["hf_config"]), dtype=info["dtype"], param_dtype="float32")
    cls = CausalLM if info["kind"] == "causal_lm" else ValueHeadModel

    def build():
        model = cls(cfg, rngs=nnx.Rngs(0))
        lora = info["lora"]
        if lora["dim"] > 0:
            apply_lora(model, rank=lora["dim"], alpha=lora["alpha"],
                       module_name=lora["module_name"],
                       target_modules=tuple(lora["target_modules"]), rngs=nnx.Rngs(0))
        return model

    model = nnx.eval_shape(build)
    lora = info["lora"]
    only = lora["dim"] > 0 and lora["only_optimize"]
    mdef, _, _ = ModelDef.split(model, trainable=is_lora_param if only else (lambda n: True))
    return mdef


def _chat(config: Any, args: Any) -> int:
    """Reads one prompt per line from stdin and prints the model's answer (greedy unless
    `ppo.sampling.do_sample`); an empty line or EOF ends it."""
    import numpy as np

    from jax_rlhf.sampler import SamplingParams
    from jax_rlhf.train.common import eos_ids, generate_rows, shared_decode
    from shared.data import DataReport
    from shared.data.tokenize import encode_prompts

    _, ctx, mdef, params, frozen = _load_causal_lm(config, args)
    sp = SamplingParams.from_config(
        config.ppo.sampling, max_new_tokens=config.data.max_answer_seq_len,
        eos_ids=eos_ids(ctx.tokenizer, mdef), pad_id=ctx.tokenizer.pad_token_id,
    )
    turn = 0
    for line in sys.stdin:
        prompt = line.rstrip("\n")
        if not prompt:
            break
        ids, mask = encode_prompts(
            ctx.tokenizer, [prompt], max_prompt_seq_len=config.data.max_prompt_seq_len,
            report=DataReport(),
        )
        tokens, rmask = generate_rows(
            ctx, mdef, params, frozen, np.asarray(ids), np.asarray(mask), sp,
            iteration=turn, chunk=ctx.dp,
        )
        print(shared_decode(ctx.tokenizer, tokens, rmask)[0], flush=True)
        turn += 1
    return 0
