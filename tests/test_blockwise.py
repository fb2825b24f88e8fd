"""Blockwise attention (zoo.nn.blockwise, Config.attention="blockwise") against the XLA path:
outputs and the gradients of q, k, v, the relative-bias table and the sinks within 1e-5
(fp32) for every mask kind, at lengths that are not a multiple of the block; the blocks it
skips; whole models (decoder, encoder, encdec) forward and backward; and what "auto" picks."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from conftest import tiny, tokens
from zoo.nn import backend, blockwise
from zoo.nn.attention import attend
from zoo.nn.masks import MaskParts, PositionBias

B, T, N, K, H = 2, 13, 4, 2, 8  # GQA: two query heads per key/value head
BLOCK = 4  # 13 = 3 blocks of 4 and one of 1
TOL = 1e-5


def arange(b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def packed() -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row 0: segments of 5, 6 and 2 tokens; row 1: 9 tokens, then 4 of padding (segment 0,
    invalid: its queries see no key). Returns positions, segment ids, validity [B, T]."""
    seg = np.array([[1] * 5 + [2] * 6 + [3] * 2, [1] * 9 + [0] * 4])
    pos = np.concatenate([np.arange(5), np.arange(6), np.arange(2)])[None].repeat(2, 0)
    pos[1] = np.r_[np.arange(9), np.zeros(4, int)]
    return jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32), jnp.asarray(seg > 0)


def left_padded() -> tuple[jax.Array, jax.Array]:
    """Row 1 starts with 3 padding tokens (positions as zoo.nn.transformer.default_positions)."""
    valid = jnp.asarray(np.r_[[True] * T, [False] * 3 + [True] * (T - 3)].reshape(2, T))
    return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32), valid


def prefix_mask() -> jax.Array:
    return jnp.asarray(np.arange(T)[None] < np.array([[5], [0]]))


def relative(bidirectional: bool) -> PositionBias:
    cfg = tiny("tiny-encdec", num_heads=N)
    table = 0.5 * jax.random.normal(jax.random.key(7), (cfg.relative_buckets, N))
    return PositionBias(table, cfg, bidirectional)


def alibi() -> PositionBias:
    return PositionBias(None, tiny("tiny-decoder", num_heads=N, positions="alibi"), False)


def _case(name: str):
    """(MaskParts, PositionBias or None, softcap, with sinks, key length) of a named case."""
    pos = arange(B, T)
    if name == "causal":
        return MaskParts.build(pos, pos, causal=True), None, None, False, T
    if name == "left_padding":
        p, valid = left_padded()
        return MaskParts.build(p, p, causal=True, k_valid=valid), None, None, False, T
    if name == "packed":
        p, seg, valid = packed()
        return (MaskParts.build(p, p, causal=True, k_valid=valid, q_segments=seg, k_segments=seg),
                None, None, False, T)
    if name == "prefix":
        return MaskParts.build(pos, pos, causal=True, prefix=prefix_mask()), None, None, False, T
    if name == "window":
        return MaskParts.build(pos, pos, causal=True, window=3), None, None, False, T
    if name == "two_sided_window":
        _, valid = left_padded()
        return MaskParts.build(pos, pos, causal=False, window=3, k_valid=valid), None, None, False, T
    if name == "bidirectional_packed":
        p, seg, valid = packed()
        return (MaskParts.build(p, p, causal=False, k_valid=valid, q_segments=seg, k_segments=seg),
                None, None, False, T)
    if name == "alibi":
        return MaskParts.build(pos, pos, causal=True), alibi(), None, False, T
    if name == "relative_encoder":
        _, valid = left_padded()
        return MaskParts.build(pos, pos, causal=False, k_valid=valid), relative(True), None, False, T
    if name == "relative_decoder":
        return MaskParts.build(pos, pos, causal=True), relative(False), None, False, T
    if name == "softcap":
        return MaskParts.build(pos, pos, causal=True), None, 2.0, False, T
    if name == "sinks_window":
        return MaskParts.build(pos, pos, causal=True, window=3), None, None, True, T
    if name == "sinks_packed":
        p, seg, valid = packed()
        return (MaskParts.build(p, p, causal=True, k_valid=valid, q_segments=seg, k_segments=seg),
                None, None, True, T)
    if name == "cross":  # 7 queries over 13 keys, the last 4 of row 1 padding
        _, _, valid = packed()
        return MaskParts.build(arange(B, 7), pos, causal=False, k_valid=valid), None, None, False, T
    raise ValueError(name)


