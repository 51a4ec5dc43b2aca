"""Experiments on the JAX sampler's decode step and while-loop carry (issue #16, item 1).

``python -m bench.sampler_experiments [--hlo-dump DIR] [--rollout-dtype bfloat16] [--rounds 7]``
on the benchmark's random-weight ``small`` Llama (batch 16, prompt 64, answer 64):

- **carry**: the optimized HLO of the jitted sampler (``jax_rlhf.sampler._sample_jit``): the
  ``while`` op's carry (its buffers and total bytes), and the op counts of the loop body's own
  computation (``copy``, ``copy-start``, ``dynamic-update-slice``, ``tuple``, ...): a per-step
  copy of the KV cache or of another carry buffer shows up there. The whole call is then timed
  against its parts (prefill, decode step, sampling step), alternately, and what is left is the
  loop's own cost (carry, condition, the token bookkeeping).
- **decode step variants**, timed round-robin in this process (``--rounds`` rounds, medians):
  the product step (``CausalLM`` with its cache donated, as in the loop) and a functional
  re-implementation of the same Llama step on plain arrays (checked to give the product's
  logits) in these weight layouts: ``split`` (as the model stores them), ``fused`` (q/k/v and
  gate/up concatenated once, as a rollout copy could be), ``int8`` (weight-only int8 with a
  per-output-channel scale, converted to the compute dtype inside the step), ``int8_fused``
  and ``no_head`` (``split`` without the LM head: the head's share of a step); and KV-cache
  layouts (``split`` uses the old ``[B, S, K, D]``; ``kv_bksd`` is the heads-major
  ``[B, K, S, D]``, ``kv_k_bksd_v_bkds`` values ``[B, K, D, S]``; ``fused+kv_bksd`` both),
  with the count of whole-cache relayouts in each step's optimized HLO. Plus the XLA matmul
  floor of ``bench.profile_generation`` (the weight matmuls alone, timed separately).
- whether XLA fused the int8 -> float convert into the dot: the int8 step's optimized HLO is
  searched for a converted weight-sized buffer outside a dot fusion.

Timings only; no pass/fail. The figures in docs/performance.md's JAX sampler section came from
this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.models import SIZES, build_model_dirs

__all__ = ["carry_report", "main", "round_robin", "step_variants"]

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1, "s8": 1, "u32": 4, "f16": 2, "u8": 1}


def round_robin(fns: dict[str, Any], *, rounds: int, sync) -> dict[str, dict[str, float]]:
    """Each function timed once per round, in turn (one warm-up round first): medians and
    spreads of every variant, taken under the same machine load."""
    for fn in fns.values():
        sync(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
    first = next(iter(times.values()))
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                   # the same-round ratio to the first variant: drift between rounds cancels
                   "paired_ratio_median": statistics.median(
                       t / f for t, f in zip(ts, first, strict=True)),
                   "times_s": [round(t, 5) for t in ts]}
            for name, ts in times.items()}


# ---------------------------------------------------------------------------- HLO of the loop


def _shape_bytes(shape: str) -> list[tuple[str, int]]:
    """``(f32[16,128,4,64], s32[])``-style text to ``[(piece, bytes), ...]``."""
    out = []
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        if dtype not in _DTYPE_BYTES:
            continue
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        out.append((f"{dtype}[{dims}]", n * _DTYPE_BYTES[dtype]))
    return out


def _computations(hlo: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines (optimized HLO text)."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name is not None and line.startswith("  "):
            comps[name].append(line.strip())
    return comps


def _opcode(line: str) -> str:
    m = re.match(r"^(?:ROOT )?%?[\w.\-]+ = (.*?) ([\w\-]+)\(", line)
    return m.group(2) if m else "?"


def analyse_while(hlo: str) -> dict[str, Any]:
    """The sampler's ``while`` op: carry pieces and bytes, the body's op counts, and every
    ``copy``-like op in the body (whose shapes say which buffer is copied per step)."""
    comps = _computations(hlo)
    whiles = [(c, line) for c, lines in comps.items() for line in lines
              if _opcode(line) == "while"]
    if not whiles:
        raise ValueError("no while op in the optimized HLO")
    report: dict[str, Any] = {"while_ops": len(whiles)}
    # the decode loop is the while with the largest carry
    _, line = max(whiles, key=lambda cl: sum(b for _, b in _shape_bytes(cl[1].split(" while(")[0])))
    carry_shape = line.split(" while(")[0]
    pieces = _shape_bytes(carry_shape)
    report["carry_pieces"] = len(pieces)
    report["carry_bytes"] = sum(b for _, b in pieces)
    report["carry_largest"] = Counter(p for p, _ in pieces).most_common(6)
    body = re.search(r"body=%?([\w.\-]+)", line).group(1)
    cond = re.search(r"condition=%?([\w.\-]+)", line).group(1)
    lines = comps[body]
    report["body"] = body
    report["body_ops"] = dict(Counter(_opcode(x) for x in lines).most_common())
    copies = [x for x in lines if _opcode(x) in ("copy", "copy-start", "copy-done")]
    report["body_copies"] = [(_opcode(x), *_shape_bytes(x.split("=")[1].split("(")[0])[0])
                             for x in copies]  # (opcode, shape, bytes)
    report["body_copy_bytes"] = sum(c[-1] for c in report["body_copies"])
    # dynamic-update-slices: top-level ones and those inside fusions the body calls
    called = set(re.findall(r"calls=%?([\w.\-]+)", "\n".join(lines)))
    dus_in_fusions = sum(1 for c in called for x in comps.get(c, [])
                         if _opcode(x) == "dynamic-update-slice")
    report["body_dus_top_level"] = report["body_ops"].get("dynamic-update-slice", 0)
    report["body_dus_in_fusions"] = dus_in_fusions
    report["cond_ops"] = dict(Counter(_opcode(x) for x in comps[cond]).most_common())
    return report


def carry_report(ctx: SimpleNamespace, *, rounds: int, hlo_dir: Path | None) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    import shared
    from jax_rlhf.sampler import _sample_jit

    hlo = _sample_jit.lower(ctx.mdef, ctx.params, ctx.frozen, ctx.ids, ctx.mask, ctx.uniforms,
                            ctx.sampling).compile().as_text()
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"sampler_{ctx.dtype}.hlo.txt").write_text(hlo)
    out = {"hlo": analyse_while(hlo)}
    out["hlo"]["module_copies"] = sum(1 for line in hlo.splitlines()
                                      if _opcode(line.strip()) == "copy")

    mdef, batch, cache_len = ctx.mdef, ctx.batch, ctx.prompt_len + ctx.answer_len

    @jax.jit
    def prefill(weights, frozen, ids, mask):
        lm = mdef.merge(weights, frozen)
        logits, cache = lm(ids, mask, cache=lm.init_cache(batch, cache_len), logits_to_keep=1)
        return logits[:, -1], cache

    step = jax.jit(_product_step(mdef, batch), donate_argnums=(3,))
    _, cache = prefill(ctx.params, ctx.frozen, ctx.ids, ctx.mask)
    state = {"cache": cache}
    token = jnp.zeros((batch,), jnp.int32)
    logits = jnp.zeros((batch, mdef.config.vocab_size), jnp.float32)

    def one_step():
        out, state["cache"] = step(ctx.params, ctx.frozen, token, state["cache"])
        return out

    @jax.jit
    def pick(logits, u):
        chosen = shared.sample_token(logits, u).astype(jnp.int32)
        return chosen, jnp.take_along_axis(jax.nn.log_softmax(logits, -1), chosen[:, None], -1)

    times = round_robin({
        "generate": lambda: _sample_jit(ctx.mdef, ctx.params, ctx.frozen, ctx.ids, ctx.mask,
                                        ctx.uniforms, ctx.sampling),
        "prefill": lambda: prefill(ctx.params, ctx.frozen, ctx.ids, ctx.mask),
        "step": one_step,
        "pick": lambda: pick(logits, ctx.uniforms[:, 0]),
    }, rounds=rounds, sync=jax.block_until_ready)
    med = {k: v["median_s"] for k, v in times.items()}
    parts = med["prefill"] + ctx.answer_len * (med["step"] + med["pick"])
    out["times"] = times
    out["loop_overhead_s"] = med["generate"] - parts
    out["loop_overhead_per_step_s"] = (med["generate"] - parts) / ctx.answer_len
    return out


# ------------------------------------------------------------------- decode-step variants


def _product_step(mdef, batch):
    import jax.numpy as jnp

    def step(weights, frozen, token, cache):
        lm = mdef.merge(weights, frozen)
        logits, cache = lm(token[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache)
        return logits[:, -1], cache
    return step


def _arrays(params, frozen) -> dict[str, Any]:
    """Flat ``path -> array`` of the model's parameters."""
    import jax

    flat = {}
    for tree in (params, frozen):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            key = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
            flat[key] = leaf
    return flat


