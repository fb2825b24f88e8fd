"""Shared blocks: positions, attention (GQA, masks), MoE routing, norms."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import zoo
from zoo.nn import attention, backend, linear, mlp, moe, norms, positions
from conftest import tiny


# --- positions --------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", [None, "linear", "llama3"])
def test_rope_scores_depend_only_on_relative_offset(scaling):
    extra = {} if scaling is None else dict(rope_scaling=scaling, rope_scaling_factor=4.0,
                                            rope_original_max_len=64)
    cfg = tiny("tiny-decoder", **extra)
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, 1, 1, cfg.head_size))
    k = jax.random.normal(kk, (1, 1, 1, cfg.head_size))

    def score(m, n):
        qm = positions.apply_rope(q, positions.rope_tables(cfg, "global", jnp.array([[m]])))
        kn = positions.apply_rope(k, positions.rope_tables(cfg, "global", jnp.array([[n]])))
        return float(jnp.sum(qm * kn))

    for offset in (0, 3, 17):
        ref = score(offset, 0)
        for base in (5, 40, 100):
            assert score(base + offset, base) == pytest.approx(ref, abs=1e-4)
    assert score(7, 0) != pytest.approx(score(3, 0), abs=1e-3)


def test_rope_scaling_changes_frequencies_as_specified():
    base = positions.rope_inv_freq(tiny("tiny-decoder"))
    linear = positions.rope_inv_freq(tiny("tiny-decoder", rope_scaling="linear", rope_scaling_factor=4.0))
    np.testing.assert_allclose(linear, base / 4.0, rtol=1e-6)
    cfg = tiny("tiny-decoder", rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=64,
               rope_theta=10000.0)
    scaled = positions.rope_inv_freq(cfg)
    wavelen = 2 * math.pi / base
    high = wavelen < 64 / cfg.rope_high_freq_factor
    low = wavelen > 64 / cfg.rope_low_freq_factor
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-6)
    mid = ~high & ~low
    assert np.all(scaled[mid] <= base[mid]) and np.all(scaled[mid] >= base[mid] / 8.0)


def test_partial_rope_leaves_the_rest_unrotated():
    cfg = tiny("tiny-decoder", rope_fraction=0.5)
    x = jax.random.normal(jax.random.key(1), (1, 3, 2, cfg.head_size))
    y = positions.apply_rope(x, positions.rope_tables(cfg, "global", jnp.array([[0, 4, 9]])))
    np.testing.assert_array_equal(y[..., cfg.head_size // 2:], x[..., cfg.head_size // 2:])
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # position 0 is the identity


def test_alibi_slopes():
    np.testing.assert_allclose(positions.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
    twelve = positions.alibi_slopes(12)
    np.testing.assert_allclose(twelve[:8], positions.alibi_slopes(8))
    np.testing.assert_allclose(twelve[8:], positions.alibi_slopes(16)[0::2][:4])
    bias = positions.alibi_bias(jnp.arange(4)[None], jnp.arange(4)[None], 8)
    assert bias.shape == (1, 8, 4, 4)
    np.testing.assert_allclose(bias[0, 0], -0.5 * np.abs(np.arange(4)[:, None] - np.arange(4)[None]))


def _bucket_reference(rel: int, bidirectional: bool, buckets: int, max_distance: int) -> int:
    out = 0
    if bidirectional:
        buckets //= 2
        out += buckets if rel > 0 else 0
        n = abs(rel)
    else:
        n = max(-rel, 0)
    exact = buckets // 2
    if n < exact:
        return out + n
    large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (buckets - exact))
    return out + min(large, buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_the_definition(bidirectional):
    rel = jnp.arange(-300, 301)
    got = positions.relative_bucket(rel, bidirectional, 32, 128)
    want = [_bucket_reference(int(r), bidirectional, 32, 128) for r in rel]
    np.testing.assert_array_equal(np.asarray(got), want)
    if bidirectional:
        assert int(positions.relative_bucket(jnp.array(1), True, 32, 128)) == 17
        assert int(got.max()) == 31 and int(got[0]) == 15
    else:
        assert set(np.asarray(got[300:]).tolist()) == {0}  # the future is one bucket


# --- attention --------------------------------------------------------------------------
def _reference_attention(q, k, v, mask, scale):
    """Plain multi-head attention with keys/values repeated to every query head."""
    groups = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    s = jnp.where(mask[:, None], s, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v)


def test_gqa_with_all_kv_heads_is_mha():
    mha = tiny("tiny-decoder", num_kv_heads=None)
    gqa = tiny("tiny-decoder", num_kv_heads=4)
    params = zoo.init(mha, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 9), 0, 128)
    np.testing.assert_array_equal(zoo.forward(params, mha, toks).logits,
                                  zoo.forward(params, gqa, toks).logits)


def test_masks():
    pos = jnp.arange(6)[None]
    causal = attention.attention_mask(pos, pos, causal=True)[0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((6, 6), bool)))
    window = attention.attention_mask(pos, pos, causal=True, window=2)[0]
    np.testing.assert_array_equal(window, np.tril(np.ones((6, 6), bool)) & ~np.tril(np.ones((6, 6), bool), -2))
    prefix = jnp.array([[True, True, True, False, False, False]])
    pm = attention.attention_mask(pos, pos, causal=True, prefix=prefix)[0]
    assert bool(pm[0, 2]) and not bool(pm[3, 4]) and bool(pm[4, 1])
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    sm = attention.attention_mask(pos, pos, causal=False, q_segments=seg, k_segments=seg)[0]
    assert not bool(sm[0, 2]) and bool(sm[2, 4]) and not bool(sm[5, 4])
    valid = jnp.array([[True] * 4 + [False] * 2])
    vm = attention.attention_mask(pos, pos, causal=False, k_valid=valid)[0]
    assert not bool(vm[:, 4:].any()) and bool(vm[:, :4].all())


# --- norms and MoE ----------------------------------------------------------------------
def test_moe_routes_each_token_to_k_experts():
    logits = jax.random.normal(jax.random.key(4), (3, 11, 8))
    r = moe.route(logits, tiny("tiny-moe", num_experts=8))
    assert r.chosen.shape == r.weights.shape == (3, 11, 2)
    assert bool(jnp.all(r.chosen[..., 0] != r.chosen[..., 1]))
    np.testing.assert_allclose(r.weights.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(r.chosen[..., 0], jnp.argmax(r.scores, -1))


def test_moe_balance_loss():
    uniform = jnp.full((4, 8, 4), 0.25)
    chosen = jnp.stack([jnp.arange(32).reshape(4, 8) % 4, (jnp.arange(32).reshape(4, 8) + 1) % 4], -1)
    assert float(moe.balance_loss(uniform, chosen, 4)) == pytest.approx(1.0)
    skewed = jnp.zeros((4, 8, 4)).at[..., 0].set(1.0)
    assert float(moe.balance_loss(skewed, jnp.zeros((4, 8, 2), jnp.int32), 4)) == pytest.approx(4.0)


class BlocksEagerAndJitted(chex.TestCase):
    """Each block against a reference, run eagerly and under jit (`chex.variants`): a block
    that only works traced, or only eagerly, fails one of the two."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 2, 4, 8)
    def test_grouped_attention_equals_repeated_keys(self, kv_heads):
        ks = jax.random.split(jax.random.key(2), 3)
        q = jax.random.normal(ks[0], (2, 5, 8, 16))
        k = jax.random.normal(ks[1], (2, 7, kv_heads, 16))
        v = jax.random.normal(ks[2], (2, 7, kv_heads, 16))
        mask = jax.random.bernoulli(ks[0], 0.7, (2, 5, 7)).at[..., 0].set(True)
        got = self.variant(attention.attend, static_argnums=5)(q, k, v, mask, None, 0.25)
        chex.assert_shape(got, q.shape)
        chex.assert_trees_all_close(got, _reference_attention(q, k, v, mask, 0.25), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_norms(self):
        norm = self.variant(norms.apply_norm, static_argnums=2)
        x = jax.random.normal(jax.random.key(3), (2, 3, 32)) * 5 + 2
        ln = norm({"scale": jnp.ones(32), "bias": jnp.zeros(32)}, x, tiny("tiny-encoder"))
        np.testing.assert_allclose(ln.mean(-1), 0, atol=1e-5)
        np.testing.assert_allclose(ln.std(-1), 1, atol=1e-3)
        rms = norm({"scale": jnp.ones(32)}, x, tiny("tiny-decoder"))
        np.testing.assert_allclose(jnp.sqrt(jnp.mean(rms ** 2, -1)), 1, atol=1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_moe_layer_matches_explicit_per_token_mixture(self):
        cfg = tiny("tiny-moe")
        p = jax.tree.map(lambda a: a[0], zoo.init(cfg, jax.random.key(5))["decoder"]["layers"]["moe"])
        x = jax.random.normal(jax.random.key(6), (2, 3, cfg.d_model))
        y, aux = self.variant(moe.apply_moe, static_argnums=2)(p, x, cfg.replace(moe_dispatch="dense"))
        chex.assert_shape(y, x.shape)
        probs = jax.nn.softmax(x @ p["router"], -1)
        for b in range(2):
            for t in range(3):
                top = np.argsort(-np.asarray(probs[b, t]))[:2]
                w = probs[b, t, top] / probs[b, t, top].sum()
                want = sum(w[i] * ((jax.nn.silu(x[b, t] @ p["wg"][e]) * (x[b, t] @ p["wi"][e])) @ p["wo"][e])
                           for i, e in enumerate(top))
                np.testing.assert_allclose(y[b, t], want, atol=1e-5)
        # Switch-style balance loss by hand: E * sum_e (share of the 2 * 6 routing slots that
        # went to e) * (mean router probability of e).
        top2 = np.argsort(-np.asarray(probs), axis=-1)[..., :2].reshape(-1)
        share = np.bincount(top2, minlength=cfg.num_experts) / top2.size
        mean_prob = np.asarray(probs).reshape(-1, cfg.num_experts).mean(0)
        assert float(aux) == pytest.approx(cfg.num_experts * float(np.sum(share * mean_prob)), rel=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(dict(), dict(positions="learned", attn_bias=True, num_kv_heads=1))
    def test_fused_qkv_attention_equals_separate_projections(self, **overrides):
        """The decoding layout's one [D, (N + 2K) * H] projection gives the same attention."""
        cfg = tiny("tiny-decoder", **overrides)
        params = zoo.init(cfg, jax.random.key(4))
        p = jax.tree.map(lambda a: a[0], params["decoder"]["layers"])["attn"]
        fused = attention.fuse_qkv(p)
        assert "qkv" in fused and "q" not in fused and ("qkv_bias" in fused) == cfg.attn_bias
        x = jax.random.normal(jax.random.key(5), (2, 6, cfg.d_model))
        pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
        rope = positions.rope_tables(cfg, "global", pos) if cfg.positions == "rope" else None
        ctx = attention.Context(attention.attention_mask(pos, pos, causal=True), None, rope)
        apply = self.variant(attention.apply_attention, static_argnums=3)
        chex.assert_trees_all_close(apply(fused, x, ctx, cfg.replace(layout="decoding")),
                                    apply(p, x, ctx, cfg), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(False, True)
    def test_fused_gate_mlp_equals_separate_matrices(self, mlp_bias):
        cfg = tiny("tiny-decoder", mlp_bias=mlp_bias)
        assert cfg.gated
        p = jax.tree.map(lambda a: a[0], zoo.init(cfg, jax.random.key(6))["decoder"]["layers"])["mlp"]
        if mlp_bias:  # non-zero biases, so their order in the fused vector matters
            p = {**p, "bg": p["bg"] + 0.3, "bi": p["bi"] - 0.2, "bo": p["bo"] + 0.1}
        fused = mlp.fuse_gate(p)
        assert "wgi" in fused and "wg" not in fused and "wi" not in fused
        x = jax.random.normal(jax.random.key(7), (2, 3, cfg.d_model))
        apply = self.variant(mlp.apply_mlp, static_argnums=2)
        chex.assert_trees_all_close(apply(fused, x, cfg.replace(layout="decoding")), apply(p, x, cfg),
                                    atol=1e-5)


@pytest.mark.parametrize("kv_heads,with_bias", [(4, False), (2, True), (1, False)])
@pytest.mark.parametrize("max_unrolled", [32, 1])
def test_row_by_row_attention_equals_the_batched_einsum(monkeypatch, kv_heads, with_bias, max_unrolled):
    """The CPU path (one batch row at a time, unrolled or under lax.map, with its own
    backward pass) computes the same attention and gradients (queries, keys, values, bias)
    as the autodiffed batched einsum used on accelerators and meshes."""
    b, t, s, n, h = 3, 5, 7, 4, 8
    keys = jax.random.split(jax.random.key(3), 5)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, s, kv_heads, h))
    v = jax.random.normal(keys[2], (b, s, kv_heads, h))
    # Every query sees key 0, except one padding query that sees nothing.
    mask = jax.random.bernoulli(keys[3], 0.7, (b, t, s)).at[:, :, 0].set(True).at[0, 1, :].set(False)
    args = (q, k, v) + ((jax.random.normal(keys[4], (1, n, t, s)),) if with_bias else ())

    def run(by_rows: bool):
        monkeypatch.setattr(attention, "_MAX_UNROLLED_ROWS", max_unrolled)
        how = "rows" if by_rows else "xla"
        f = lambda q, k, v, *bias: attention.attend(q, k, v, mask, bias[0] if bias else None, 0.3, how)
        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args))))(*args)
        return f(*args), grads

    (rows, rows_grad), (batched, batched_grad) = run(True), run(False)
    assert float(jnp.max(jnp.abs(rows - batched))) < 1e-5
    for a, c in zip(rows_grad, batched_grad):
        assert float(jnp.max(jnp.abs(a - c))) < 1e-5


