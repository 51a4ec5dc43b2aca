"""Where a generation's time goes: the JAX sampler against the floor its matmuls set.

``python -m bench.profile_generation [--size small] [--batch 16]`` times, on the benchmark's
random-weight Llama model (prompt 64, answer 64, fp32, this process's threads):

- the whole ``jax_rlhf.sampler.generate`` call and Hugging Face ``generate`` (the baseline);
- the sampler's parts, each jitted alone: the prefill, one decode step (cache donated, as
  inside the ``while_loop``), one step's attention over the cache, ``shared.sample_token``
  plus the chosen token's log-prob;
- the *matmul floor* of a decode step: the step's weight matrices alone (q, k, v, o, gate,
  up, down of every layer, then the LM head) applied in sequence to ``[B, hidden]``
  activations, in XLA and in torch. The weights (~300 MB for ``small``) do not fit in cache,
  so this is what streaming them through the library's matmul kernels costs per token.

From these it prints the best tokens/s the sampler could reach if everything but those matmuls
were free (prefill + answer_len x floor) and that as a multiple of Hugging Face ``generate``.
docs/performance.md quotes the output. Timings only; no pass/fail.

``--rollout-dtype bfloat16`` profiles ``ppo.rollout_dtype: bfloat16``: the sampler's parts run
on the bf16 rollout copy (``jax_rlhf.rollout_weights``; bf16 KV cache) and the floor is the
same chain on bf16 weights (half the bytes); Hugging Face ``generate`` stays the fp32
baseline. The floor is also timed with q/k/v and gate/up fused into one matmul each (fewer,
wider skinny matmuls), the layout a fused model would stream.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.models import SIZES, build_model_dirs
from bench.timing import time_calls

__all__ = ["main", "profile_generation"]


def _median_s(fn, *, repeats: int, sync=lambda out: out) -> float:
    """Median seconds of ``sync(fn())`` over ``repeats`` calls after one warm-up call."""
    return time_calls(lambda: sync(fn()), warmup=1, repeats=repeats)["median_s"]


def _weight_shapes(config: dict[str, Any]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    d, f = config["hidden_size"], config["intermediate_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    return [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)], (d, config["vocab_size"])


def _matmul_floor(config: dict[str, Any], batch: int, repeats: int,
                  dtype: str = "float32") -> dict[str, float]:
    """Seconds per decode step of the weight matmuls alone, in XLA and in torch, with the
    weights in ``dtype``; ``jax_fused_s``: XLA with q/k/v and gate/up as one matmul each."""
    import jax
    import jax.numpy as jnp
    import torch

    layer_shapes, head_shape = _weight_shapes(config)
    rng = np.random.default_rng(0)
    layers = [[(rng.standard_normal(s) * 0.02).astype(np.float32) for s in layer_shapes]
              for _ in range(config["num_hidden_layers"])]
    head = (rng.standard_normal(head_shape) * 0.02).astype(np.float32)
    d, kv, f = layer_shapes[0][0], layer_shapes[1][1], layer_shapes[4][1]

    def chain(x, layers, head, matmul):
        for q, k, v, o, gate, up, down in layers:
            x = x + matmul(matmul(x, q), o) * 0.01 + (matmul(x, k).sum() + matmul(x, v).sum()) * 0
            x = x + matmul(matmul(x, gate) * matmul(x, up), down) * 0.01
        return matmul(x, head)

    def fused_chain(x, layers, head):
        for qkv, o, gate_up, down in layers:
            h = x @ qkv  # [B, d + 2 kv]
            x = x + (h[:, :d] @ o) * 0.01 + h[:, d:].sum() * 0
            g = x @ gate_up  # [B, 2 f]
            x = x + ((g[:, :f] * g[:, f:]) @ down) * 0.01
        return x @ head

    jdt = jnp.dtype(dtype)
    jax_layers = [[jnp.asarray(w, jdt) for w in ws] for ws in layers]
    jax_head = jnp.asarray(head, jdt)
    jax_chain = jax.jit(lambda x, ls, h: chain(x, ls, h, jnp.matmul))
    x = jnp.ones((batch, d), jdt)
    out = {"jax_s": _median_s(lambda: jax_chain(x, jax_layers, jax_head),
                              repeats=repeats, sync=jax.block_until_ready)}
    fused = [[jnp.concatenate([q, k, v], 1), o, jnp.concatenate([gate, up], 1), down]
             for q, k, v, o, gate, up, down in jax_layers]
    assert fused[0][0].shape == (d, d + 2 * kv)
    fused_fn = jax.jit(fused_chain)
    out["jax_fused_s"] = _median_s(lambda: fused_fn(x, fused, jax_head), repeats=repeats,
                                   sync=jax.block_until_ready)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch_layers = [[torch.from_numpy(w).to(tdt) for w in ws] for ws in layers]
    torch_head, tx = torch.from_numpy(head).to(tdt), torch.ones(batch, d, dtype=tdt)
    with torch.no_grad():
        out["torch_s"] = _median_s(lambda: chain(tx, torch_layers, torch_head, torch.matmul),
                                   repeats=repeats)
    out["weight_bytes"] = jdt.itemsize * (sum(w.size for ws in layers for w in ws) + head.size)
    return out


def profile_generation(lm_dir: str, config: dict[str, Any], *, batch: int, prompt_len: int,
                       answer_len: int, repeats: int,
                       rollout_dtype: str = "float32") -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    import shared
    from jax_rlhf.models import load_causal_lm
    from jax_rlhf.params import ModelDef
    from jax_rlhf.rollout_weights import RolloutWeights
    from jax_rlhf.sampler import SamplingParams, generate

    vocab = config["vocab_size"]
    rng = np.random.default_rng(0)
    ids_np = rng.integers(3, vocab, (batch, prompt_len))
    uniforms_np = rng.random((batch, answer_len)).astype(np.float32)
    sync = jax.block_until_ready

    model = load_causal_lm(lm_dir)
    mdef, params, frozen = ModelDef.split(model)
    mdef, params, frozen = RolloutWeights(mdef, rollout_dtype).get(
        SimpleNamespace(params=params, frozen=frozen))
    ids, mask = jnp.asarray(ids_np, jnp.int32), jnp.ones((batch, prompt_len), jnp.int32)
    uniforms = jnp.asarray(uniforms_np)
    sampling = SamplingParams(max_new_tokens=answer_len, eos_ids=(vocab,), pad_id=0)
    out: dict[str, Any] = {}
    out["jax_generate_s"] = _median_s(
        lambda: generate(mdef, params, frozen, ids, mask, uniforms, sampling),
        repeats=repeats, sync=sync)

    cache_len = prompt_len + answer_len

    @jax.jit
    def prefill(weights, frozen, ids, mask):
        lm = mdef.merge(weights, frozen)
        logits, cache = lm(ids, mask, cache=lm.init_cache(batch, cache_len), logits_to_keep=1)
        return logits[:, -1], cache

    out["jax_prefill_s"] = _median_s(lambda: prefill(params, frozen, ids, mask),
                                     repeats=repeats, sync=sync)

    def step(weights, frozen, token, cache):
        lm = mdef.merge(weights, frozen)
        logits, cache = lm(token[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache)
        return logits[:, -1], cache

    step = jax.jit(step, donate_argnums=(3,))
    _, cache = prefill(params, frozen, ids, mask)
    token = jnp.zeros((batch,), jnp.int32)
    state = {"cache": cache}

    def one_step():
        logits, state["cache"] = step(params, frozen, token, state["cache"])
        return logits

    out["jax_decode_step_s"] = _median_s(one_step, repeats=max(repeats, 10), sync=sync)

    logits = jnp.asarray(rng.standard_normal((batch, vocab)), jnp.float32)

    @jax.jit
    def pick(logits, u):
        chosen = shared.sample_token(logits, u).astype(jnp.int32)
        return chosen, jnp.take_along_axis(jax.nn.log_softmax(logits, -1), chosen[:, None], -1)

    out["jax_sample_token_s"] = _median_s(lambda: pick(logits, uniforms[:, 0]),
                                          repeats=max(repeats, 10), sync=sync)
    out["matmul_floor_step_s"] = _matmul_floor(config, batch, max(repeats, 10), rollout_dtype)

    hf = transformers.AutoModelForCausalLM.from_pretrained(lm_dir)
    hf.eval()
    hf.generation_config.eos_token_id = None
    t_ids = torch.from_numpy(ids_np).long()

    def hf_generate():
        with torch.no_grad():
            return hf.generate(t_ids, attention_mask=torch.ones_like(t_ids),
                               max_new_tokens=answer_len, do_sample=True, top_k=0, top_p=1.0,
                               temperature=1.0, pad_token_id=0)

    out["hf_generate_s"] = _median_s(hf_generate, repeats=repeats)

    tokens = batch * answer_len
    floor = out["matmul_floor_step_s"]["jax_s"]
    best = out["jax_prefill_s"] + answer_len * floor
    out.update({
        "batch": batch, "prompt_len": prompt_len, "answer_len": answer_len,
        "rollout_dtype": rollout_dtype, "jax_tokens_per_s": tokens / out["jax_generate_s"],
        "hf_tokens_per_s": tokens / out["hf_generate_s"],
        "jax_vs_hf": out["hf_generate_s"] / out["jax_generate_s"],
        "best_case_s": best, "best_case_tokens_per_s": tokens / best,
        "best_case_vs_hf": out["hf_generate_s"] / best,
        "decode_step_vs_matmul_floor": out["jax_decode_step_s"] / floor,
    })
    return out


def render(result: dict[str, Any]) -> str:
    ms = lambda s: f"{1e3 * s:.1f} ms"  # noqa: E731
    floor = result["matmul_floor_step_s"]
    answer = result["answer_len"]
    step, prefill = result["jax_decode_step_s"], result["jax_prefill_s"]
    rows = [
        ("JAX sampler, whole call", f"{result['jax_generate_s']:.2f} s",
         f"{result['jax_tokens_per_s']:.0f} tok/s ({result['jax_vs_hf']:.2f}x HF)"),
        ("HF generate, whole call", f"{result['hf_generate_s']:.2f} s",
         f"{result['hf_tokens_per_s']:.0f} tok/s"),
        ("JAX prefill (LM head on the last position)", ms(prefill),
         f"{prefill / result['jax_generate_s']:.0%} of the call"),
        ("JAX decode step", ms(step),
         f"x{answer} = {answer * step:.2f} s, {answer * step / result['jax_generate_s']:.0%}"),
        ("  of which sample_token + log-prob", ms(result["jax_sample_token_s"]),
         f"{result['jax_sample_token_s'] / step:.0%} of a step"),
        ("decode-step matmul floor, XLA", ms(floor["jax_s"]),
         f"{floor['weight_bytes'] / floor['jax_s'] / 1e9:.1f} GB/s of weights; the step is "
         f"{result['decode_step_vs_matmul_floor']:.2f}x it"),
        ("decode-step matmul floor, XLA, q/k/v and gate/up fused", ms(floor["jax_fused_s"]),
         f"{floor['weight_bytes'] / floor['jax_fused_s'] / 1e9:.1f} GB/s of weights"),
        ("decode-step matmul floor, torch", ms(floor["torch_s"]),
         f"{floor['weight_bytes'] / floor['torch_s'] / 1e9:.1f} GB/s of weights"),
        ("best case: prefill + answer x XLA floor", f"{result['best_case_s']:.2f} s",
         f"{result['best_case_tokens_per_s']:.0f} tok/s = {result['best_case_vs_hf']:.2f}x HF"),
    ]
    lines = [f"batch {result['batch']}, prompt {result['prompt_len']}, answer {answer}, "
             f"rollout dtype {result['rollout_dtype']}", "",
             "| part | time | share / rate |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_generation",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--answer-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rollout-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the sampler's weights (ppo.rollout_dtype); HF generate stays fp32")
    p.add_argument("--model-cache", type=Path, default=None,
                   help="where the random-weight model directories are kept (default: a "
                   "temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        dirs = build_model_dirs(args.size, args.model_cache or scratch)
        result = profile_generation(dirs["lm"], SIZES[args.size], batch=args.batch,
                                    prompt_len=args.prompt_len, answer_len=args.answer_len,
                                    repeats=args.repeats, rollout_dtype=args.rollout_dtype)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
