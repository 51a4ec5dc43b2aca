"""The mesh and the parameter/batch layout; a sharded step equals the single-device step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jax_rlhf import sharding
from shared.config import MeshConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "sizes, devices, expected",
    [
        ({"data": -1, "fsdp": 1, "tensor": 1}, 8, (8, 1, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
        ({"data": 1, "fsdp": 1, "tensor": -1}, 4, (1, 1, 4)),
    ],
    ids=["data_rest", "fsdp_rest", "tensor_rest"],
)
def test_mesh_shape_resolves_the_rest(sizes, devices, expected):
    assert sharding.mesh_shape(sizes, devices) == expected


def test_mesh_shape_rejects_impossible_meshes():
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)


def test_make_mesh_on_the_default_device():
    mesh = sharding.make_mesh(MeshConfig())
    assert mesh.axis_names == sharding.AXES and mesh.devices.shape == (1, 1, 1)
    assert sharding.data_parallel_size(mesh) == 1


def test_param_rules_shard_embeddings_and_linears_over_fsdp_and_tensor():
    mesh = AbstractMesh((2, 2, 2), sharding.AXES)
    spec = lambda name, shape: sharding.param_spec(name, shape, mesh)  # noqa: E731
    assert spec("model.embed_tokens.embedding", (64, 32)) == P("tensor", "fsdp")
    assert spec("model.layers.0.attn.q_proj.kernel", (32, 32)) == P("fsdp", "tensor")
    assert spec("model.layers.3.mlp.down_proj.kernel", (64, 32)) == P("tensor", "fsdp")
    assert spec("model.layers.0.attn.q_proj.bias", (32,)) == P("tensor")
    assert spec("model.layers.0.attn_norm.scale", (32,)) == P()
    assert spec("v_head.kernel", (32, 1)) == P("fsdp", None)
    # a dimension the axis does not divide stays replicated
    assert spec("model.embed_tokens.embedding", (33, 32)) == P(None, "fsdp")


def test_shard_batch_checks_divisibility():
    mesh = sharding.make_mesh(MeshConfig())
    out = sharding.shard_batch({"ids": np.zeros((3, 4), np.int32)}, mesh)
    assert out["ids"].shape == (3, 4)


def test_sharded_step_equals_single_device_step():
    """One AdamW step (2 accumulated micro-batches, clipping, weight decay) on 1 device and on
    8 forced host devices as data=8, fsdp=8, data=4 x tensor=2 and 2 x 2 x 2 (subprocess)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sharded_step.py"))],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert set(results) == {"data8", "fsdp8", "data4_tensor2", "data2_fsdp2_tensor2"}
    for name, r in results.items():
        assert r["loss_rel"] < 1e-5, (name, r)
        assert r["grad_norm_rel"] < 1e-5, (name, r)
        assert r["param_rel"] < 1e-5, (name, r)
    assert results["data2_fsdp2_tensor2"]["q_proj_spec"] == "P('fsdp', 'tensor')"
    assert results["fsdp8"]["embed_spec"] == "P(None, 'fsdp')"
    assert results["data8"]["q_proj_spec"] == "P(None, None)"
