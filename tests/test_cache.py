"""KV caches: decoding chunk by chunk over a cache gives the full forward's logits at every
step (plain, GQA, learned positions, ALiBi, MoE, sliding-window ring buffers, encdec with cached
cross-attention, int8), and the cache is a plain pytree of the documented shapes."""

import jax
import jax.numpy as jnp
import pytest

import zoo
from zoo.nn import cache as kv_cache
from conftest import tiny, tokens

KEY = jax.random.key(0)
TOL = 1e-5
FWD = jax.jit(zoo.decoder.forward, static_argnums=1)  # one program per shape, not per op


def _chunked_logits(params, cfg, toks, cache, chunks):
    """Feeds toks [B, T] in chunks of the given sizes; returns logits [B, T, V] and the cache."""
    out, start = [], 0
    for size in chunks:
        o = FWD(params, cfg, toks[:, start:start + size], cache=cache)
        out.append(o.logits)
        cache, start = o.cache, start + size
    assert start == toks.shape[1]
    return jnp.concatenate(out, axis=1), cache


def _full(params, cfg, toks):
    return FWD(params, cfg, toks).logits


def _max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("name,overrides", [
    ("tiny-decoder", {}),                                   # rope, GQA 4:2
    ("tiny-decoder", dict(positions="learned", num_kv_heads=1)),  # absolute positions, MQA
    ("tiny-decoder", dict(positions="alibi")),
    ("tiny-moe", {}),                                       # Mixtral-style experts
    ("tiny-moe", dict(num_layers=3, dense_layers=(1,), shared_experts=1, moe_d_ff=16)),  # segments
])
def test_cached_decoding_equals_full_forward(name, overrides):
    cfg = tiny(name, **overrides)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(1), 2, 14)
    full = _full(params, cfg, toks)
    got, cache = _chunked_logits(params, cfg, toks, zoo.init_cache(cfg, 2, 14), [5] + [1] * 9)
    assert _max_diff(got, full) <= TOL
    assert int(cache.index) == 14 and cache.lengths.tolist() == [14, 14]


@pytest.mark.parametrize("prefill,chunk", [(11, 1), (11, 3), (2, 1)])  # (2, 1): a prompt shorter than the window
def test_sliding_window_ring_buffer(prefill, chunk):
    """Window 4 < 20 tokens: the cache is a ring of window + chunk - 1 slots; a prompt longer
    than the ring and chunks that wrap around still give the full forward's logits."""
    cfg = tiny("tiny-decoder", sliding_window=4)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(2), 2, 20)
    full = _full(params, cfg, toks)
    cache = zoo.init_cache(cfg, 2, 20, chunk=chunk)
    assert cache.ring and cache.size == 4 + chunk - 1
    rest = 20 - prefill
    chunks = [prefill] + [chunk] * (rest // chunk) + ([rest % chunk] if rest % chunk else [])
    got, _ = _chunked_logits(params, cfg, toks, cache, chunks)
    assert _max_diff(got, full) <= TOL


def test_window_longer_than_the_cache_is_a_plain_cache():
    cfg = tiny("tiny-decoder", sliding_window=64)
    cache = zoo.init_cache(cfg, 1, 20)
    assert not cache.ring and cache.size == 20


def test_left_padded_prefill_matches_unpadded_rows():
    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(3), 2, 9)
    mask = jnp.array([[True] * 9, [False] * 4 + [True] * 5])
    cache = zoo.init_cache(cfg, 2, 12)
    out = FWD(params, cfg, toks, mask=mask, cache=cache)
    nxt = tokens(jax.random.key(4), 2, 1)
    out2 = FWD(params, cfg, nxt, cache=out.cache)
    assert out2.cache.lengths.tolist() == [10, 6]
    alone = FWD(params, cfg, jnp.concatenate([toks[1:, 4:], nxt[1:]], axis=1)).logits
    assert _max_diff(out.logits[1, 4:], alone[0, :5]) <= TOL
    assert _max_diff(out2.logits[1, 0], alone[0, 5]) <= TOL


@pytest.mark.parametrize("overrides", [{}, pytest.param(dict(positions="learned", position_offset=2,
                                                              norm_position="post", embed_norm=True),
                                                         marks=pytest.mark.slow)])
