"""What the three trainers share: the run context, building models, export, held-out eval."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import shared
from jax_rlhf import sharding
from jax_rlhf.models import (
    CausalLM,
    ModelConfig,
    ValueHeadModel,
    apply_lora,
    is_lora_param,
    load_causal_lm,
    load_value_head_model,
    merge_lora,
    save_hf,
    set_remat,
)
from jax_rlhf.params import ModelDef, Params, to_host
from jax_rlhf.sampler import SamplingParams, generate
from shared.data import PromptBatch

logger = logging.getLogger(__name__)

EVAL_ITERATION = None
"""`generate_rows(iteration=EVAL_ITERATION)`: held-out evaluation, whose uniforms are the rows
of `shared.evaluation.heldout_uniforms` (the same array the torch backend uses)."""


@dataclasses.dataclass
class RunContext:
    """One run: config, run directory, logger, mesh and tokenizer."""

    config: Any
    """The `RLHFConfig`."""
    run_dir: Path
    logger: Any
    """A `shared.runlog.RunLogger`."""
    mesh: Mesh
    tokenizer: Any

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def barrier(self) -> None:
        """Waits for every process (a no-op for one)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rlhf barrier")

    @property
    def dp(self) -> int:
        """Data-parallel degree: per-device batch sizes are multiplied by this."""
        return sharding.data_parallel_size(self.mesh)

    def step_dir(self, step: str) -> Path:
        return self.run_dir / step

    @classmethod
    def open(cls, config: Any, run_dir: str | Path | None, *, tokenizer=None,
             fallback_tokenizer: str | None = None) -> RunContext:
        """The context of a run in `run_dir`: the mesh of `engine.jax.mesh`, the run's
        tokenizer (or `tokenizer`) and a `RunLogger` writing on process 0 only. Without
        `run_dir` (eval, chat) nothing is written anywhere."""
        from shared.model_limits import check_config_models
        from shared.runlog import RunLogger

        tokenizer = tokenizer or load_tokenizer(config, fallback_tokenizer)
        # The tokenizer and the data lengths must fit every model the config names (and the
        # explicit one), before any is built: shared.model_limits, as the torch build_model.
        check_config_models(config, tokenizer_size=len(tokenizer),
                            tokenizer_name=tokenizer.name_or_path or None,
                            extra_paths=(fallback_tokenizer,))
        is_main = jax.process_index() == 0 and run_dir is not None
        if is_main:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        run_logger = RunLogger.from_config(config, run_dir or ".", is_main=is_main)
        return cls(config, None if run_dir is None else Path(run_dir), run_logger,
                   sharding.make_mesh(config.engine.jax.mesh), tokenizer)


def open_session(config: Any, run_dir: Path):
    """What the steps of a `shared.pipeline` run share on this backend: one `RunContext`."""
    from shared.pipeline import Session

    ctx = RunContext.open(config, run_dir)
    return Session(ctx.logger, {"ctx": ctx}, ctx.barrier)


def load_tokenizer(config: Any, fallback: str | None = None):
    """The run's tokenizer (`model.tokenizer_name_or_path`, else the actor's directory)."""
    import transformers

    from shared.data import prepare_tokenizer
    from shared.errors import InputError, check_model_source, loading

    path = config.model.tokenizer_name_or_path or config.model.actor_model_name_or_path or fallback
    if path is None:
        raise InputError("model.tokenizer_name_or_path is needed for a from-scratch actor")
    check_model_source(path, what="tokenizer")
    with loading("tokenizer", path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, trust_remote_code=config.model.trust_remote_code
        )
    return prepare_tokenizer(tokenizer, pad_with_eos=config.data.pad_with_eos)


def compute_dtype(config: Any) -> str:
    """Activation dtype: bfloat16 with `engine.jax.compute_dtype: bfloat16` or `model.dtype`
    bf16/fp16 (JAX trains fp16 as bf16); parameters and optimiser state stay float32."""
    if config.engine.jax.compute_dtype == "bfloat16" or config.model.dtype in ("bf16", "fp16"):
        return "bfloat16"
    return "float32"


def build_model(
    kind: str,
    *,
    path: str | Path | None = None,
    hf_config: dict | None = None,
    seed: int,
    dtype: str = "float32",
    init_v_head: bool = True,
) -> CausalLM | ValueHeadModel:
    """A `CausalLM` (`kind="causal_lm"`) or `ValueHeadModel` from an HF directory, or a fresh
    one from HF config kwargs (`model.actor_config`) drawn with `seed`.

    A value-head model loaded from a directory without a head (an SFT model) gets a fresh one.
    """
    if path is not None:
        if kind == "causal_lm":
            return load_causal_lm(path, dtype=dtype)
        return load_value_head_model(path, dtype=dtype, init_v_head=init_v_head, seed=seed)
    if hf_config is None:
        raise ValueError("build_model needs a path or an HF config")
    cfg = ModelConfig.from_hf(dict(hf_config), dtype=dtype, param_dtype="float32")
    cls = CausalLM if kind == "causal_lm" else ValueHeadModel
    return cls(cfg, rngs=nnx.Rngs(seed))


