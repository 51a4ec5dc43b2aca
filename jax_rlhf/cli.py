"""`rlhf ... --backend jax`: what each subcommand does on the JAX backend.

`shared.cli` parses the command line and loads the config, then calls `run(command, config,
args)`. Training commands (sft, rm, ppo, pipeline) run `shared.pipeline` on this backend's
trainers in the run directory of `shared.runlog`; eval, export and chat work on model
directories and checkpoints.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from shared.console import summary_table
from shared.errors import InputError, Interrupted

logger = logging.getLogger("jax_rlhf")


def run(command: str, config: Any, args: Any) -> int:
    """Runs one `rlhf` subcommand; returns the exit status. `parity` and `bench` are not
    among them: they compare or measure both backends, and `shared.cli` runs them itself."""
    if command in ("parity", "bench"):
        entry = "parity_tests.run.main" if command == "parity" else "bench.run.main"
        raise ValueError(f"`rlhf {command}` compares or measures both backends: shared.cli "
                         f"runs it with {entry}(config, args), not through one backend's run() "
                         "(docs/jax.md)")
    from jax_rlhf import distributed

    distributed.initialize(config.engine.jax)
    if command in ("sft", "rm", "ppo", "dpo", "pipeline"):
        return _train(command, config, args)
    if command == "eval":
        return _eval(config, args)
    if command == "export":
        return _export(config, args)
    if command == "chat":
        return _chat(config, args)
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
                              critic=getattr(args, "critic", None),
                              before_step=getattr(args, "before_step", None))
    except KeyboardInterrupt:
        raise Interrupted(run_dir, command) from None
    if is_main:
        print(summary_table(summary, run_dir), flush=True)
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


_SHOWN_PROMPTS = 8
"""Prompts whose answers `rlhf eval` prints (the metric uses up to eval.max_prompts)."""


def _eval(config: Any, args: Any) -> int:
    """`rlhf eval`: DeepSpeed-Chat's rw_eval for a reward model, its prompt_eval for a policy
    (or a baseline and a fine-tuned one); the report is `shared.evaluation`'s, as on torch."""
    from shared.evaluation import eval_roles, model_kind

    roles = eval_roles(config, args)
    if list(roles) == ["model"] and model_kind(roles["model"]) == "reward":
        return _reward_eval(config, roles["model"])
    return _prompt_eval(config, roles)


def _prompt_eval(config: Any, roles: dict[str, str]) -> int:
    import dataclasses

    import jax

    from jax_rlhf.params import ModelDef
    from jax_rlhf.sampler import SamplingParams
    from jax_rlhf.train.common import (
        EVAL_ITERATION,
        RunContext,
        build_model,
        compute_dtype,
        eos_ids,
        generate_rows,
        heldout_metrics,
        load_eval_prompts,
        shared_decode,
    )
    from shared.data import build_step_data
    from shared.evaluation import format_prompt_eval

    ctx = RunContext.open(config, None, fallback_tokenizer=next(iter(roles.values())))
    prompts = load_eval_prompts(ctx)
    if prompts is None:  # eval.metric none: answers to the PPO step's eval prompts
        data = build_step_data(config.data, ctx.tokenizer, "ppo")
        shown = data.eval if data.eval is not None else data.train
    else:
        shown = prompts
    shown = shown.take(slice(0, _SHOWN_PROMPTS))
    answers, heldout = {}, {}
    for role, path in roles.items():
        mdef, params, frozen = ModelDef.split(
            build_model("causal_lm", path=path, seed=config.seed, dtype=compute_dtype(config)))
        heldout[role] = heldout_metrics(ctx, mdef, params, frozen, prompts)
        sp = SamplingParams.from_config(
            config.ppo.sampling, max_new_tokens=config.data.max_answer_seq_len,
            eos_ids=eos_ids(ctx.tokenizer, mdef), pad_id=ctx.tokenizer.pad_token_id)
        tokens, mask = generate_rows(
            ctx, mdef, params, frozen, shown.prompt_input_ids, shown.prompt_attention_mask,
            dataclasses.replace(sp, do_sample=False), iteration=EVAL_ITERATION,
            chunk=config.ppo.per_device_generation_batch_size * ctx.dp)
        answers[role] = shared_decode(ctx.tokenizer, tokens, mask)
    if jax.process_index() == 0:
        sys.stdout.write(format_prompt_eval(
            roles, [str(t) for t in shown.prompt_text],
            None if shown.reference is None else [str(t) for t in shown.reference],
            answers, heldout))
    return 0


def _reward_eval(config: Any, path: str) -> int:
    import jax
    import numpy as np

    from jax_rlhf.train.common import RunContext, build_model, compute_dtype
    from jax_rlhf.train.reward import end_scores
    from shared.evaluation import format_reward_eval, reward_eval_pairs

    ctx = RunContext.open(config, None, fallback_tokenizer=path)
    model = build_model("value_head", path=path, seed=config.seed, dtype=compute_dtype(config),
                        init_v_head=False)
    batch, texts = reward_eval_pairs(config.data, ctx.tokenizer,
                                     max_pairs=config.eval.max_prompts)
    size = config.reward.per_device_eval_batch_size
    scores = {}
    for side in ("chosen", "rejected"):
        ids = getattr(batch, f"{side}_input_ids")
        mask = getattr(batch, f"{side}_attention_mask")
        out = []
        for start in range(0, len(ids), size):
            values, _ = model(ids[start:start + size], mask[start:start + size])
            out.append(np.asarray(end_scores(values.astype("float32"),
                                             mask[start:start + size])))
        scores[side] = np.concatenate(out)
    if jax.process_index() == 0:
        sys.stdout.write(format_reward_eval(path, texts, scores["chosen"], scores["rejected"]))
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
    """`rlhf chat`: `shared.chat.chat_loop` (multi-turn, the history cut to the model's
    context) with greedy generation, as on torch."""
    from jax_rlhf.sampler import SamplingParams
    from jax_rlhf.train.common import generate_rows, shared_decode
    from shared.chat import chat_loop, chat_options
    from shared.data.tokenize import pad_left

    _, ctx, mdef, params, frozen = _load_causal_lm(config, args)
    tokenizer = ctx.tokenizer
    options = chat_options(config, tokenizer, mdef.config.max_position_embeddings)
    sp = SamplingParams.from_config(
        config.ppo.sampling, max_new_tokens=options.max_new_tokens, eos_ids=options.eos_id,
        pad_id=tokenizer.pad_token_id, greedy=True,
    )

    def answer(ids) -> str:
        # Left-padded to a power of two (at most the window): a few compiles, not one a turn.
        width = min(options.window, max(16, 1 << (len(ids) - 1).bit_length()))
        row, mask = pad_left([ids], width, tokenizer.pad_token_id)
        tokens, rmask = generate_rows(ctx, mdef, params, frozen, row, mask, sp,
                                      iteration=0, chunk=ctx.dp)
        return shared_decode(tokenizer, tokens, rmask)[0]

    return chat_loop(answer, tokenizer, options)
