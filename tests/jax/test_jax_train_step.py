"""The pieces of every training step: split-invariant accumulation, AdamW equal to torch's,
remat, bf16 compute over fp32 master weights, LoRA adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import shared
from jax_rlhf import sharding
from jax_rlhf.models import (
    CausalLM,
    ModelConfig,
    apply_lora,
    is_lora_param,
    lora_targets,
    merge_lora,
    save_hf,
    set_remat,
)
from jax_rlhf.optim import make_optimizer
from jax_rlhf.params import ModelDef
from jax_rlhf.train.sft import SFTTrainer
from jax_rlhf.train.step import (
    accumulate_gradients,
    apply_gradients,
    init_train_state,
    jit_step,
    stack_micro_batches,
)
from jax_rlhf.train.supervised import StepSpec, _train_step
from shared.config import MeshConfig, OptimizerConfig

TINY = ModelConfig(
    family="llama", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
    head_dim=8, intermediate_size=32, max_position_embeddings=16, tie_word_embeddings=True,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def _sft_batch(rows=8, length=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 32, (rows, length)).astype(np.int32)
    lengths = rng.integers(4, length + 1, (rows, 1))
    mask = (np.arange(length)[None, :] < lengths).astype(np.int32)
    loss_mask = mask * (np.arange(length)[None, :] >= 3)
    return {"input_ids": ids * mask, "attention_mask": mask, "loss_mask": loss_mask}


def _model(cfg=TINY, seed=0):
    return CausalLM(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_accumulation_never_changes_the_gradient(agg_mode):
    """4 micro-batches of 2 rows give the loss and gradient of one batch of 8 rows, because
    each micro-batch divides by the count of the whole batch."""
    mdef, params, frozen = ModelDef.split(_model())
    batch = _sft_batch()
    spec = StepSpec(SFTTrainer, mdef, OptimizerConfig(), 10, None, agg_mode)

    def grads_for(num_micro):
        stacked = jax.tree.map(jnp.asarray, stack_micro_batches(batch, num_micro))
        normalizer = SFTTrainer.normalizer(spec, stacked)

        def loss_fn(p, mb):
            return SFTTrainer.loss(spec, mdef.merge(p, frozen), mb, normalizer)

        return jax.jit(lambda p: accumulate_gradients(loss_fn, p, stacked))(params)

    full_grads, full_aux = grads_for(1)
    split_grads, split_aux = grads_for(4)
    np.testing.assert_allclose(split_aux["loss"], full_aux["loss"], rtol=1e-6)
    assert split_aux["tokens"] == full_aux["tokens"]
    for name in full_grads:
        scale = np.abs(full_grads[name]).max()
        np.testing.assert_allclose(split_grads[name], full_grads[name], atol=1e-6 * scale,
                                   err_msg=name)


def test_sft_train_step_with_accumulation_matches_one_big_batch():
    mesh = sharding.make_mesh(MeshConfig())
    optim = OptimizerConfig(learning_rate=1e-2, eps=1e-3, num_warmup_steps=0)
    batch = _sft_batch()
    results = []
    for num_micro in (1, 4):
        mdef, params, frozen = ModelDef.split(_model())
        spec = StepSpec(SFTTrainer, mdef, optim, 10, None, "token-mean")
        state = init_train_state(params, frozen, spec.optimizer(params).tx, mesh)
        step = jit_step(_train_step, mesh, sharding.tree_shardings(state), static_spec=True)
        stacked = sharding.shard_batch(stack_micro_batches(batch, num_micro), mesh, axis=1)
        state, metrics = step(spec, state, stacked)
        results.append((state, metrics))
    (one, m1), (four, m4) = results
    assert int(one.step) == int(four.step) == 1
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for name in one.params:
        np.testing.assert_allclose(four.params[name], one.params[name], atol=1e-6, err_msg=name)


def test_adamw_schedule_and_clipping_match_torch():
    """Three steps of our optimizer against torch.optim.AdamW with the same param groups
    (no decay on biases and norm scales), clip_grad_norm_ and the shared schedule."""
    cfg = OptimizerConfig(learning_rate=0.1, weight_decay=0.3, betas=(0.8, 0.9), eps=1e-6,
                          num_warmup_steps=1, lr_scheduler_type="cosine", max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    params = {"layer.kernel": rng.normal(size=(4, 3)).astype(np.float32),
              "layer.bias": rng.normal(size=(3,)).astype(np.float32)}
    grads = [{k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in params.items()}
             for s in (3.0, 0.2, 5.0)]
    opt = make_optimizer(cfg, params, total_steps=4)
    ours, opt_state = jax.tree.map(jnp.asarray, params), opt.tx.init(params)
    for g in grads:
        updates, opt_state = opt.tx.update(jax.tree.map(jnp.asarray, g), opt_state, ours)
        ours = optax.apply_updates(ours, updates)

    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    torch_opt = torch.optim.AdamW(
        [{"params": [tensors["layer.kernel"]], "weight_decay": cfg.weight_decay},
         {"params": [tensors["layer.bias"]], "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps,
    )
    schedule = shared.make_schedule("cosine", base_lr=cfg.learning_rate, warmup_steps=1,
                                    total_steps=4)
    for step, g in enumerate(grads):
        for group in torch_opt.param_groups:
            group["lr"] = schedule(step)
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(g[name])
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), cfg.max_grad_norm)
        torch_opt.step()
    for name, tensor in tensors.items():
        np.testing.assert_allclose(ours[name], tensor.detach().numpy(), rtol=1e-5, atol=1e-6)


def _loss_and_grads(model, batch):
    spec = StepSpec(SFTTrainer, None, None, 1, None, "token-mean")
    batch = jax.tree.map(jnp.asarray, batch)

    normalizer = SFTTrainer.normalizer(spec, jax.tree.map(lambda x: x[None], batch))

    def f(m):
        return SFTTrainer.loss(spec, m, batch, normalizer)[0]

    return nnx.value_and_grad(f)(model)


def test_remat_gives_the_same_gradients():
    batch = _sft_batch()
    model = _model(TINY.replace(num_layers=1))
    loss, grads = _loss_and_grads(model, batch)
    set_remat(model)
    assert model.model.remat
    jaxpr = str(jax.make_jaxpr(lambda m: _loss_and_grads(m, batch)[0])(model))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    loss_remat, grads_remat = _loss_and_grads(model, batch)
    assert float(loss_remat) == float(loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_compute_keeps_fp32_master_weights():
    batch = _sft_batch()
    loss32, _ = _loss_and_grads(_model(), batch)
    model16 = _model(TINY.replace(dtype="bfloat16"))
    loss16, grads16 = _loss_and_grads(model16, batch)
    logits, _ = nnx.jit(lambda m, b: m(b["input_ids"], b["attention_mask"]))(model16, batch)
    assert logits.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads16))
    assert abs(float(loss16) - float(loss32)) < 2e-2 * float(loss32)


def test_lora_selection_by_hf_module_names():
    model = _model()
    assert lora_targets(model, module_name="layers.1.") == [
        f"model.layers.1.{m}" for m in ("attn.k_proj", "attn.o_proj", "attn.q_proj",
                                        "attn.v_proj", "mlp.down_proj", "mlp.gate_proj",
                                        "mlp.up_proj")
    ]
    # peft-style suffixes; HF names say self_attn, ours attn
    assert lora_targets(model, module_name="", target_modules=("self_attn.q_proj", "v_proj")) == [
        "model.layers.0.attn.q_proj", "model.layers.0.attn.v_proj",
        "model.layers.1.attn.q_proj", "model.layers.1.attn.v_proj",
    ]
    with pytest.raises(ValueError, match="no Linear layer matches"):
        apply_lora(model, rank=2, alpha=1.0, module_name="decoder.layers.", rngs=nnx.Rngs(0))


def test_lora_only_optimize_trains_adapters_and_exports_merged(tmp_path, apply):
    model = _model()
    ids, mask = jnp.asarray(_sft_batch()["input_ids"]), jnp.asarray(_sft_batch()["attention_mask"])
    before, _ = apply(model, ids, mask)
    apply_lora(model, rank=4, alpha=8.0, module_name="layers.", rngs=nnx.Rngs(1))
    start, _ = apply(model, ids, mask)
    np.testing.assert_array_equal(start, before)  # B starts at zero
    mdef, params, frozen = ModelDef.split(model, trainable=is_lora_param)
    assert params and all(is_lora_param(n) for n in params)
    assert "model.embed_tokens.embedding" in frozen
    mesh = sharding.make_mesh(MeshConfig())
    spec = StepSpec(SFTTrainer, mdef, OptimizerConfig(learning_rate=1e-2), 10, None,
                    "token-mean")
    state = init_train_state(params, frozen, spec.optimizer(params).tx, mesh)
    step = jit_step(_train_step, mesh, sharding.tree_shardings(state), static_spec=True,
                    donate=False)
    batch = sharding.shard_batch(stack_micro_batches(_sft_batch(), 1), mesh, axis=1)
    for _ in range(3):
        state, _ = step(spec, state, batch)
    for name, value in frozen.items():
        np.testing.assert_array_equal(state.frozen[name], value)
    assert any(not np.array_equal(state.params[n], params[n]) for n in params)
    trained = mdef.merge(state.params, state.frozen)
    out, _ = apply(trained, ids, mask)
    assert np.abs(np.asarray(out - before)).max() > 1e-4
    merged = merge_lora(trained)
    np.testing.assert_allclose(apply(merged, ids, mask)[0], out, atol=1e-5)
    save_hf(merged, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=torch.tensor(np.asarray(ids)).long(),
                       attention_mask=torch.tensor(np.asarray(mask)).long(),
                       position_ids=torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))).logits
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(hf_logits.numpy()[real], np.asarray(out)[real], atol=1e-4)


def test_lora_learning_rate_is_separate():
    model = _model()
    apply_lora(model, rank=2, alpha=2.0, module_name="layers.", rngs=nnx.Rngs(1))
    _, params, _ = ModelDef.split(model)
    cfg = OptimizerConfig(learning_rate=1e-2, lr_scheduler_type="constant")
    opt = make_optimizer(cfg, params, total_steps=1, lora_learning_rate=0.0)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(opt.tx.update)(grads, opt.tx.init(params), params)
    assert all(np.abs(updates[n]).max() == 0 for n in params if is_lora_param(n))
    assert all(np.abs(updates[n]).max() > 0 for n in params if not is_lora_param(n))


def test_pad_token_lookups_send_no_gradient_to_the_embedding():
    """As `torch.nn.Embedding(padding_idx=pad_token_id)` in HF Llama/OPT: the pad row is
    looked up (right padding here) but never updated through its lookups."""
    model = _model(TINY.replace(tie_word_embeddings=False, num_layers=1))
    ids = jnp.asarray([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]])
    mask = (ids != 0).astype(jnp.int32)

    @nnx.jit
    def embedding_grad(m):
        def f(m):
            logits, _ = m(ids, jnp.ones_like(mask))  # every position counts, pads included
            return jnp.sum(logits**2)

        return nnx.grad(f)(m).model.embed_tokens.embedding[...]

    grad = np.asarray(embedding_grad(model))
    assert np.abs(grad[0]).max() == 0 and np.abs(grad[5]).max() > 0


def test_non_finite_gradients_are_never_applied():
    """`apply_gradients` with a NaN in the gradients keeps the state (parameters, optimiser
    state, step counter: the schedule does not advance) and reports a NaN norm, which the
    loops' non-finite guard counts (`shared.guard`)."""
    params = {"w": jnp.ones((3,)), "b": jnp.zeros((2,))}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    state = init_train_state(params, {}, tx, sharding.make_mesh(MeshConfig()))
    grads = {"w": jnp.asarray([1.0, jnp.nan, 0.0]), "b": jnp.ones((2,))}
    skipped, norm = jax.jit(apply_gradients, static_argnums=2)(state, grads, tx)
    assert np.isnan(norm) and int(skipped.step) == int(state.step)
    for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finite = {"w": jnp.ones((3,)), "b": jnp.ones((2,))}
    applied, norm = jax.jit(apply_gradients, static_argnums=2)(state, finite, tx)
    assert np.isfinite(norm) and int(applied.step) == int(state.step) + 1
    assert not np.array_equal(np.asarray(applied.params["w"]), np.asarray(state.params["w"]))