def test_encdec_cached_decoding_equals_full_forward(overrides):
    """T5 (relative bias) and a BART-like layout; the encoder runs once and its
    cross-attention keys/values stay in the cache."""
    cfg = tiny("tiny-encdec", **overrides)
    params = zoo.init(cfg, KEY)
    src = tokens(jax.random.key(5), 2, 9)
    src_mask = jnp.arange(9)[None, :] < jnp.array([[9], [6]])
    tgt = tokens(jax.random.key(6), 2, 10)
    run = jax.jit(zoo.encdec.forward, static_argnums=1)
    full = run(params, cfg, src, tgt, src_mask=src_mask).logits
    out = run(params, cfg, src, tgt[:, :3], src_mask=src_mask, cache=zoo.init_cache(cfg, 2, 10))
    assert out.encoder_hidden.shape == (2, 9, cfg.d_model)
    cache, got = out.cache, [out.logits]
    assert cache.cross.k.shape == (cfg.decoder_layers, 2 * cfg.kv_heads, 9, cfg.head_size)
    assert cache.cross.v.shape == (cfg.decoder_layers, 2 * cfg.kv_heads, cfg.head_size, 9)
    for i in range(3, 10):
        o = run(params, cfg, None, tgt[:, i:i + 1], cache=cache)
        cache = o.cache
        got.append(o.logits)
    assert _max_diff(jnp.concatenate(got, axis=1), full) <= TOL


def test_int8_cache_halves_memory_and_drifts_little():
    cfg = tiny("tiny-decoder", dtype="bfloat16")
    plain, int8 = zoo.init_cache(cfg, 2, 64), zoo.init_cache(cfg, 2, 64, quantize=True)
    # int8 plus one fp32 scale per token and head, against bf16: (H + 4) / (2 H).
    h = cfg.head_size
    assert kv_cache.nbytes(int8) / kv_cache.nbytes(plain) == pytest.approx((h + 4) / (2 * h))
    assert int8.kv.k.dtype == jnp.int8 and int8.kv.k_scale.shape == int8.kv.k.shape[:-1]

    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, KEY)
    params["head"]["kernel"] = params["head"]["kernel"] * 50  # logits of a trained model's size
    toks = tokens(jax.random.key(7), 2, 16)
    full = _full(params, cfg, toks)
    got, _ = _chunked_logits(params, cfg, toks, zoo.init_cache(cfg, 2, 16, quantize=True), [4] + [1] * 12)
    drift = _max_diff(got, full) / float(jnp.std(full))
    assert drift < 0.02, drift


def test_quantize_round_trip():
    x = jax.random.normal(KEY, (2, 5, 3, 16)) * 3
    q, scale = kv_cache.quantize(x)
    assert q.dtype == jnp.int8 and scale.shape == (2, 5, 3)
    err = jnp.abs(kv_cache.dequantize(q, scale, jnp.float32) - x)
    assert bool(jnp.all(err <= scale[..., None] / 2 + 1e-6))
    zq, zs = kv_cache.quantize(jnp.zeros((1, 4)))
    assert not bool(jnp.any(jnp.isnan(kv_cache.dequantize(zq, zs, jnp.float32))))


def test_cache_is_a_pytree_with_kv_heads_only():
    cfg = tiny("tiny-decoder")  # 4 query heads, 2 kv heads
    cache = zoo.init_cache(cfg, 3, 10)
    assert cache.kv.k.shape == (cfg.num_layers, 3 * 2, 10, cfg.head_size)
    assert cache.kv.v.shape == (cfg.num_layers, 3 * 2, cfg.head_size, 10)
    assert cache.main.positions.shape == (3, 10) and bool(jnp.all(cache.main.positions == -1))
    leaves, treedef = jax.tree.flatten(cache)
    assert jax.tree.unflatten(treedef, leaves).ring == cache.ring
    moved = jax.jit(lambda c: c)(cache)
    assert moved.kv.k.shape == cache.kv.k.shape


def test_rewind_then_rewrite_equals_never_written():
    """Speculative decoding writes draft tokens, then rewinds past the rejected ones."""
    cfg = tiny("tiny-decoder", sliding_window=4)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(8), 1, 12)
    wrong = tokens(jax.random.key(9), 1, 3)
    full = _full(params, cfg, toks)
    cache = zoo.init_cache(cfg, 1, 15, chunk=4)
    out = FWD(params, cfg, toks[:, :8], cache=cache)
    out = FWD(params, cfg, jnp.concatenate([toks[:, 8:9], wrong], axis=1), cache=out.cache)
    cache = kv_cache.rewind(out.cache, 3)
    got = FWD(params, cfg, toks[:, 9:], cache=cache).logits
    assert _max_diff(got, full[:, 9:]) <= TOL