def test_flattened_matmul_equals_the_einsum_with_gradients():
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (2, 5, 6))
    w = jax.random.normal(ks[1], (6, 3, 4)) * 0.3    # [D, N, H], as q/k/v
    wo = jax.random.normal(ks[2], (3, 4, 6)) * 0.3   # [N, H, D], as the output projection
    e = jax.random.normal(ks[3], (7, 6))             # [V, D], a tied embedding

    def ours(x, w, wo, e):
        h = linear.matmul(x, w)
        return linear.matmul_transposed(linear.matmul(h, wo, n_in=2), e)

    def ref(x, w, wo, e):
        h = jnp.einsum("btd,dnh->btnh", x, w)
        return jnp.einsum("btd,vd->btv", jnp.einsum("btnh,nhd->btd", h, wo), e)

    np.testing.assert_allclose(ours(x, w, wo, e), ref(x, w, wo, e), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    for g, r in zip(jax.grad(loss(ours), argnums=(0, 1, 2, 3))(x, w, wo, e),
                    jax.grad(loss(ref), argnums=(0, 1, 2, 3))(x, w, wo, e)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    assert linear.matmul(x.astype(jnp.bfloat16), w).dtype == jnp.bfloat16


def test_bf16_matmul_is_the_fp32_accumulated_product_rounded_with_bf16_gradients():
    ks = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(ks[0], (4, 8, 256)).astype(jnp.bfloat16)
    w = jax.random.normal(ks[1], (256, 96))   # fp32 master weights, cast inside
    e = jax.random.normal(ks[2], (50, 256))
    w16, e16 = w.astype(jnp.bfloat16), e.astype(jnp.bfloat16)
    matmul = jax.jit(functools.partial(linear.matmul, mode="f32_accumulate"))
    transposed = jax.jit(functools.partial(linear.matmul_transposed, mode="f32_accumulate"))
    # the form XLA:CPU gives to its bf16 matrix units
    assert "xbf16>) -> tensor<32x96xf32>" in matmul.lower(x, w).as_text()
    assert "xbf16>) -> tensor<32x96xf32>" not in jax.jit(linear.matmul).lower(x, w).as_text()
    exact = lambda a, b: (a.astype(jnp.float32) @ b.astype(jnp.float32)).astype(jnp.bfloat16)
    for got, want in ((matmul(x, w), exact(x, w16)), (transposed(x, e), exact(x, e16.T))):
        assert got.dtype == jnp.bfloat16
        # fp32 accumulation: at most one bf16 rounding step from the exact product
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                   rtol=2 ** -7, atol=1e-6)
    gx, gw = jax.grad(lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32) ** 2),
                      argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    y = exact(x, w16).astype(np.float32)
    np.testing.assert_allclose(gw, np.einsum("btd,btn->dn", x.astype(np.float32), 2 * y),
                               rtol=2e-2, atol=2e-2 * float(np.abs(gw).max()))