CASES = ("causal", "left_padding", "packed", "prefix", "window", "two_sided_window",
         "bidirectional_packed", "alibi", "relative_encoder", "relative_decoder", "softcap",
         "sinks_window", "sinks_packed", "cross")


def _inputs(t: int, s: int):
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (B, t, N, H))
    k = jax.random.normal(ks[1], (B, s, K, H))
    v = jax.random.normal(ks[2], (B, s, K, H))
    w = jax.random.normal(ks[3], (B, t, N, H))  # the loss weighs every output differently
    sinks = jax.random.normal(ks[4], (N,))
    return q, k, v, w, sinks


@pytest.mark.parametrize("name", CASES)
def test_blockwise_matches_xla(name):
    parts, bias, softcap, with_sinks, s = _case(name)
    t = parts.q_pos.shape[1]
    q, k, v, w, sinks = _inputs(t, s)
    sinks = sinks if with_sinks else None
    table = None if bias is None else bias.table

    def loss(implementation, q, k, v, table, sinks):
        b = None if bias is None else PositionBias(table, bias.cfg, bias.bidirectional)
        if implementation == "xla":  # the dense mask and bias, as the other paths get them
            mask, b = parts.dense(), None if b is None else b(parts.q_pos, parts.k_pos)
        else:
            mask = parts
        out = attend(q, k, v, mask, b, 0.3, implementation, softcap=softcap, sinks=sinks, block=BLOCK)
        return jnp.sum(out * w), out

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True), static_argnums=0)
    (got, got_out), (want, want_out) = (grad(i, q, k, v, table, sinks) for i in ("blockwise", "xla"))
    np.testing.assert_allclose(got_out, want_out, atol=TOL, rtol=TOL)
    for name_, a, b in zip(("q", "k", "v", "bias table", "sinks"), got, want):
        if b is not None:
            np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL, err_msg=f"d{name_}")


def test_blocks_skipped():
    """Causal: only the blocks on or below the diagonal run; a window of 2 (a query and the
    key before it) leaves the diagonal and the one below it, two-sided the one above too;
    other segments' blocks are skipped."""
    pos = arange(1, 16)
    need = lambda parts: np.asarray(blockwise._needed(parts, *blockwise._mask_blocks(parts, 4, 4, 4, 4)))
    np.testing.assert_array_equal(need(MaskParts.build(pos, pos, causal=True)), np.tril(np.ones((4, 4), bool)))
    band = np.tril(np.ones((4, 4), bool)) & ~np.tril(np.ones((4, 4), bool), -2)
    np.testing.assert_array_equal(need(MaskParts.build(pos, pos, causal=True, window=2)), band)
    np.testing.assert_array_equal(need(MaskParts.build(pos, pos, causal=False, window=2)), band | band.T)
    seg = jnp.asarray([[1] * 8 + [2] * 8])
    both = MaskParts.build(pos, pos, causal=False, q_segments=seg, k_segments=seg)
    np.testing.assert_array_equal(need(both), np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))


def test_memory_linear_under_a_layer_scan():
    """Two scanned layers' forward and backward at 4096 tokens hold far less than one [T, T]
    fp32 matrix: nothing of a block outlives it (JAX hoists work that reads only the
    positions out of a scan and would stack every block's mask; `blockwise._tied`)."""
    t = 4096
    pos = arange(1, t)
    q, k = jnp.ones((1, t, 2, 8)), jnp.ones((1, t, 1, 8))

    def loss(w, q, k):
        parts = MaskParts.build(pos, pos, causal=True)
        layer = lambda x, wi: (blockwise.blockwise_attend(x * wi, k, k, parts, None, 0.3, block=256), None)
        return jnp.sum(jax.lax.scan(layer, q, w)[0])

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(2), q, k).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < t * t * 4 / 4