def _quantize(w, dtype):
    """Weight-only int8, per output channel: ``w ~= q * scale`` with ``q`` int8 ``[in, out]``
    and ``scale`` ``[out]`` in ``dtype``."""
    import jax.numpy as jnp

    w32 = w.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w32), axis=0), 1e-12) / 127.0
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return {"q": q, "scale": scale.astype(dtype)}


def build_layouts(flat: dict[str, Any], cfg, dtype) -> dict[str, dict[str, Any]]:
    """The functional step's weights per layout (``split``, ``fused``, ``int8``,
    ``int8_fused``), built once as a rollout copy would be."""
    import jax.numpy as jnp

    def find(suffix):
        hits = [k for k in flat if k.endswith(suffix)]
        if len(hits) != 1:
            raise KeyError(f"{suffix}: {hits}")
        return flat[hits[0]]

    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        layers.append({
            "attn_norm": find(p + "attn_norm.scale"), "mlp_norm": find(p + "mlp_norm.scale"),
            **{n: find(f"{p}attn.{n}_proj.kernel") for n in "qkvo"},
            **{n: find(f"{p}mlp.{n}_proj.kernel") for n in ("gate", "up", "down")},
        })
    common = {"embed": find("embed_tokens.embedding"), "final_norm": find("final_norm.scale"),
              "head": find("lm_head.kernel")}
    split = {**common, "layers": layers}
    fused = {**common, "layers": [
        {"attn_norm": lyr["attn_norm"], "mlp_norm": lyr["mlp_norm"], "o": lyr["o"],
         "down": lyr["down"],
         "qkv": jnp.concatenate([lyr["q"], lyr["k"], lyr["v"]], axis=1),
         "gate_up": jnp.concatenate([lyr["gate"], lyr["up"]], axis=1)}
        for lyr in layers]}
    mats = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up")

    def quant(tree):
        return {**tree, "head": _quantize(tree["head"], dtype), "layers": [
            {k: (_quantize(v, dtype) if k in mats else v) for k, v in lyr.items()}
            for lyr in tree["layers"]]}
    return {"split": split, "fused": fused, "int8": quant(split), "int8_fused": quant(fused)}


