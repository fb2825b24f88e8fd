"""zoo.quantize: int8 / int4 weights that every family's forward, generate and encode take."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run, tiny, tokens

import zoo
from zoo import sharding
from zoo.nn.linear import matmul, matmul_transposed
from zoo.nn.quant import QuantizedWeight, dequantize, quantize_weight, take_rows


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)])
def test_dequantize_error_is_half_a_step(bits, group):
    """Each weight comes back within half a quantization step of its group's scale, in
    its shape and dtype, for an [in, out] projection, a two-dim input (attention o) and an
    [out, in] embedding table; both matmul paths (one row, several) equal x @ dequantized."""
    key = jax.random.key(0)
    for shape, n_in, out_first in [((32, 4, 8), 1, False), ((4, 8, 32), 2, False), ((64, 32), 1, True)]:
        w = jax.random.normal(key, shape, jnp.float32)
        qw = quantize_weight(w, bits, group, n_in, out_first)
        back = dequantize(qw)
        assert back.shape == w.shape and back.dtype == w.dtype and qw.q.dtype == jnp.int8
        step = jnp.max(jnp.abs(w)) / (127 if bits == 8 else 7)  # the largest group's step
        assert float(jnp.max(jnp.abs(back - w))) <= float(step) / 2 + 1e-6
        if out_first:
            ids = jnp.array([[0, 5, 63]])
            np.testing.assert_allclose(take_rows(qw, ids), back[ids], rtol=1e-6, atol=1e-6)
            x = jax.random.normal(key, (3, 1, 32))
            np.testing.assert_allclose(matmul_transposed(x, qw), x @ back.T, rtol=1e-4, atol=1e-4)
            continue
        k = int(np.prod(shape[:n_in]))
        for rows in (1, 3):
            x = jax.random.normal(key, (rows, 1, *shape[:n_in]))
            want = (x.reshape(rows, k) @ back.reshape(k, -1)).reshape(rows, 1, *shape[n_in:])
            np.testing.assert_allclose(matmul(x, qw, n_in), want, rtol=1e-4, atol=1e-4)


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_quantized_params_run_every_family(tiny_name):
    """forward, generate (decoder, encdec) and encode (encoder) take the quantized tree: int4
    logits within 25 % of fp32 (random weights), int8 sentence embeddings within 2 %."""
    cfg = tiny(tiny_name)
    params = zoo.init(cfg, jax.random.key(0))
    toks = tokens(jax.random.key(1), 2, 8)
    ref = run(params, cfg, toks).logits
    q4 = zoo.quantize(params, cfg, bits=4, group_size=16)
    assert isinstance(q4["embed"]["tokens"], QuantizedWeight)
    assert _rel(run(q4, cfg, toks).logits, ref) < 0.25
    qp = zoo.quantize(params, cfg, bits=8)
    if cfg.family == "encoder":
        encode = jax.jit(zoo.encode, static_argnums=1)
        got, want = encode(qp, cfg, toks), encode(params, cfg, toks)
        assert got.shape == want.shape and _rel(got, want) < 0.02
    else:  # batch-1 steps take the matrix-vector path, the prompt the dequantized one
        out = zoo.generate(qp, cfg, toks[:1], max_new_tokens=4, stop_tokens=())
        assert out.shape == (1, 4)


def test_quantize_rejects_bad_bits_and_group_size():
    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        zoo.quantize(params, cfg, bits=3)
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dim 32 of decoder.layers.attn.k"):
        zoo.quantize(params, cfg, bits=4, group_size=48)


def test_quantized_params_keep_their_logical_axes():
    """On an 8-device mesh q is placed by the weight's own logical axes (in q's order) and the
    sharded forward equals the one-device one."""
    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, jax.random.key(0))
    qp = zoo.quantize(params, cfg, bits=8)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    plain = sharding.tree_shardings(zoo.axes(cfg), mesh, params)
    quant = sharding.tree_shardings(zoo.axes(cfg), mesh, qp)
    attn_q, plain_q = quant["decoder"]["layers"]["attn"]["q"], plain["decoder"]["layers"]["attn"]["q"]
    # [layers, embed, heads, head_dim] is held as [layers, heads, head_dim, embed]
    assert plain_q.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert attn_q.q.spec == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")
    assert attn_q.scale.spec == jax.sharding.PartitionSpec(None, "tensor", None, None)
    assert quant["embed"]["tokens"].q.spec == plain["embed"]["tokens"].spec
    placed = jax.device_put(qp, quant)
    toks = tokens(jax.random.key(1), 8, 8)
    with sharding.use(mesh):
        got = run(placed, cfg, toks).logits
    np.testing.assert_allclose(got, run(qp, cfg, toks).logits, rtol=1e-4, atol=1e-5)