def _model_inputs(cfg: zoo.Config, length: int) -> zoo.Inputs:
    toks = tokens(jax.random.key(1), B, length)
    mask = jnp.arange(length)[None] < jnp.array([[length], [length - 5]])
    if cfg.family == "encdec":
        return zoo.Inputs(tokens=toks[:, :9], source=toks, source_mask=mask)
    if cfg.family == "encoder":
        return zoo.Inputs(tokens=toks, mask=mask)
    seg = jnp.where(jnp.arange(length)[None] < 8, 1, 2) * mask  # two packed documents and padding
    pos = jnp.where(jnp.arange(length) < 8, jnp.arange(length), jnp.arange(length) - 8)[None]
    return zoo.Inputs(tokens=toks, mask=mask, segment_ids=seg, positions=jnp.broadcast_to(pos, (B, length)))


MODELS = {  # a tiny model of each family; the decoder with local and global layers
    "decoder": ("tiny-decoder", dict(sliding_window=6, layer_pattern=("local", "global"))),
    "encoder": ("tiny-encoder", {}),
    "encdec": ("tiny-encdec", {}),  # T5's relative bias, cross-attention
    "mla": ("tiny-decoder", dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                                 head_dim=12)),
}


@pytest.mark.parametrize("name", ["decoder", "encoder", pytest.param("encdec", marks=pytest.mark.slow),
                                  pytest.param("mla", marks=pytest.mark.slow)])
def test_model_blockwise_matches_xla(name):
    """A forward and the gradient of every parameter: blockwise (blocks of 8 over 19 tokens)
    equal to xla."""
    preset, extra = MODELS[name]
    cfg = tiny(preset, attention="xla", **extra)
    params = zoo.init(cfg, jax.random.key(0))
    inputs = _model_inputs(cfg, 19)

    @jax.jit
    def run(params, inputs):
        def loss(params, c):
            out = zoo.apply(params, c, inputs)
            return jnp.sum(out.logits * jnp.cos(jnp.arange(out.logits.shape[-1]))), out.logits
        return {a: jax.grad(loss, has_aux=True)(params, cfg.replace(attention=a, attention_block=8))
                for a in ("blockwise", "xla")}

    got = run(params, inputs)
    (g_bw, out_bw), (g_x, out_x) = got["blockwise"], got["xla"]
    np.testing.assert_allclose(out_bw, out_x, atol=TOL, rtol=TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOL, rtol=1e-4), g_bw, g_x)


def test_auto_picks_blockwise_for_long_rows():
    cfg = tiny("tiny-decoder")
    long_row = int((backend.BLOCKWISE_ABOVE_BYTES / (cfg.num_heads * 4)) ** 0.5) + 1
    assert backend.choose_attention(cfg, "cpu", 1, (1, long_row)) == "blockwise"
    assert backend.choose_attention(cfg, "rocm", 1, (1, long_row)) == "blockwise"
    assert backend.choose_attention(cfg, "rocm", 1, (1, 4096)) == "xla"
    assert backend.choose_attention(cfg, "cpu", 1, (1, backend.BLOCKWISE_CPU_FROM_LENGTH)) == "blockwise"
    assert backend.choose_attention(cfg, "cpu", 1, (1, 512)) == "rows"
    assert backend.choose_attention(cfg, "cpu", 1, None) == "rows"
    assert backend.resolve(cfg, jnp.zeros((1, long_row), jnp.int32)).attention == "blockwise"
    bf16 = cfg.replace(dtype="bfloat16")
    assert backend.choose_attention(bf16, "cuda", 1, (1, long_row)) == "cudnn"


def test_a_long_chunk_over_a_cache_warns_that_it_runs_xla():
    """A cache's queries take the XLA path (dense mask): past one block of them, say so."""
    q, k = jnp.ones((1, 9, 2, 4)), jnp.ones((1, 20, 1, 4))
    mask = jnp.ones((1, 9, 20), bool)
    with pytest.warns(UserWarning, match="run the XLA path"):
        attend(q, k, k, mask, None, 0.5, "blockwise", block=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attend(q[:, :8], k, k, mask[:, :8], None, 0.5, "blockwise", block=8)  # one block: quiet


def test_attention_block_validated():
    with pytest.raises(zoo.ConfigError, match="attention_block"):
        tiny("tiny-decoder", attention_block=0)