KV_LAYOUTS = {
    # name: (key cache axes, value cache axes); the product's cache is "bskd"
    "bskd": ("bskd", "bskd"),
    "bksd": ("bksd", "bksd"),
    "k_bksd_v_bkds": ("bksd", "bkds"),
}


def _relayout(x, src: str, dst: str):
    import jax.numpy as jnp

    return jnp.transpose(x, [src.index(c) for c in dst])


PRODUCT_KV_LAYOUT = "bskd"  # the product cache: [B, S, K, D] (46cac81 reverted)
"""``jax_rlhf.models.kv_cache``'s layout, ``[B, kv_heads, max_len, head_dim]`` (it was
``bskd`` before this experiment: the functional ``split`` variant keeps that one)."""


def _relayout_cache(cache, layout: str):
    """A product cache with its keys/values in ``KV_LAYOUTS[layout]``."""
    k_axes, v_axes = KV_LAYOUTS[layout]
    return dataclasses.replace(
        cache, keys=tuple(_relayout(k, PRODUCT_KV_LAYOUT, k_axes) for k in cache.keys),
        values=tuple(_relayout(v, PRODUCT_KV_LAYOUT, v_axes) for v in cache.values))


def functional_step(cfg, *, head: bool = True, kv_layout: str = "bskd"):
    """One Llama decode step on plain arrays (the product model's math, its cache layout):
    ``(weights, token [B], cache) -> (logits [B, V] or hidden [B, D], cache)``. A weight is an
    array (``x @ w``) or an int8 ``{"q", "scale"}`` (``(x @ q.astype(x.dtype)) * scale``);
    ``qkv`` / ``gate_up`` entries are used when present. ``kv_layout`` (of ``KV_LAYOUTS``):
    the axis order of the cache's keys and values (the caller relayouts the prefill's)."""
    import jax
    import jax.numpy as jnp

    from jax_rlhf.models.kv_cache import KVCache
    from jax_rlhf.models.layers import apply_rope, rope_cos_sin, rope_inv_freq

    heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    groups, d_q, d_kv, inner = heads // kv_heads, heads * hd, kv_heads * hd, cfg.intermediate_size
    inv_freq = rope_inv_freq(rotary_dim=hd, theta=cfg.rope_theta)
    k_axes, v_axes = KV_LAYOUTS[kv_layout]

    def mm(x, w):
        if isinstance(w, dict):
            return (x @ w["q"].astype(x.dtype)) * w["scale"]
        return x @ w

    def rms(x, scale):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return scale * (x32 * jax.lax.rsqrt(var + cfg.norm_eps)).astype(x.dtype)

    def step(w, token, cache: KVCache):
        batch = token.shape[0]
        dtype = cache.keys[0].dtype
        index = cache.index
        kv_mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((batch, 1), bool),
                                               (0, index))
        pos = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]  # [B, 1]
        allowed = kv_mask & (jnp.arange(kv_mask.shape[1])[None] <= index)  # [B, S]
        cos, sin = rope_cos_sin(pos, head_dim=hd, theta=cfg.rope_theta, dtype=dtype,
                                inv_freq=inv_freq)  # [B, 1, D]
        x = w["embed"][token].astype(dtype)  # [B, H]
        keys, values = [], []
        for i, lyr in enumerate(w["layers"]):
            h = rms(x, lyr["attn_norm"])
            if "qkv" in lyr:
                qkv = mm(h, lyr["qkv"])
                q, k, v = qkv[:, :d_q], qkv[:, d_q:d_q + d_kv], qkv[:, d_q + d_kv:]
            else:
                q, k, v = mm(h, lyr["q"]), mm(h, lyr["k"]), mm(h, lyr["v"])
            q = apply_rope(q.reshape(batch, kv_heads, groups, hd), cos[:, :, None], sin[:, :, None])
            k = apply_rope(k.reshape(batch, kv_heads, hd), cos, sin)
            v = v.reshape(batch, kv_heads, hd)
            ck = jax.lax.dynamic_update_slice(
                cache.keys[i], _relayout(k[:, None], "bskd", k_axes),
                tuple(index if c == "s" else 0 for c in k_axes))
            cv = jax.lax.dynamic_update_slice(
                cache.values[i], _relayout(v[:, None], "bskd", v_axes),
                tuple(index if c == "s" else 0 for c in v_axes))
            keys.append(ck)
            values.append(cv)
            scores = jnp.einsum(f"bkgd,{k_axes}->bkgs", q, ck) * hd**-0.5
            scores = jnp.where(allowed[:, None, None], scores.astype(jnp.float32),
                               jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
            att = jnp.einsum(f"bkgs,{v_axes}->bkgd", probs, cv).reshape(batch, d_q)
            x = x + mm(att, lyr["o"])
            h = rms(x, lyr["mlp_norm"])
            if "gate_up" in lyr:
                gu = mm(h, lyr["gate_up"])
                g, u = gu[:, :inner], gu[:, inner:]
            else:
                g, u = mm(h, lyr["gate"]), mm(h, lyr["up"])
            x = x + mm(jax.nn.silu(g) * u, lyr["down"])
        x = rms(x, w["final_norm"])
        new = KVCache(keys=tuple(keys), values=tuple(values), mask=kv_mask, index=index + 1)
        return (mm(x, w["head"]) if head else x), new
    return step


def _int8_converts(hlo: str, in_out: set[tuple[int, int]]) -> dict[str, int]:
    """Weight-shaped converts to float in the optimized HLO: ``in_dot`` when the computation
    holding the convert also holds the dot (XLA fused the dequantisation into the matmul),
    ``materialised`` when it does not (the float weight is written out before the dot)."""
    counts = {"in_dot": 0, "materialised": 0}
    for lines in _computations(hlo).values():
        has_dot = any(_opcode(x) in ("dot", "convolution") for x in lines)
        for line in lines:
            m = re.match(r"^(?:ROOT )?%?[\w.\-]+ = (f32|bf16)\[(\d+),(\d+)\]", line)
            if m and _opcode(line) == "convert" and (int(m.group(2)), int(m.group(3))) in in_out:
                counts["in_dot" if has_dot else "materialised"] += 1
    return counts


STEP_VARIANTS = ("product", "split", "fused", "int8", "int8_fused", "no_head",
                 "kv_bksd", "kv_k_bksd_v_bkds", "fused+kv_bksd")


def _cache_transposes(hlo: str, cache_elems: int) -> int:
    """Top-level ops of the optimized HLO that write a whole layer's cache (``cache_elems``
    elements) in another layout (``transpose``/``copy`` or a fusion named so): per-step
    relayouts of the KV cache for the attention dots."""
    count = 0
    for name, lines in _computations(hlo).items():
        if "computation" in name:  # inside a fusion: not a buffer of its own
            continue
        for line in lines:
            m = re.match(r"^(?:ROOT )?%?([\w.\-]+) = [a-z0-9]+\[([\d,]+)\]", line)
            if not m or int(np.prod([int(d) for d in m.group(2).split(",")])) != cache_elems:
                continue
            if _opcode(line) in ("transpose", "copy") or "transpose" in m.group(1):
                count += 1
    return count


def step_variants(ctx: SimpleNamespace, *, rounds: int, hlo_dir: Path | None,
                  variants: tuple[str, ...] = STEP_VARIANTS) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from bench.profile_generation import _matmul_floor

    mdef, batch, cfg = ctx.mdef, ctx.batch, ctx.mdef.config
    dtype = jnp.dtype(cfg.dtype)
    layouts = build_layouts(_arrays(ctx.params, ctx.frozen), cfg, dtype)
    cache_len = ctx.prompt_len + ctx.answer_len

    @jax.jit
    def prefill(weights, frozen, ids, mask):
        lm = mdef.merge(weights, frozen)
        return lm(ids, mask, cache=lm.init_cache(batch, cache_len), logits_to_keep=1)[1]

    product = jax.jit(_product_step(mdef, batch), donate_argnums=(3,))
    fstep = jax.jit(functional_step(cfg), donate_argnums=(2,))
    fstep_nohead = jax.jit(functional_step(cfg, head=False), donate_argnums=(2,))
    layout_steps = {lay: jax.jit(functional_step(cfg, kv_layout=lay), donate_argnums=(2,))
                    for lay in KV_LAYOUTS if any(v.endswith(f"kv_{lay}") for v in variants)}
    token = jnp.asarray(np.arange(batch) + 5, jnp.int32)

    # correctness: every layout against the product step from the same cache
    ref, _ = product(ctx.params, ctx.frozen, token, prefill(ctx.params, ctx.frozen, ctx.ids,
                                                            ctx.mask))
    ref = np.asarray(ref, np.float32)
    check = {}
    for name, w in layouts.items():
        got, _ = fstep(w, token, _relayout_cache(
            prefill(ctx.params, ctx.frozen, ctx.ids, ctx.mask), "bskd"))
        got = np.asarray(got, np.float32)
        check[name] = {"max_abs_logit_diff": float(np.max(np.abs(got - ref))),
                       "argmax_agree": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}
    for lay, fn in layout_steps.items():
        got, _ = fn(layouts["split"], token, _relayout_cache(
            prefill(ctx.params, ctx.frozen, ctx.ids, ctx.mask), lay))
        check[f"kv_{lay}"] = {"max_abs_logit_diff": float(np.max(np.abs(np.asarray(got) - ref)))}

    caches = {}

    def runner(name, fn, *args, layout="bskd"):
        caches[name] = prefill(ctx.params, ctx.frozen, ctx.ids, ctx.mask)
        if fn is not product:
            caches[name] = _relayout_cache(caches[name], layout)

        def call():
            out, caches[name] = fn(*args, token, caches[name])
            return out
        return call

    fns = {}
    for name in variants:
        if name == "product":
            fns[name] = runner(name, product, ctx.params, ctx.frozen)
        elif name == "no_head":
            fns[name] = runner(name, fstep_nohead, layouts["split"])
        elif "kv_" in name:  # "kv_<layout>" or "<weights>+kv_<layout>"
            weights, _, lay = name.rpartition("kv_")
            fns[name] = runner(name, layout_steps[lay], layouts[weights.rstrip("+") or "split"],
                               layout=lay)
        else:
            fns[name] = runner(name, fstep, layouts[name])
    times = round_robin(fns, rounds=rounds, sync=jax.block_until_ready)
    floor = _matmul_floor(SIZES[ctx.size], batch, max(rounds, 10), cfg.dtype)

    product_cache = prefill(ctx.params, ctx.frozen, ctx.ids, ctx.mask)
    cache = _relayout_cache(product_cache, "bskd")
    int8_hlo = fstep.lower(layouts["int8"], token, cache).compile().as_text()
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {(d, d), (d, f), (f, d), (d, cfg.vocab_size), (d, cfg.num_kv_heads * cfg.head_dim)}
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"step_int8_{cfg.dtype}.hlo.txt").write_text(int8_hlo)
        (hlo_dir / f"step_fused_{cfg.dtype}.hlo.txt").write_text(
            fstep.lower(layouts["fused"], token, cache).compile().as_text())
    cache_sizes = {f"kv_{lay}": layout_steps[lay] for lay in layout_steps}
    cache_sizes["split"] = fstep
    transposes = {}
    for name, fn in cache_sizes.items():
        lay = name[3:] if name.startswith("kv_") else "bskd"
        lowered = fn.lower(layouts["split"], token, _relayout_cache(product_cache, lay))
        transposes[name] = _cache_transposes(lowered.compile().as_text(), cache.keys[0].size)
    lowered = product.lower(ctx.params, ctx.frozen, token, product_cache)
    transposes["product"] = _cache_transposes(lowered.compile().as_text(), cache.keys[0].size)
    return {"check": check, "times": times, "floor": floor, "cache_transposes": transposes,
            "int8_converts": _int8_converts(int8_hlo, shapes)}