def test_auto_kernels_are_chosen_once_from_the_platform():
    """"auto" is resolved at the entry (zoo.nn.backend), from the platform and device count."""
    cfg, half = tiny("tiny-decoder"), tiny("tiny-decoder", dtype="bfloat16")
    assert backend.choose_attention(half, "cuda", 1) == "cudnn"
    assert backend.choose_attention(half.replace(dtype="float16"), "cuda", 8) == "cudnn"
    assert backend.choose_attention(cfg, "cuda", 1) == "xla"  # the kernel needs bf16/fp16
    assert backend.choose_attention(half, "cpu", 1) == "rows"
    assert backend.choose_attention(half, "cpu", 8) == "xla"  # SPMD should see one batched op
    assert backend.choose_attention(half, "tpu", 1) == "splash"  # Pallas, else blockwise (zoo.nn.splash)
    assert backend.choose_matmul("cpu") == "f32_accumulate" and backend.choose_matmul("tpu") == "xla"
    here = backend.resolve(cfg)
    assert (here.attention, here.matmul) == ("rows", "f32_accumulate")  # this CPU, no mesh
    assert backend.choose_grouped_matmul("cpu") == "tiles" and backend.choose_grouped_matmul("cuda") == "ragged"
    pinned = cfg.replace(attention="xla", matmul="xla", grouped_matmul="ragged")
    assert backend.resolve(pinned) is pinned
    # The cuDNN kernel takes only calls it can run: no bias, no cache layout, no soft-cap, no sinks.
    assert attention.cudnn_fits(jnp.bfloat16, has_bias=False, cache_layout=False)
    assert not attention.cudnn_fits(jnp.float32, has_bias=False, cache_layout=False)
    assert not attention.cudnn_fits(jnp.bfloat16, has_bias=True, cache_layout=False)
    assert not attention.cudnn_fits(jnp.bfloat16, has_bias=False, cache_layout=True)
    assert not attention.cudnn_fits(jnp.bfloat16, has_bias=False, cache_layout=False, softcap=50.0)
    assert not attention.cudnn_fits(jnp.bfloat16, has_bias=False, cache_layout=False, has_sinks=True)


