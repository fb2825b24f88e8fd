"""The layer mechanisms of Qwen2/Qwen3, Gemma 2/3 and Phi-3, each against a reference
formula written here in plain numpy (float64), never through zoo code: QK-norm, attention-
and final-logit soft-capping, query_pre_attn_scalar, sandwich norms, the (1 + w) RMSNorm,
the sqrt(d_model) embedding scale, q/k/v biases without an output bias, per-layer
local/global patterns with their own RoPE base, the mixed local/global cache, and gpt-oss's
attention sinks (also through the cache)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import zoo
from conftest import forward, tiny, tokens
from zoo.nn.attention import attend, attention_spec, apply_attention
from zoo.nn.embeddings import embed_tokens, vocab_logits
from zoo.nn.norms import apply_norm, norm_spec
from zoo.nn.param import materialize
from zoo.nn.transformer import apply_layer, layer_kinds, layer_spec, self_context

B, T = 2, 9
ATOL = 2e-5  # fp32 against float64; activations are O(1)
# A Gemma-shaped tiny decoder: every mechanism of this file switched on at once.
GEMMA = dict(activation="geglu_tanh", norm_eps=1e-6, norm_position="sandwich", norm_offset=1.0,
             num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=3,
             layer_pattern=("local", "local", "global"), local_rope_theta=100.0, qk_norm=True,
             attn_softcap=2.0, final_softcap=3.0, embed_scale=32 ** 0.5, attn_scale=24 ** -0.5,
             tie_embeddings=True)
# A gpt-oss-shaped attention: sinks, q/k/v/o biases, sliding and full layers alternating.
GPT_OSS = dict(num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=3, layer_pattern=("local", "global"),
               attn_sinks=True, attn_bias=True)


# --- the reference, in numpy ------------------------------------------------------------
def ref_norm(x, w, eps, offset):
    """RMSNorm over the last axis, scaled by offset + w (Gemma stores w = scale - 1)."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + np.asarray(w, np.float64))


def ref_rope(x, pos, theta, factor=1.0):
    """x [B, T, N, H] rotated in halves (rotate_half) at pos [B, T]; linear scaling by factor."""
    h = x.shape[-1]
    inv = theta ** (-np.arange(0, h, 2) / h) / factor
    ang = np.asarray(pos, np.float64)[:, :, None, None] * inv
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def ref_mask(pos, window=None):
    """[B, T, T] causal; a window hides keys with q - k >= window."""
    q, k = pos[:, :, None], pos[:, None, :]
    return (k <= q) & ((q - k < window) if window else True)


