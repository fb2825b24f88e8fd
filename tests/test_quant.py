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
    [out, in] embedding table; both matmul paths (one row, several) equal x @ dequantized
    (to 2e-4 of the largest output: the CPU kernel rounds x to 16 bits, zoo.kernels.cpu)."""
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
            want = x @ back.T
            np.testing.assert_allclose(matmul_transposed(x, qw), want, rtol=1e-4, atol=_tol(want))
            continue
        k = int(np.prod(shape[:n_in]))
        for rows in (1, 3):
            x = jax.random.normal(key, (rows, 1, *shape[:n_in]))
            want = (x.reshape(rows, k) @ back.reshape(k, -1)).reshape(rows, 1, *shape[n_in:])
            np.testing.assert_allclose(matmul(x, qw, n_in), want, rtol=1e-4, atol=_tol(want))


def _tol(want: jax.Array) -> float:
    return 2e-4 * float(jnp.max(jnp.abs(want)))


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


# --- MoE experts and MLA's kv_b -----------------------------------------------------------
# Mixtral-style experts through ragged_dot (dequantized, then multiplied); DeepSeek-style
# (MLA with a query bottleneck, sigmoid group-limited routing, a shared expert) through the
# CPU tile scan (each tile's expert dequantized in the scan).
MOE = {"mixtral": dict(grouped_matmul="ragged"),
       "deepseek": dict(kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                        v_head_dim=8, head_dim=12, num_experts=8, experts_per_token=3, router="sigmoid",
                        router_score_bias=True, router_groups=4, router_topk_groups=2,
                        routed_scaling=2.5, shared_experts=1, moe_d_ff=16, grouped_matmul="tiles")}


@pytest.fixture(scope="module")
def deepseek():
    """cfg, fp32 params (the head scaled for sharp next-token choices), int8, int4 (groups of 8)."""
    cfg = tiny("tiny-moe", **MOE["deepseek"])
    params = zoo.init(cfg, jax.random.key(0))
    params = {**params, "head": {"kernel": params["head"]["kernel"] * 20}}
    return cfg, params, zoo.quantize(params, cfg, bits=8), zoo.quantize(params, cfg, bits=4, group_size=8)


@pytest.mark.parametrize("name", sorted(MOE))
def test_quantized_experts_and_kv_b_stay_close_to_float(name, request):
    """Every routed expert matrix (and MLA's kv_b) is a QuantizedWeight with the layers and
    experts axes leading; logits of random tiny models stay within 2 % of fp32 for int8
    (per channel: 0.7-0.8 % seen) and 25 % for int4 in groups of 8 (11-13 % seen: 15 levels
    per group on random weights)."""
    if name == "deepseek":
        cfg, params, q8, q4 = request.getfixturevalue("deepseek")
    else:
        cfg = tiny("tiny-moe", **MOE[name])
        params = zoo.init(cfg, jax.random.key(0))
        q8, q4 = zoo.quantize(params, cfg, bits=8), zoo.quantize(params, cfg, bits=4, group_size=8)
    toks = tokens(jax.random.key(1), 2, 8)
    ref = run(params, cfg, toks).logits
    for qp in (q8, q4):
        moe, attn = qp["decoder"]["layers"]["moe"], qp["decoder"]["layers"]["attn"]
        for w in ("wi", "wg", "wo"):
            assert isinstance(moe[w], QuantizedWeight) and moe[w].lead == (cfg.num_layers, cfg.num_experts)
            assert moe[w].shape == params["decoder"]["layers"]["moe"][w].shape
        if cfg.kv_lora_rank:
            assert isinstance(attn["kv_b"], QuantizedWeight)
    assert _rel(run(q8, cfg, toks).logits, ref) < 0.02
    assert _rel(run(q4, cfg, toks).logits, ref) < 0.25
    if name == "mixtral":  # the dense dispatch reads the same dequantized experts
        dense = cfg.replace(moe_dispatch="dense")
        np.testing.assert_allclose(run(q8, dense, toks).logits, run(q8, cfg, toks).logits,
                                   rtol=1e-4, atol=1e-5)


def test_generate_through_the_latent_cache_with_quantized_kv_b(deepseek):
    """Decoding over the MLA latent cache reads the quantized kv_b in the absorbed form: a
    sequence run through an empty cache gives the quantized model's full (expanded) forward
    logits, and int8 greedy generation (batch-1 steps over the cache) agrees with the fp32
    model's at most positions (all of them seen; a near-tie could flip one)."""
    from zoo.nn import cache as kv_cache

    cfg, params, q8, _ = deepseek
    seq = tokens(jax.random.key(1), 2, 8)
    cached = run(q8, cfg, seq, cache=kv_cache.init(cfg, 2, 12)).logits
    full = run(q8, cfg, seq).logits  # the two forms round different activations to 16 bits
    np.testing.assert_allclose(cached, full, atol=_tol(full), rtol=1e-4)
    prompt = seq[:, :4]
    got = zoo.generate(q8, cfg, prompt, max_new_tokens=8, stop_tokens=())
    want = zoo.generate(params, cfg, prompt, max_new_tokens=8, stop_tokens=())
    assert got.shape == want.shape == (2, 8)
    assert float(jnp.mean(got == want)) >= 0.75


def test_quantized_experts_keep_the_experts_axis_on_a_mesh(deepseek):
    """q and scale of an expert tensor are split on `expert` like the float tensor; the
    all_to_all dispatch (shard_map over each device's experts, with the experts' width split
    over `tensor`) gives the one-device logits; a mesh that would cut scale groups is refused."""
    cfg, params, _, qp = deepseek
    mesh = sharding.make_mesh({"expert": 4, "tensor": 2})
    plain = sharding.tree_shardings(zoo.axes(cfg), mesh, params)["decoder"]["layers"]["moe"]
    quant = sharding.tree_shardings(zoo.axes(cfg), mesh, qp)["decoder"]["layers"]["moe"]
    assert plain["wi"].spec == jax.sharding.PartitionSpec(None, "expert", None, "tensor")
    # [layers, experts, embed, mlp] is held as [layers, experts, mlp, embed]
    assert quant["wi"].q.spec == jax.sharding.PartitionSpec(None, "expert", "tensor", None)
    assert quant["wo"].scale.spec == jax.sharding.PartitionSpec(None, "expert", None, "tensor")
    placed = jax.device_put(qp, sharding.tree_shardings(zoo.axes(cfg), mesh, qp))
    toks = tokens(jax.random.key(1), 8, 8)
    with sharding.use(mesh):
        got = run(placed, cfg, toks).logits
    # The experts' width split over `tensor` splits wo's contraction: each device's kernel
    # rounds its own slice of x to 16 bits, so the two sides round differently (each within
    # the kernel's 1e-4 of the largest output).
    want = run(qp, cfg, toks).logits
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=_tol(want))
    # wo's 2 scale groups per row cannot follow its 16 inputs split 4 ways
    with sharding.use(sharding.make_mesh({"expert": 2, "tensor": 4})), \
            pytest.raises(ValueError, match="wo's 2 scale groups do not split over the mesh axes tensor"):
        jax.eval_shape(lambda p, t: zoo.forward(p, cfg, t).logits, qp, toks)  # traced afresh