def test_the_math_below_the_entry_never_looks_at_the_device(monkeypatch):
    """With attention and matmul pinned, a forward traces to the same program whatever the
    platform claims to be: only zoo.nn.backend.resolve reads it, and only for "auto"."""
    cfg = tiny("tiny-decoder", dtype="bfloat16", attention="rows", matmul="f32_accumulate")
    params = zoo.init(cfg, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 16), 3, cfg.vocab_size)
    lower = lambda: jax.jit(zoo.forward, static_argnums=1).lower(params, cfg, toks).as_text()
    here = lower()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(backend, "platform", lambda: "tpu")
    assert lower() == here
    auto = jax.jit(zoo.forward, static_argnums=1).lower(params, cfg.replace(attention="auto", matmul="auto"), toks)
    assert auto.as_text() != here  # "auto" on a "tpu": the batched einsums, plain matmuls


def test_cudnn_falls_back_to_xla_where_the_kernel_refuses_the_shapes(monkeypatch):
    # As on a CUDA device whose kernel rejects the call at trace time (head size, odd lengths).
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[0].shape)
        raise NotImplementedError("unsupported head dim")

    monkeypatch.setattr(attention, "_attend_cudnn", refuse)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 8, 4, 16), jnp.bfloat16) for i in range(3))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((8, 8), bool)), (2, 8, 8))
    cudnn = attention.attend(q, k, v, mask, None, 0.25, "cudnn", causal=True)
    xla = attention.attend(q, k, v, mask, None, 0.25, "xla", causal=True)
    assert calls == [(2, 8, 4, 16)]
    assert jnp.array_equal(cudnn, xla)