def ref_attention(p, x, cfg, pos, window=None, theta=None, factor=1.0):
    """Self-attention of x [B, T, D]: projections (+ q/k/v biases), QK-norm, RoPE, scaled
    scores, soft-cap, mask, softmax, output projection (+ its bias when present)."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else
             {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in p.items()}
    q = np.einsum("btd,dnh->btnh", x, p["q"]) + p.get("q_bias", 0)
    k = np.einsum("btd,dkh->btkh", x, p["k"]) + p.get("k_bias", 0)
    v = np.einsum("btd,dkh->btkh", x, p["v"]) + p.get("v_bias", 0)
    if cfg.qk_norm:
        q = ref_norm(q, p["q_norm"]["scale"], cfg.norm_eps, cfg.norm_offset)
        k = ref_norm(k, p["k_norm"]["scale"], cfg.norm_eps, cfg.norm_offset)
    theta = cfg.rope_theta if theta is None else theta
    q, k = ref_rope(q, pos, theta, factor), ref_rope(k, pos, theta, factor)
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # query head i reads kv head i // group
    scale = cfg.attn_scale if cfg.attn_scale is not None else q.shape[-1] ** -0.5
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if cfg.attn_softcap:
        s = cfg.attn_softcap * np.tanh(s / cfg.attn_softcap)
    s = np.where(ref_mask(pos, window)[:, None], s, -np.inf)
    probs = ref_softmax(s, p.get("sinks"))
    out = np.einsum("nhd,btnh->btd", p["o"], np.einsum("bnts,bsnh->btnh", probs, v))
    return out + p.get("o_bias", 0)


def ref_softmax(s, sinks=None):
    """Softmax of s [B, N, T, S] over keys; sinks [N]: one more logit per head in the
    denominator (gpt-oss), whose weight is dropped with it."""
    if sinks is not None:
        s = np.concatenate([s, np.broadcast_to(np.asarray(sinks, np.float64)[:, None, None], s.shape[:-1] + (1,))], -1)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs if sinks is None else probs[..., :-1]


GATES = {"geglu_tanh": lambda a: 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3))),
         "swiglu": lambda a: a / (1 + np.exp(-a))}


def ref_mlp(p, x, activation):
    """Gated MLP: act(x Wg) * (x Wi) Wo."""
    f = lambda name: np.asarray(p[name], np.float64)
    return (GATES[activation](x @ f("wg")) * (x @ f("wi"))) @ f("wo")


def ref_layer(p, x, cfg, pos, kind):
    """One layer: with sandwich norms x + post_norm(sublayer(pre_norm(x))) per sub-layer;
    "local" layers see `window` keys back and rotate by local_rope_theta, unscaled."""
    assert cfg.rope_scaling in (None, "linear"), "the reference rotates without or with linear scaling"
    linear = cfg.rope_scaling_factor if cfg.rope_scaling == "linear" else 1.0
    window, theta, factor = None, cfg.rope_theta, linear
    if kind == "local":
        window = cfg.sliding_window
        if cfg.local_rope_theta is not None:
            theta, factor = cfg.local_rope_theta, 1.0
    norm = lambda name, h: ref_norm(h, p[name]["scale"], cfg.norm_eps, cfg.norm_offset)
    attn = lambda h: ref_attention(p["attn"], h, cfg, pos, window, theta, factor)
    for name, sublayer in (("attn", attn), ("mlp", lambda h: ref_mlp(p["mlp"], h, cfg.activation))):
        y = sublayer(norm(f"{name}_norm", x))
        x = x + (norm(f"{name}_post_norm", y) if cfg.norm_position == "sandwich" else y)
    return x


def ref_decoder(params, cfg, toks):
    """logits [B, T, V] of a tied decoder: embed * scale -> layers of the pattern -> final
    norm -> tied head -> final soft-cap."""
    table = np.asarray(params["embed"]["tokens"], np.float64)
    x = table[np.asarray(toks)] * cfg.embed_scale
    pos = np.broadcast_to(np.arange(toks.shape[1]), toks.shape)
    stack = params["decoder"]
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda a: np.asarray(a[i]), stack["layers"])
        x = ref_layer(layer, x, cfg, pos, cfg.layer_pattern[i % len(cfg.layer_pattern)])
    logits = ref_norm(x, stack["final_norm"]["scale"], cfg.norm_eps, cfg.norm_offset) @ table.T
    return cfg.final_softcap * np.tanh(logits / cfg.final_softcap) if cfg.final_softcap else logits


def randomize(tree, seed=0):
    """Every leaf drawn again ~ N(0, 1/fan_in) (vectors: N(0, 0.5), so norm weights, biases
    and the offset visibly matter)."""
    rng = np.random.default_rng(seed)

    def draw(a):
        fan_in = a.shape[-3] if a.ndim == 4 else a.shape[-2] if a.ndim >= 2 else 4
        return jnp.asarray(rng.normal(0, fan_in ** -0.5, a.shape), a.dtype)

    return jax.tree.map(draw, tree)


def draw(spec):
    """Random parameters of a spec (`randomize`), without running its initializers."""
    return randomize(jax.eval_shape(lambda: materialize(spec, jax.random.key(0), jnp.float32)))


def positions():
    return np.broadcast_to(np.arange(T), (B, T))


def hidden(seed=1, d=32):
    return np.random.default_rng(seed).normal(size=(B, T, d)).astype(np.float32)


def self_attention(cfg, p, x, kind="global"):
    """zoo's self-attention of kind over x at positions 0..T-1 (one jitted program: faster
    than op by op)."""
    def run(p, x, pos):
        ctx = self_context({}, cfg, pos, causal=True, valid=None)
        return apply_attention(p, x, ctx.attention[kind], cfg)

    return np.asarray(jax.jit(run)(p, jnp.asarray(x), jnp.asarray(positions())))


def layer(cfg, p, x, kind):
    """zoo's layer of `kind` over x at positions 0..T-1, through apply_layer (jitted)."""
    def run(p, x, pos):
        return apply_layer(p, x, kind, self_context({}, cfg, pos, causal=True, valid=None), cfg)[0]

    return np.asarray(jax.jit(run)(p, jnp.asarray(x), jnp.asarray(positions())))