# -------------------------------------------------------------------------------- driver


def setup(lm_dir: str, size: str, *, batch: int, prompt_len: int, answer_len: int,
          rollout_dtype: str) -> SimpleNamespace:
    import jax.numpy as jnp

    from jax_rlhf.models import load_causal_lm
    from jax_rlhf.params import ModelDef
    from jax_rlhf.rollout_weights import RolloutWeights
    from jax_rlhf.sampler import SamplingParams

    vocab = SIZES[size]["vocab_size"]
    rng = np.random.default_rng(0)
    mdef, params, frozen = ModelDef.split(load_causal_lm(lm_dir))
    mdef, params, frozen = RolloutWeights(mdef, rollout_dtype).get(
        SimpleNamespace(params=params, frozen=frozen))
    return SimpleNamespace(
        size=size, batch=batch, prompt_len=prompt_len, answer_len=answer_len,
        dtype=rollout_dtype, mdef=mdef, params=params, frozen=frozen,
        ids=jnp.asarray(rng.integers(3, vocab, (batch, prompt_len)), jnp.int32),
        mask=jnp.ones((batch, prompt_len), jnp.int32),
        uniforms=jnp.asarray(rng.random((batch, answer_len)), jnp.float32),
        sampling=SamplingParams(max_new_tokens=answer_len, eos_ids=(vocab,), pad_id=0))