def test_beam_helpers_repeat_and_take_rows():
    cfg = tiny("tiny-encdec")
    cache = zoo.init_cache(cfg, 2, 5)
    # [L, B*K, S, H] with K = 3 heads per row; row b holds the value b.
    rows = jnp.repeat(jnp.arange(2.0), 3)[None, :, None, None] * jnp.ones((2, 6, 4, 8))
    cache = kv_cache.with_cross(cache, kv_cache.LayerKV(rows, jnp.zeros((2, 6, 8, 4))), None)
    rep = kv_cache.repeat_rows(cache, 3)
    assert rep.cross.k.shape[1] == 18 and rep.main.positions.shape[0] == 6
    assert rep.cross.k[0, :, 0, 0].tolist() == [0] * 9 + [1] * 9
    picked = kv_cache.take_rows(rep, jnp.array([5, 0]))
    assert picked.cross.k[0, :, 0, 0].tolist() == [1] * 3 + [0] * 3


def test_cache_errors():
    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, KEY)
    toks = tokens(KEY, 2, 4)
    cache = zoo.init_cache(cfg, 2, 8)
    with pytest.raises(ValueError, match="segment_ids"):
        zoo.decoder.forward(params, cfg, toks, segment_ids=jnp.zeros_like(toks), cache=cache)
    with pytest.raises(ValueError, match="batch 3"):
        zoo.decoder.forward(params, cfg, tokens(KEY, 3, 4), cache=cache)
    with pytest.raises(ValueError, match="length"):
        zoo.init_cache(cfg, 2, 0)
    ecfg = tiny("tiny-encdec")
    eparams = zoo.init(ecfg, KEY)
    with pytest.raises(ValueError, match="prime_cache"):
        zoo.encdec.decode(eparams, ecfg, None, toks, cache=zoo.init_cache(ecfg, 2, 8))
    with pytest.raises(ValueError, match="src is needed"):
        zoo.encdec.forward(eparams, ecfg, None, toks, cache=zoo.init_cache(ecfg, 2, 8))


@pytest.mark.parametrize("name,overrides", [
    ("tiny-decoder", {}),
    ("tiny-decoder", dict(sliding_window=4)),
    ("tiny-decoder", dict(dtype="bfloat16")),
])
def test_unstacked_layers_with_a_per_layer_cache_equal_the_stack(name, overrides):
    """The decoding layout (layers unstacked, run unrolled over a tuple of per-layer caches,
    updated in place) gives the scanned stack's logits, chunk after chunk, int8 included."""
    cfg = tiny(name, **overrides)
    params = zoo.init(cfg, KEY)
    flat = zoo.decoding.unstacked(params)
    assert isinstance(flat["decoder"]["layers"], tuple) and len(flat["decoder"]["layers"]) == cfg.num_layers
    toks = tokens(jax.random.key(9), 2, 12)
    for quantize in (False, True):
        stacked, _ = _chunked_logits(params, cfg, toks, zoo.init_cache(cfg, 2, 12, quantize=quantize),
                                     [5] + [1] * 7)
        per_layer = zoo.init_cache(cfg, 2, 12, quantize=quantize, per_layer=True)
        assert isinstance(per_layer.kv, tuple) and len(per_layer.kv) == cfg.num_layers
        got, cache = _chunked_logits(flat, zoo.decoding.layout(cfg), toks, per_layer, [5] + [1] * 7)
        assert isinstance(cache.kv, tuple)
        assert _max_diff(got, stacked) <= (2e-2 if cfg.dtype == "bfloat16" else TOL)


def test_unstacked_encdec_cache_equals_the_stack():
    cfg = tiny("tiny-encdec")
    params = zoo.init(cfg, KEY)
    flat = zoo.decoding.unstacked(params)
    src, tgt = tokens(jax.random.key(10), 2, 7), tokens(jax.random.key(11), 2, 6)
    run = jax.jit(zoo.encdec.forward, static_argnums=1)
    want = run(params, cfg, src, tgt, cache=zoo.init_cache(cfg, 2, 6)).logits
    out = run(flat, zoo.decoding.layout(cfg), src, tgt, cache=zoo.init_cache(cfg, 2, 6, per_layer=True))
    assert isinstance(out.cache.cross, tuple)
    assert _max_diff(out.logits, want) <= TOL