# --- norms --------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_scales_by_offset_plus_the_stored_weight(offset):
    """Gemma's RMSNorm multiplies by (1 + w) and stores w (zero at init); Llama's by w (one)."""
    cfg = tiny("tiny-decoder", norm_offset=offset, norm_eps=1e-6)
    p = materialize(norm_spec(cfg), jax.random.key(0), jnp.float32)
    assert float(jnp.abs(p["scale"] + offset - 1).max()) == 0  # init: a scale of exactly one
    p = randomize(p)
    x = hidden()
    np.testing.assert_allclose(apply_norm(p, jnp.asarray(x), cfg), ref_norm(x, p["scale"], 1e-6, offset),
                               atol=ATOL, rtol=1e-5)


# --- attention ----------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["qwen3", "gemma3"])
def test_qk_norm_normalises_each_head_over_head_dim_before_rope(offset):
    """Qwen3: q, k RMS-normalised per head with weight w; Gemma 3 with (1 + w); then RoPE.
    (A norm with a non-uniform weight does not commute with the rotation.)"""
    cfg = tiny("tiny-decoder", qk_norm=True, norm_offset=offset, norm_eps=1e-6, head_dim=8)
    spec = attention_spec(cfg)
    assert spec["q_norm"]["scale"].shape == spec["k_norm"]["scale"].shape == (8,)
    p = draw(spec)
    x = hidden()
    np.testing.assert_allclose(self_attention(cfg, p, x), ref_attention(p, x, cfg, positions()), atol=ATOL)


@pytest.mark.parametrize("implementation", ["xla", "rows"])
def test_attention_logits_are_soft_capped_before_the_mask(implementation):
    """scores -> cap * tanh(scores / cap), then the mask: a masked key gets no weight at
    all (capping after the mask would give it exp(-cap))."""
    rng = np.random.default_rng(0)
    q = rng.normal(0, 3, (B, T, 4, 8)).astype(np.float32)
    k = rng.normal(0, 3, (B, T, 2, 8)).astype(np.float32)
    v = rng.normal(size=(B, T, 2, 8)).astype(np.float32)
    mask = ref_mask(positions())
    cap, scale = 2.0, 8 ** -0.5
    got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), None, scale,
                 implementation, causal=True, softcap=cap)
    s = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), np.repeat(k, 2, axis=2)) * scale
    assert np.abs(s).max() > 5 * cap  # the cap bites
    s = np.where(mask[:, None], cap * np.tanh(s / cap), -np.inf)
    probs = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnh->btnh", probs / probs.sum(-1, keepdims=True), np.repeat(v, 2, axis=2))
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_final_logits_are_soft_capped():
    """logits -> cap * tanh(logits / cap) after the head (tied and untied)."""
    cap = 1.0
    x = hidden(d=32) * 2
    for tied in (True, False):
        cfg = tiny("tiny-decoder", final_softcap=cap, tie_embeddings=tied)
        params = draw(zoo.spec(cfg))
        w = params["embed"]["tokens"].T if tied else params["head"]["kernel"]
        raw = x.astype(np.float64) @ np.asarray(w, np.float64)
        assert np.abs(raw).max() > 3 * cap
        got = jax.jit(vocab_logits, static_argnums=2)(params, jnp.asarray(x), cfg)
        np.testing.assert_allclose(got, cap * np.tanh(raw / cap), atol=ATOL, err_msg=f"tied={tied}")


def test_query_pre_attn_scalar_is_the_score_scale():
    """Gemma 2 scales scores by query_pre_attn_scalar ** -0.5 (Config.attn_scale), not by
    head_dim ** -0.5."""
    cfg = tiny("tiny-decoder", head_dim=8, attn_scale=24 ** -0.5)
    p = draw(attention_spec(cfg))
    x = hidden()
    want = ref_attention(p, x, cfg, positions())
    np.testing.assert_allclose(self_attention(cfg, p, x), want, atol=ATOL)
    default = ref_attention(p, x, cfg.replace(attn_scale=None), positions())
    assert np.abs(default - want).max() > 1e-2  # the scale is visible at this size