@pytest.mark.parametrize("name,scheme", [
    ("tiny-encoder", "learned"), ("tiny-encoder", "rope"), ("tiny-decoder", "sinusoidal"),
    ("tiny-decoder", "alibi"), ("tiny-encdec", "learned"), ("tiny-encdec", "relative")])
def test_max_len_bounds_position_tables_only(name, scheme):
    """learned/sinusoidal: no embedding past max_len, a longer input is a ValueError in every
    family; rope/alibi/relative compute positions: max_len is the trained length, longer runs."""
    cfg = tiny(name, positions=scheme, max_len=8, **({"position_offset": 0} if scheme != "learned" else {}))
    params = jax.eval_shape(lambda k: zoo.init(cfg, k), jax.random.key(0))  # traced, not run
    toks = jax.ShapeDtypeStruct((1, 12), jnp.int32)
    args = (toks, jax.ShapeDtypeStruct((1, 10), jnp.int32)) if cfg.family == "encdec" else (toks,)
    run = lambda: jax.eval_shape(lambda p, *a: zoo.forward(p, cfg, *a), params, *args)
    if scheme in ("learned", "sinusoidal"):
        with pytest.raises(ValueError, match="length 12 exceeds the model's max_len 8"):
            run()
    else:
        assert run().logits.shape == (1, args[-1].shape[1], cfg.vocab_size)


def test_positions_past_a_table_are_a_value_error():
    """Given positions, or a cache continued past max_len, are checked when concrete."""
    cfg = tiny("tiny-decoder", positions="learned", max_len=8)
    params = zoo.init(cfg, jax.random.key(0))
    toks = jnp.full((1, 4), 5, jnp.int32)
    with pytest.raises(ValueError, match="positions: position 9 is beyond the model's max_len 8"):
        zoo.forward(params, cfg, toks, positions=jnp.arange(6, 10)[None])
    cache = zoo.init_cache(cfg, 1, 12).replace(lengths=jnp.array([8], jnp.int32))  # 8 seen
    with pytest.raises(ValueError, match="positions: position 8 is beyond"):
        zoo.forward(params, cfg, toks[:, :1], cache=cache)
