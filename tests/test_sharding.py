"""Logical-axis rules -> shardings; every family gives the same numbers on any mesh."""

import warnings

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import zoo
from zoo import sharding
from conftest import run, tiny, tokens

MESHES = [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8}, {"tensor": 4, "data": 2}]


def test_make_mesh_shapes():
    mesh = sharding.make_mesh({"data": 2, "tensor": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}
    assert dict(sharding.make_mesh().shape)["data"] == 8
    one = sharding.make_mesh(devices=jax.devices()[:1])
    assert one.size == 1
    with pytest.raises(ValueError, match="unknown axis"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="multiply to 6"):
        sharding.make_mesh({"data": 3, "tensor": 2})
    with pytest.raises(ValueError, match="only one axis may be -1"):
        sharding.make_mesh({"data": -1, "tensor": -1})


def test_rules_map_logical_names():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = sharding.spec_for(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), mesh)
    assert spec == P(None, "fsdp", "tensor", None)
    assert sharding.spec_for(("batch", "length"), (8, 16), mesh) == P(("data", "fsdp"), None)


def test_indivisible_dims_fall_back_to_replication_with_a_warning():
    mesh = sharding.make_mesh({"tensor": 8})
    with pytest.warns(UserWarning, match="does not divide"):
        spec = sharding.spec_for(("embed", "heads"), (32, 4), mesh)
    assert spec == P(None, None)


def test_custom_rules():
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    rules = (("embed", "tensor"), ("heads", None))
    assert sharding.spec_for(("embed", "heads"), (32, 4), mesh, rules) == P("tensor", None)


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder", "tiny-encdec", "tiny-moe"])
def test_forward_on_meshes_equals_one_device(name):
    cfg = tiny(name)
    params = zoo.init(cfg, jax.random.key(0))
    toks = tokens(jax.random.key(1), 8, 16)
    want = run(params, cfg, toks).logits
    for shape in MESHES + ([{"expert": 4, "data": 2}] if cfg.moe else []):
        mesh = sharding.make_mesh(shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shards = sharding.tree_shardings(zoo.axes(cfg), mesh, params)
        sharded = jax.device_put(params, shards)
        batch = jax.device_put(toks, NamedSharding(mesh, sharding.spec_for(("batch", "length"), toks.shape, mesh)))
        with sharding.use(mesh):
            got = jax.jit(lambda p, t: run(p, cfg, t).logits)(sharded, batch)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=str(shape))


def test_fsdp_shards_parameter_bytes():
    cfg = tiny("tiny-decoder", d_model=64, d_ff=128)
    mesh = sharding.make_mesh({"fsdp": 8})
    shapes = jax.eval_shape(lambda: zoo.init(cfg, jax.random.key(0)))
    shards = sharding.tree_shardings(zoo.axes(cfg), mesh, shapes)
    params = jax.jit(lambda k: zoo.init(cfg, k), out_shardings=shards)(jax.random.key(0))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    # Norm scales are replicated; everything with an `embed` axis is split eight ways.
    assert max(per_device.values()) < total / 8 * 1.1