def test_qkv_biases_without_an_output_bias():
    """Qwen2: q, k and v carry biases, the output projection none (no o_bias parameter)."""
    cfg = tiny("tiny-decoder", attn_bias=True, attn_out_bias=False)
    spec = attention_spec(cfg)
    assert {"q_bias", "k_bias", "v_bias"} <= set(spec) and "o_bias" not in spec
    assert "o_bias" not in attention_spec(zoo.preset("qwen2.5-7b"))
    p = draw(spec)
    x = hidden()
    np.testing.assert_allclose(self_attention(cfg, p, x), ref_attention(p, x, cfg, positions()), atol=ATOL)


# --- layers -------------------------------------------------------------------------------
def test_sandwich_norms_wrap_each_sublayer():
    """x + post_norm(sublayer(pre_norm(x))) for attention and MLP, with (1 + w) norms."""
    cfg = tiny("tiny-decoder", **{**GEMMA, "layer_pattern": (), "sliding_window": None})
    kind = layer_kinds(cfg, 1)[0]
    spec = layer_spec(cfg, kind)
    assert {"attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"} <= set(spec)
    p = draw(spec)
    x = hidden()
    got = layer(cfg, p, x, kind)
    np.testing.assert_allclose(got, ref_layer(p, x, cfg, positions(), "global"), atol=ATOL)


def test_local_layers_see_a_window_back_with_their_own_unscaled_rope():
    """A ("local", "global") pattern: local layers hide keys with q - k >= window and
    rotate by local_rope_theta unscaled; global layers see every earlier key and rotate by
    rope_theta with the config's scaling (linear here)."""
    cfg = tiny("tiny-decoder", layer_pattern=("local", "global"), sliding_window=3, local_rope_theta=100.0,
               rope_scaling="linear", rope_scaling_factor=2.0)
    kinds = layer_kinds(cfg, 4)
    assert [k.attention for k in kinds] == ["local", "global", "local", "global"]
    ctx = self_context({}, cfg, jnp.asarray(positions()), causal=True, valid=None)
    np.testing.assert_array_equal(ctx.attention["local"].mask, ref_mask(positions(), 3))
    np.testing.assert_array_equal(ctx.attention["global"].mask, ref_mask(positions()))
    p = draw(layer_spec(cfg, kinds[0]))
    x = hidden()
    outs = {}
    for kind in kinds[:2]:
        outs[kind.attention] = layer(cfg, p, x, kind)
        np.testing.assert_allclose(outs[kind.attention], ref_layer(p, x, cfg, positions(), kind.attention),
                                   atol=ATOL, err_msg=kind.attention)
    assert np.abs(outs["local"] - outs["global"]).max() > 1e-2


# --- attention sinks (gpt-oss) -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["xla", "rows", "cache"])
def test_attention_sinks_join_the_softmax_without_a_value(layout):
    """A logit per head joins every query's softmax and weighs no value (so the real keys'
    weights sum to less than one; a query that sees no key outputs 0), on the einsum path,
    row by row and over keys and values in the cache's layout."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, 4, 8)).astype(np.float32)
    k = rng.normal(size=(B, T, 2, 8)).astype(np.float32)
    v = rng.normal(size=(B, T, 2, 8)).astype(np.float32)
    sinks = np.asarray([-1.0, 0.0, 1.0, 2.0], np.float32)
    mask = ref_mask(positions()).copy()
    mask[1, 0] = False  # this query sees no key at all
    scale = 8 ** -0.5
    s = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), np.repeat(k, 2, axis=2)) * scale
    probs = ref_softmax(np.where(mask[:, None], s, -np.inf), sinks)
    want = np.einsum("bnts,bsnh->btnh", probs, np.repeat(v, 2, axis=2))
    if layout == "cache":  # [B*K, S, H] keys and [B*K, H, S] values (zoo.nn.cache)
        k = k.transpose(0, 2, 1, 3).reshape(B * 2, T, 8)
        v = v.transpose(0, 2, 3, 1).reshape(B * 2, 8, T)
    got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), None, scale,
                 "rows" if layout == "rows" else "xla", cache_layout=layout == "cache", sinks=jnp.asarray(sinks))
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert float(np.abs(got[1, 0]).max()) == 0.0


def test_attention_sinks_are_a_per_head_parameter_of_self_attention():
    """`Config.attn_sinks`: "sinks" [N] (sharded over heads) in self-attention, not in
    cross-attention; with gpt-oss's biases on q, k, v and o, against the reference."""
    cfg = tiny("tiny-decoder", **{**GPT_OSS, "layer_pattern": (), "sliding_window": None})
    spec = attention_spec(cfg)
    assert spec["sinks"].shape == (4,) and spec["sinks"].axes == ("heads",)
    assert {"q_bias", "k_bias", "v_bias", "o_bias"} <= set(spec)
    assert "sinks" not in attention_spec(cfg, cross=True)
    p = draw(spec)
    x = hidden()
    want = ref_attention(p, x, cfg, positions())
    np.testing.assert_allclose(self_attention(cfg, p, x), want, atol=ATOL)
    without = ref_attention({k: v for k, v in p.items() if k != "sinks"}, x, cfg, positions())
    assert np.abs(without - want).max() > 1e-2  # the sinks are visible at this size