def render(result: dict[str, Any]) -> str:
    ms = lambda s: f"{1e3 * s:.2f}"  # noqa: E731
    lines = [f"rollout dtype {result['rollout_dtype']}, batch {result['batch']}, "
             f"loadavg before {result['loadavg_before']}, after {result['loadavg_after']}"]
    if "carry" in result:
        c = result["carry"]
        h = c["hlo"]
        lines += ["", f"while carry: {h['carry_pieces']} buffers, {h['carry_bytes'] / 2**20:.1f} "
                  f"MiB; body ops {h['body_ops']}",
                  f"body copies: {h['body_copies']} ({h['body_copy_bytes']} bytes); "
                  f"dynamic-update-slice top level {h['body_dus_top_level']}, in fusions "
                  f"{h['body_dus_in_fusions']}; copies in the whole module {h['module_copies']}"]
        lines += [f"{k}: {ms(v['median_s'])} ms (min {ms(v['min_s'])}, max {ms(v['max_s'])})"
                  for k, v in c["times"].items()]
        lines.append(f"loop overhead: {ms(c['loop_overhead_s'])} ms per call, "
                     f"{ms(c['loop_overhead_per_step_s'])} ms per step")
    if "steps" in result:
        s = result["steps"]
        floor = s["floor"]["jax_s"]
        lines += ["", f"XLA matmul floor {ms(floor)} ms (fused {ms(s['floor']['jax_fused_s'])})",
                  "| variant | step ms (median) | min-max | vs floor | vs first (ratio of medians, "
                  "median of paired ratios) |", "| --- | --- | --- | --- | --- |"]
        base = s["times"].get("split", next(iter(s["times"].values())))["median_s"]
        for k, v in s["times"].items():
            lines.append(f"| {k} | {ms(v['median_s'])} | {ms(v['min_s'])}-{ms(v['max_s'])} | "
                         f"{v['median_s'] / floor:.2f}x | {v['median_s'] / base:.3f}, "
                         f"{v['paired_ratio_median']:.3f} |")
        lines.append(f"logit check vs product: {s['check']}")
        lines.append(f"int8 weight converts in the step's HLO: {s['int8_converts']}")
        lines.append(f"whole-cache relayouts per step (HLO): {s['cache_transposes']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sampler_experiments",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--answer-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rollout-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--only", choices=("carry", "steps"), default=None)
    p.add_argument("--variants", default=",".join(STEP_VARIANTS),
                   help=f"comma-separated decode-step variants to time (of {STEP_VARIANTS})")
    p.add_argument("--hlo-dump", type=Path, default=None, help="write the optimized HLO here")
    p.add_argument("--model-cache", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    loadavg = lambda: Path("/proc/loadavg").read_text().split()[:3]  # noqa: E731
    result: dict[str, Any] = {"rollout_dtype": args.rollout_dtype, "batch": args.batch,
                              "loadavg_before": loadavg()}
    with tempfile.TemporaryDirectory() as scratch:
        dirs = build_model_dirs(args.size, args.model_cache or scratch)
        ctx = setup(dirs["lm"], args.size, batch=args.batch, prompt_len=args.prompt_len,
                    answer_len=args.answer_len, rollout_dtype=args.rollout_dtype)
        if args.only in (None, "carry"):
            result["carry"] = carry_report(ctx, rounds=args.rounds, hlo_dir=args.hlo_dump)
        if args.only in (None, "steps"):
            result["steps"] = step_variants(ctx, rounds=args.rounds, hlo_dir=args.hlo_dump,
                                            variants=tuple(args.variants.split(",")))
    result["loadavg_after"] = loadavg()
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