def configure_module(model: nnx.Module, module_cfg: Any, *, seed: int,
                     lora_seed: int | None = None) -> list[str]:
    """Applies a `ModuleConfig` in place: LoRA adapters, gradient checkpointing; returns the
    adapted layers. Dropout: our modules never apply it (DS-Chat's default disables it).

    LoRA A matrices: `shared.lora_init.lora_a_init` keyed by `lora_seed` (default `seed`) and
    the HF module name, as the torch backend draws them."""
    lora_seed = seed if lora_seed is None else lora_seed
    if module_cfg.dropout:
        logger.warning("dropout=%s ignored: the JAX models run without dropout",
                       module_cfg.dropout)
    adapted = []
    lora = module_cfg.lora
    if lora.dim > 0:
        adapted = apply_lora(
            model,
            rank=lora.dim,
            alpha=lora.alpha,
            module_name=lora.module_name,
            target_modules=tuple(lora.target_modules),
            rngs=nnx.Rngs(seed + 7919),
            seed=lora_seed,
        )
        logger.info("LoRA rank %d on %d layers (%s, ...)", lora.dim, len(adapted), adapted[0])
    if module_cfg.gradient_checkpointing:
        set_remat(model)
    return adapted


def trainable_filter(module_cfg: Any, adapted: Sequence[str] = ()):
    """Which parameters train: only the adapters (and a value model's head, which must learn
    its scale: `v_head`, as the torch backend keeps `score` trainable) under
    `lora.only_optimize`, else all but the base kernels of the `adapted` layers (frozen, as
    DeepSpeed-Chat's LoRA layers and the torch backend freeze them; their biases train)."""
    if module_cfg.lora.dim > 0 and module_cfg.lora.only_optimize:
        return lambda name: is_lora_param(name) or name.startswith("v_head.")
    frozen = {f"{layer}.kernel" for layer in adapted}
    return lambda name: name not in frozen


def model_meta(mdef: ModelDef, module_cfg: Any) -> dict:
    """What `rlhf export` needs to rebuild a checkpointed model (JSON)."""
    lora = module_cfg.lora
    return {
        "kind": mdef.kind,
        "hf_config": mdef.config.to_hf(value_head=mdef.kind == "value_head").to_dict(),
        "dtype": mdef.config.dtype,
        "lora": dataclasses.asdict(lora),
    }


def export_hf(
    mdef: ModelDef, params: Params, frozen: Params, out_dir: str | Path, tokenizer: Any = None
) -> Path:
    """Writes the model (adapters merged) as a Hugging Face directory, plus the tokenizer.

    Gathers sharded weights to the host; only the main process writes.
    """
    out_dir = Path(out_dir)
    params, frozen = to_host(params), to_host(frozen)
    if jax.process_index() != 0:
        return out_dir
    model = merge_lora(mdef.merge(params, frozen))
    save_hf(model, out_dir, dtype="float32")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    logger.info("exported %s model -> %s", mdef.kind, out_dir)
    return out_dir