# --- embeddings ---------------------------------------------------------------------------
def test_embedding_scale_is_rounded_to_the_compute_dtype():
    """Gemma multiplies embeddings by sqrt(d_model) held in the compute dtype: in bf16,
    sqrt(1152) = 33.94 becomes 34.0 before the product (which is rounded to bf16 again)."""
    cfg = zoo.preset("gemma-3-1b").replace(vocab_size=64, d_model=32, dtype="bfloat16")
    assert cfg.embed_scale == 1152 ** 0.5
    table = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    toks = np.arange(64).reshape(2, 32)
    got = embed_tokens({"tokens": jnp.asarray(table)}, jnp.asarray(toks), cfg)
    bf16 = ml_dtypes.bfloat16
    scale = np.asarray(cfg.embed_scale, bf16)
    assert float(scale) == 34.0
    want = (table[toks].astype(bf16).astype(np.float32) * np.float32(scale)).astype(bf16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))


# --- the whole stack ----------------------------------------------------------------------
def test_a_gemma_shaped_decoder_equals_the_reference():
    """zoo.forward of a tiny decoder with every mechanism on (pattern of period 3 over 5
    layers: one scanned period and 2 unrolled layers) against the numpy reference model."""
    cfg = tiny("tiny-decoder", num_layers=5, **GEMMA)
    params = draw(zoo.spec(cfg))
    toks = tokens(jax.random.key(1), B, T)
    got = forward(params, cfg, toks).logits
    np.testing.assert_allclose(got, ref_decoder(params, cfg, toks), atol=5e-5)


@pytest.mark.parametrize("shape", [GEMMA, GPT_OSS], ids=["gemma", "gpt-oss"])
def test_a_mixed_cache_keeps_a_ring_per_local_layer_and_decodes_as_the_full_forward(shape):
    """Local layers keep a ring of window + chunk - 1 slots, global layers the full length;
    a prompt longer than the ring, chunks of 3 and single tokens give the full forward's
    logits at every position (one row left-padded). gpt-oss: the sinks join the softmax over
    the cache as over the full sequence."""
    cfg = tiny("tiny-decoder", num_layers=3, **shape)
    length, chunk, window = 20, 3, shape["sliding_window"]
    cache = zoo.init_cache(cfg, B, length, chunk=chunk)
    kinds = [cfg.layer_kind(i) for i in range(cfg.num_layers)]
    assert isinstance(cache.kv, tuple) and len(cache.kv) == cfg.num_layers
    rows = B * cfg.num_kv_heads
    for kind, kv in zip(kinds, cache.kv):
        slots = window + chunk - 1 if kind == "local" else length
        assert kv.k.shape == (rows, slots, cfg.head_size) and kv.v.shape == (rows, cfg.head_size, slots), kind
    assert cache.slots["local"].ring and cache.slots["local"].size == window + chunk - 1
    assert not cache.slots["global"].ring and cache.slots["global"].size == length
    params = draw(zoo.spec(cfg))
    toks = tokens(jax.random.key(1), B, length)
    mask = jnp.ones((B, length), bool).at[1, :2].set(False)  # row 1: two pads in front
    full = forward(params, cfg, toks, mask=mask).logits
    out, start = [], 0
    for size in [7, 3, 3, 3, 1, 1, 1, 1]:
        o = forward(params, cfg, toks[:, start:start + size], mask=mask[:, start:start + size], cache=cache)
        out.append(o.logits)
        cache, start = o.cache, start + size
    got = jnp.concatenate(out, axis=1)
    np.testing.assert_allclose(np.where(mask[..., None], got, 0), np.where(mask[..., None], full, 0), atol=1e-5)
    assert cache.lengths.tolist() == [length, length - 2]
