"""Run as a script (by test_jax_sharding.py): one SFT-style training step on 1 CPU device and
on 8 forced host devices under several meshes; prints the largest relative differences.

`XLA_FLAGS` must be set before JAX initialises its backend, which is why this runs in its
own process: the test process keeps its default device count.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import shared  # noqa: E402
from jax_rlhf import sharding  # noqa: E402
from jax_rlhf.models import CausalLM, ModelConfig  # noqa: E402
from jax_rlhf.optim import make_optimizer  # noqa: E402
from jax_rlhf.params import ModelDef  # noqa: E402
from jax_rlhf.train.step import (  # noqa: E402
    accumulate_gradients,
    apply_gradients,
    init_train_state,
    jit_step,
    stack_micro_batches,
)
from shared.config import MeshConfig, OptimizerConfig  # noqa: E402

MESHES = {  # (data, fsdp, tensor)
    "data8": (8, 1, 1),
    "fsdp8": (1, 8, 1),
    "data4_tensor2": (4, 1, 2),
    "data2_fsdp2_tensor2": (2, 2, 2),
}
CFG = ModelConfig(
    family="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
    head_dim=8, intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False,
)
# eps 1e-3: Adam's first update is ~lr * sign(g) wherever |g| >> eps, which would turn the
# float-reduction noise of near-zero gradient entries (a different summation order per mesh)
# into lr-sized parameter differences; a larger eps keeps the update proportional to g.
OPTIM = OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, eps=1e-3,
                        lr_scheduler_type="constant", max_grad_norm=0.5)


def step_fn(mdef, opt):
    def step(state, batch):
        mask = batch["mask"][..., 1:].astype(np.float32)
        normalizer = shared.loss_normalizer(mask.reshape(-1, mask.shape[-1]), mode="token-mean")

        def loss_fn(params, mb):
            logits, _ = mdef.merge(params, state.frozen)(mb["ids"], mb["mask"])
            loss = shared.sft_loss(logits[:, :-1], mb["ids"][:, 1:], mb["mask"][:, 1:],
                                   normalizer=normalizer)
            return loss, {"loss": loss}

        grads, aux = accumulate_gradients(loss_fn, state.params, batch)
        state, grad_norm = apply_gradients(state, grads, opt.tx)
        return state, {**aux, "grad_norm": grad_norm}

    return step


def run(mesh_shape, devices):
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape), devices)
    mdef, params, frozen = ModelDef.split(CausalLM(CFG, rngs=nnx.Rngs(0)))
    opt = make_optimizer(OPTIM, params, total_steps=10)
    state = init_train_state(params, frozen, opt.tx, mesh)
    step = jit_step(step_fn(mdef, opt), mesh, sharding.tree_shardings(state))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 64, (16, 12)).astype(np.int32)
    mask = (np.arange(12)[None, :] < rng.integers(4, 13, (16, 1))).astype(np.int32)
    batch = sharding.shard_batch(stack_micro_batches({"ids": ids, "mask": mask}, 2), mesh, axis=1)
    state, metrics = step(state, batch)
    specs = {k: str(v.sharding.spec) for k, v in state.params.items()}
    params = {k: np.asarray(v) for k, v in state.params.items()}
    return float(metrics["loss"]), float(metrics["grad_norm"]), params, specs


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    ref_loss, ref_norm, ref_params, _ = run((1, 1, 1), devices[:1])
    out = {}
    for name, shape in MESHES.items():
        loss, norm, params, specs = run(shape, devices)
        param_diff = max(
            float(np.max(np.abs(params[k] - ref_params[k])) / (np.max(np.abs(ref_params[k]))))
            for k in ref_params
        )
        out[name] = {
            "loss_rel": abs(loss - ref_loss) / abs(ref_loss),
            "grad_norm_rel": abs(norm - ref_norm) / abs(ref_norm),
            "param_rel": param_diff,
            "q_proj_spec": specs["model.layers.0.attn.q_proj.kernel"],
            "embed_spec": specs["model.embed_tokens.embedding"],
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