def pad_rows(arrays: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pads every field to `size` rows with zeros; returns the arrays and a `[size]` row mask."""
    n = len(next(iter(arrays.values())))
    valid = np.zeros((size,), np.float32)
    valid[:n] = 1
    padded = {
        k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) if size > n else v
        for k, v in arrays.items()
    }
    return padded, valid


def load_eval_prompts(ctx: RunContext) -> PromptBatch | None:
    """The held-out prompts: `eval.dataset` (JSONL with prompt/answer), else the PPO step's
    eval split; None with `eval.metric: none`."""
    cfg = ctx.config
    if cfg.eval.metric == "none":
        return None
    from shared.data import DataReport, DatasetSpec, build_step_data, read_dataset
    from shared.data.tokenize import encode_prompt_batch

    if cfg.eval.dataset is not None:
        records, _ = read_dataset(DatasetSpec(cfg.eval.dataset, format="prompt"), cfg.data)
        prompts = encode_prompt_batch(
            ctx.tokenizer,
            records,
            max_prompt_seq_len=cfg.data.max_prompt_seq_len,
            report=DataReport(),
        )
    else:
        prompts = build_step_data(cfg.data, ctx.tokenizer, "ppo").eval
        if prompts is None:
            raise ValueError("eval.metric needs eval.dataset or an eval split of the PPO data")
    return prompts.take(slice(0, cfg.eval.max_prompts))


def eos_ids(tokenizer: Any, mdef: ModelDef) -> tuple[int, ...]:
    """Tokens that end an answer: the tokenizer's EOS (else the model config's)."""
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return (int(tokenizer.eos_token_id),)
    eos = mdef.config.eos_token_id
    return tuple(eos) if isinstance(eos, tuple) else (int(eos),)


def generate_rows(
    ctx: RunContext,
    mdef: ModelDef,
    params: Params,
    frozen: Params,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    sp: SamplingParams,
    *,
    iteration: int | None,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Answers for any number of prompt rows, `chunk` rows per jitted call (the last chunk
    padded). Uniforms: with `iteration=None` (held-out evaluation, `EVAL_ITERATION`) rows
    `start:start + chunk` of `shared.evaluation.heldout_uniforms` (prompt-major, as torch
    slices it), the last chunk padded; else `shared.sampling_uniforms(seed, iteration,
    chunk_index)`."""
    from shared.evaluation import heldout_uniforms

    total = len(prompt_ids)
    if iteration is None:
        padded = -(-total // chunk) * chunk
        all_uniforms = heldout_uniforms(ctx.config.seed, rows=padded,
                                        max_new_tokens=sp.max_new_tokens)
    tokens, masks = [], []
    for index, start in enumerate(range(0, total, chunk)):
        rows, valid = pad_rows(
            {"ids": prompt_ids[start : start + chunk], "mask": prompt_mask[start : start + chunk]},
            chunk,
        )
        if iteration is None:
            uniforms = all_uniforms[start : start + chunk]
        else:
            uniforms = shared.sampling_uniforms(
                ctx.config.seed, iteration, index, shape=(chunk, sp.max_new_tokens)
            )
        batch = sharding.shard_batch(
            {"ids": rows["ids"], "mask": rows["mask"], "u": uniforms}, ctx.mesh
        )
        out = generate(mdef, params, frozen, batch["ids"], batch["mask"], batch["u"], sp)
        keep = valid.astype(bool)
        tokens.append(to_host(out.tokens)[keep])
        masks.append(to_host(out.response_mask)[keep])
    return np.concatenate(tokens), np.concatenate(masks)


def heldout_metrics(
    ctx: RunContext, mdef: ModelDef, params: Params, frozen: Params, prompts: PromptBatch | None
) -> dict[str, float]:
    """The held-out metric (`eval.metric`) of a causal LM: sampled with `ppo.sampling` and
    `eval.samples_per_prompt` answers per prompt, and greedy (`eval.greedy`)."""
    cfg = ctx.config
    if prompts is None or cfg.eval.metric == "none":
        return {}
    chunk = cfg.ppo.per_device_generation_batch_size * ctx.dp
    eos = eos_ids(ctx.tokenizer, mdef)
    pad = ctx.tokenizer.pad_token_id
    steps = cfg.data.max_answer_seq_len
    metric = cfg.eval.metric
    out = {}
    k = cfg.eval.samples_per_prompt
    sp = SamplingParams.from_config(cfg.ppo.sampling, max_new_tokens=steps, eos_ids=eos, pad_id=pad)
    ids = np.repeat(prompts.prompt_input_ids, k, axis=0)
    mask = np.repeat(prompts.prompt_attention_mask, k, axis=0)
    tokens, rmask = generate_rows(
        ctx, mdef, params, frozen, ids, mask, sp, iteration=EVAL_ITERATION, chunk=chunk
    )
    texts = list(np.repeat(prompts.prompt_text, k))
    answers = shared_decode(ctx.tokenizer, tokens, rmask)
    out[metric] = shared_score(metric, texts, answers)
    if cfg.eval.greedy:
        greedy = dataclasses.replace(sp, do_sample=False)
        tokens, rmask = generate_rows(
            ctx, mdef, params, frozen, prompts.prompt_input_ids, prompts.prompt_attention_mask,
            greedy, iteration=EVAL_ITERATION, chunk=chunk,
        )
        answers = shared_decode(ctx.tokenizer, tokens, rmask)
        out[f"{metric}_greedy"] = shared_score(metric, list(prompts.prompt_text), answers)
    return out


def shared_decode(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    from shared.evaluation import decode_answers

    return decode_answers(tokenizer, tokens, mask)


def shared_score(metric: str, prompts: list[str], answers: list[str]) -> float:
    from shared.evaluation import score_answers

    return float(score_answers(metric, [str(p) for p in prompts], answers))


def host_metrics(metrics: dict) -> dict[str, float]:
    """Device scalars -> Python floats."""
    return {k: float(v) for k, v in to_host(metrics).items()}

