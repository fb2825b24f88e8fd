"""One attention for every family: self or cross, bidirectional, causal, prefix, padded,
packed (segment ids) and sliding-window, with RoPE, ALiBi or T5 relative biases, and
optionally learned attention sinks (gpt-oss: one logit per head that joins the softmax).

GQA groups query heads over their shared key/value head (`[B, T, K, G, H]`); keys and
values are never repeated. Scores and softmax run in fp32.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zoo.config import Config
from zoo.nn.blockwise import blockwise_attend
from zoo.nn.cache import LayerKV, Plan, update as update_cache
from zoo.nn.linear import matmul
from zoo.nn.masks import MaskParts, PositionBias, attention_mask  # attention_mask: re-exported
from zoo.nn.norms import apply_norm, norm_spec
from zoo.nn.param import Spec, init_std, param
from zoo.nn.splash import splash_attend, splash_unfit
from zoo.nn.positions import RopeTables, apply_rope, apply_rope_cached
from zoo.nn.quant import concatenate
from zoo.sharding import active_mesh, constrain, context_size

_MASKED = -1e30  # finite, so fully masked rows (padding queries) stay NaN-free


class Context(NamedTuple):
    """What every layer of a stack needs besides its params; built once per forward.

    mask: [B, Tq, Tk] bool, True where query may attend to key; for the blockwise path
    (`Config.attention="blockwise"`) the MaskParts it is built from, block by block.
    bias: [B|1, N, Tq, Tk] fp32 additive bias (ALiBi / relative), or None; with MaskParts
    the PositionBias that builds it.
    rope: the rotation of queries and keys at their positions, or None (no RoPE, cross).
    """

    mask: jax.Array | MaskParts
    bias: jax.Array | PositionBias | None
    rope: RopeTables | None
    causal: bool = False  # static: mask is at most the causal mask (lets kernels skip blocks)
    key_rope: RopeTables | None = None  # a streaming cache's keys, rotated on read ([B, R] positions)


def attention_spec(cfg: Config, cross: bool = False) -> Spec:
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    kv = init_std(cfg, "kv", d)
    spec = {
        "q": param((d, n, h), ("embed", "heads", "head_dim"), std=init_std(cfg, "q", d)),
        "k": param((d, k, h), ("embed", "kv_heads", "head_dim"), std=kv),
        "v": param((d, k, h), ("embed", "kv_heads", "head_dim"), std=kv),
        "o": param((n, h, d), ("heads", "head_dim", "embed"), std=init_std(cfg, "out", n * h)),
    }
    if cfg.attn_bias:
        spec["q_bias"] = param((n, h), ("heads", "head_dim"), "zeros")
        if cfg.key_bias:  # Whisper has none (a key bias shifts every score of a query alike)
            spec["k_bias"] = param((k, h), ("kv_heads", "head_dim"), "zeros")
        spec["v_bias"] = param((k, h), ("kv_heads", "head_dim"), "zeros")
    if cfg.out_bias:
        spec["o_bias"] = param((d,), ("embed",), "zeros")
    if cfg.qk_norm and not cross:
        spec["q_norm"] = norm_spec(cfg, h)
        spec["k_norm"] = norm_spec(cfg, h)
    if cfg.attn_sinks and not cross:
        spec["sinks"] = param((n,), ("heads",))  # N(0, 0.02), as transformers inits gpt-oss's
    return spec


def project_kv(p: dict, x: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """x: [B, S, D] -> keys, values [B, S, K, H] (before QK-norm and RoPE)."""
    dt = x.dtype
    k = matmul(x, p["k"], mode=cfg.matmul)
    v = matmul(x, p["v"], mode=cfg.matmul)
    if cfg.key_bias:
        k = k + p["k_bias"].astype(dt)
    if cfg.attn_bias:
        v = v + p["v_bias"].astype(dt)
    return k, v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | MaskParts,
           bias: jax.Array | PositionBias | None, scale: float, implementation: str = "xla",
           causal: bool = False, cache_layout: bool = False,
           softcap: float | None = None, sinks: jax.Array | None = None,
           block: int = 512) -> jax.Array:
    """q: [B, T, N, H], k/v: [B, S, K, H], mask: [B, T, S] -> [B, T, N, H].

    cache_layout: k [B*K, S, H] and v [B*K, H, S] as a KV cache stores them (`zoo.nn.cache`).
    softcap: scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2).
    sinks: [N] a logit per head that joins every query's softmax without a value (gpt-oss):
    the weights of the real keys sum to less than 1, and a fully masked row outputs 0.
    implementation (`Config.attention`, resolved by `zoo.nn.backend.resolve`): "xla" is the
    einsum below, on any device; "rows" the same one batch row at a time (a CPU's cache
    holds a row's scores); "cudnn" NVIDIA's fused kernel through
    `jax.nn.dot_product_attention` (`causal` lets it skip masked blocks) where the call
    allows it (`cudnn_fits`), else xla. "blockwise" (`zoo.nn.blockwise`, `block` queries
    and keys at a time) in memory linear in T and S; it needs the mask as MaskParts (and
    the bias as a PositionBias), and other paths given those build the dense arrays (a
    cache's queries, cache_layout, take the xla path). "splash" (TPUs, `zoo.nn.splash`) the
    Pallas splash kernel where the call fits it (`splash_unfit`), else blockwise. "auto" here
    is xla: the math never looks at the device it runs on.

    On a mesh with a `context` axis (`zoo.sharding`) the queries stay split over it and the
    keys and values come whole (`_attend_out` gathers them): xla and rows by the partitioner,
    blockwise by `_blockwise_over_context`; cudnn and splash are refused (`check_context`)."""
    check_context(implementation, context_size())
    if isinstance(mask, MaskParts):
        if implementation == "splash" and not cache_layout:
            if splash_unfit(mask, bias, q.shape, k.shape) is None:
                return splash_attend(q, k, v, mask, scale, softcap=softcap, sinks=sinks)
            implementation = "blockwise"
        if implementation == "blockwise" and not cache_layout:
            if context_size() > 1:
                return _blockwise_over_context(q, k, v, mask, bias, scale, block, softcap, sinks)
            return blockwise_attend(q, k, v, mask, bias, scale, block=block, softcap=softcap,
                                    sinks=sinks)
        mask, bias = mask.dense(), None if bias is None else bias(mask.q_pos, mask.k_pos)
    elif implementation in ("blockwise", "splash") and q.shape[1] > block:
        warnings.warn(f"attention={implementation!r}: {q.shape[1]} queries over a cache of "
                      f"{mask.shape[-1]} keys run the XLA path, whose scores [B, N, T, S] grow with "
                      "both; prefill a long prompt in chunks", stacklevel=2)
    if implementation == "cudnn" and cudnn_fits(q.dtype, bias is not None, cache_layout, softcap,
                                                sinks is not None):
        try:
            return _attend_cudnn(q, k, v, mask, bias, scale, causal, cache_layout)
        except NotImplementedError:  # shapes the kernel rejects (head size, odd lengths)
            pass
    b, t, n, h = q.shape
    if implementation == "rows" and not cache_layout:
        return _attend_by_rows(q, k, v, mask, bias, scale, softcap, sinks)
    kv = k.shape[0] // b if cache_layout else k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    if cache_layout:
        # One batch axis (B*K), matching the buffers, so XLA reads them without a copy.
        qm = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b * kv, n // kv * t, h)
        scores = jnp.einsum("xqh,xsh->xqs", qm, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kv, n // kv, t, -1) * scale
    else:
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = _cap(scores, softcap)
    if bias is not None:
        scores = scores + bias.reshape(bias.shape[0], kv, n // kv, *bias.shape[2:])
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    sinks = None if sinks is None else sinks.reshape(kv, n // kv, 1, 1)
    probs = _softmax(scores, sinks).astype(v.dtype)
    if cache_layout:
        out = jnp.einsum("xqs,xhs->xqh", probs.reshape(b * kv, n // kv * t, -1), v)
        out = jnp.transpose(out.reshape(b, kv, n // kv, t, h), (0, 3, 1, 2, 4))
    else:
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


# Attention implementations that run with the sequence split over a `context` mesh axis
# ("auto" resolves to one of them there, `zoo.nn.backend.resolve`). cuDNN's and the splash
# kernel are custom calls the partitioner cannot split along the queries.
CONTEXT_PARALLEL = ("auto", "xla", "rows", "blockwise")


def check_context(implementation: str, context: int) -> None:
    """Raise ValueError when attention `implementation` cannot run with the sequence split
    `context` ways (before anything compiles)."""
    if context > 1 and implementation not in CONTEXT_PARALLEL:
        raise ValueError(f"attention={implementation!r} cannot run with the sequence split over "
                         f"a context mesh axis (context={context}); use one of {CONTEXT_PARALLEL}")


def _blockwise_over_context(q: jax.Array, k: jax.Array, v: jax.Array, parts: MaskParts,
                            bias: PositionBias | None, scale: float, block: int,
                            softcap: float | None, sinks: jax.Array | None) -> jax.Array:
    """Blockwise attention with the queries [B, T, N, H] split C ways over the `context`
    mesh axis and the keys/values [B, S, K, H] whole (gathered where they enter the
    `shard_map`; their gradients summed where they leave it). Each device runs blockwise
    attention on its queries, so it skips the blocks its own causal/segment/window mask
    leaves empty; under a causal mask the queries are first put in zig-zag order (`zigzag`:
    device i holds chunks i and 2C-1-i of 2C, when 2C divides T), so every device has
    about as many visible keys. The mask keeps the global positions -> [B, T, N, H]."""
    mesh = active_mesh()
    c = mesh.shape["context"]
    if q.shape[1] % c:
        raise ValueError(f"attention: {q.shape[1]} queries per row do not split over the context "
                         f"mesh axis (context={c}); use a sequence length that is a multiple of {c}")
    # Reordering pays only where a causal mask makes the work uneven; it needs 2C chunks.
    order, back = zigzag(c) if parts.causal and q.shape[1] % (2 * c) == 0 else ((), ())
    split, whole = P(None, "context"), P()
    q_side = tuple(None if x is None else _reorder(x, order)
                   for x in (parts.q_pos, parts.q_segments, parts.q_prefix))
    k_side = (parts.k_pos, parts.k_valid, parts.k_segments, parts.k_prefix)

    def local(q, k, v, q_side, k_side, bias, sinks):
        mine = dataclasses.replace(parts, q_pos=q_side[0], q_segments=q_side[1], q_prefix=q_side[2],
                                   k_pos=k_side[0], k_valid=k_side[1], k_segments=k_side[2],
                                   k_prefix=k_side[3], same_tokens=False)
        return blockwise_attend(q, k, v, mine, bias, scale, block=block, softcap=softcap, sinks=sinks)

    # check_vma=False: the backward's lax.cond branches differ in which axes they vary over;
    # the cotangents of the whole (P()) inputs are still summed over `context` on the way out.
    run = jax.shard_map(local, mesh=mesh, in_specs=(split, whole, whole, split, whole, whole, whole),
                        out_specs=split, axis_names=frozenset({"context"}), check_vma=False)
    out = run(_reorder(q, order), k, v, q_side, k_side, bias, sinks)
    return _reorder(out, back)


def zigzag(c: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(order, inverse) of a row's 2C chunks for causal load balance over C devices: device
    i gets chunks i and 2C-1-i, one early and one late."""
    order = tuple(x for i in range(c) for x in (i, 2 * c - 1 - i))
    return order, tuple(order.index(j) for j in range(2 * c))


def _reorder(x: jax.Array, order: tuple[int, ...]) -> jax.Array:
    """x [B, T, ...] with its T cut into len(order) chunks, put in `order` (() : as is)."""
    if not order:
        return x
    b, t = x.shape[:2]
    n = len(order)
    chunks = x.reshape(b, n, t // n, *x.shape[2:])
    return jnp.take(chunks, jnp.asarray(order), axis=1).reshape(x.shape)


def _cap(scores: jax.Array, softcap: float | None) -> jax.Array:
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _softmax(scores: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """fp32 softmax over the last (key) axis of scores [..., S]; sinks (broadcasting against
    scores[..., :1]) is one more logit per row in the denominator, with no value to weigh."""
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    sinks = sinks.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks))
    e = jnp.exp(scores - top)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - top))


def cudnn_fits(dtype: jnp.dtype, has_bias: bool, cache_layout: bool,
               softcap: float | None = None, has_sinks: bool = False) -> bool:
    """Whether a call can run on the cuDNN kernel: bf16/fp16, without an additive bias
    (ALiBi, T5's relative buckets: the kernel would have to return its gradient), without
    soft-capping or attention sinks (jax.nn.dot_product_attention has neither), and outside
    cached decoding (queries over the cache layout; the kernel is unmeasured there)."""
    return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not has_bias
            and not cache_layout and softcap is None and not has_sinks)


def _attend_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  bias: jax.Array | None, scale: float, causal: bool,
                  cache_layout: bool) -> jax.Array:
    b = q.shape[0]
    if cache_layout:
        k = jnp.swapaxes(k.reshape(b, -1, *k.shape[1:]), 1, 2)
        v = jnp.transpose(v.reshape(b, -1, *v.shape[1:]), (0, 3, 1, 2))
    full_bias = None if bias is None else bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=full_bias, mask=mask[:, None], scale=scale,
                                        is_causal=causal, implementation="cudnn")


# On CPU, attention runs one batch row at a time: a row's scores ([N, T, S] fp32) stay in
# the core's cache through mask, softmax and the second matmul, the rows run on both cores at
# once, and single-batch-axis matmuls avoid XLA's slow multi-batch-axis path (measured in
# bench/RESULTS.md, "Attention on CPU, row by row").
# Beyond _MAX_UNROLLED_ROWS the rows run under lax.map (one compiled row, a loop).
_MAX_UNROLLED_ROWS = 32


def _attend_by_rows(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    bias: jax.Array | None, scale: float, softcap: float | None,
                    sinks: jax.Array | None = None) -> jax.Array:
    b = q.shape[0]
    if bias is not None:
        bias = jnp.broadcast_to(bias, (b, *bias.shape[1:]))
    if b <= _MAX_UNROLLED_ROWS:
        return jnp.stack([_attend_row(q[i], k[i], v[i], mask[i], None if bias is None else bias[i],
                                      scale, softcap, sinks) for i in range(b)])
    return jax.lax.map(lambda xs: _attend_row(*xs, scale=scale, softcap=softcap, sinks=sinks),
                       (q, k, v, mask, bias))


def _attend_row(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                bias: jax.Array | None, scale: float, softcap: float | None,
                sinks: jax.Array | None = None) -> jax.Array:
    """One row: q [T, N, H], k/v [S, K, H], mask [T, S], bias [N, T, S], sinks [N] -> [T, N, H]."""
    t, n, h = q.shape
    kv = k.shape[1]
    g = n // kv
    if g == 1:
        scores = jnp.einsum("tnh,snh->nts", q, k, preferred_element_type=jnp.float32)
    else:  # the G query heads of a kv head side by side: one matmul per kv head
        qm = jnp.transpose(q.reshape(t, kv, g, h), (1, 2, 0, 3)).reshape(kv, g * t, h)
        scores = jnp.einsum("kqh,skh->kqs", qm, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(n, t, -1)
    scores = _cap(scores * scale, softcap)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask[None], scores, _MASKED)
    probs = _softmax(scores, None if sinks is None else sinks[:, None, None]).astype(v.dtype)
    if g == 1:
        return jnp.einsum("nts,snh->tnh", probs, v)
    out = jnp.einsum("kqs,skh->kqh", probs.reshape(kv, g * t, -1), v).reshape(kv, g, t, h)
    return jnp.transpose(out, (2, 0, 1, 3)).reshape(t, n, h)


def fuse_qkv(p: dict) -> dict:
    """Self-attention params in the decoding layout (`Config.layout="decoding"`): q, k, v
    merged into one matrix `qkv` [D, (N + 2K) * H] (and `qkv_bias`), so one matmul reads all
    three, which at batch 1 is one pass over the weights instead of three short ones."""
    d, n, h = p["q"].shape
    k = p["k"].shape[1]
    out = {name: w for name, w in p.items() if name not in ("q", "k", "v", "q_bias", "k_bias", "v_bias")}
    out["qkv"] = concatenate([p["q"].reshape(d, n * h), p["k"].reshape(d, k * h),  # or QuantizedWeights
                              p["v"].reshape(d, k * h)], axis=1)
    if "q_bias" in p:
        k_bias = p["k_bias"] if "k_bias" in p else jnp.zeros_like(p["v_bias"])  # attn_key_bias=False
        out["qkv_bias"] = jnp.concatenate([p["q_bias"].reshape(-1), k_bias.reshape(-1),
                                           p["v_bias"].reshape(-1)])
    return out


def _fused_qkv(p: dict, x: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] through a `fuse_qkv` matrix -> q [B, T, N, H], k, v [B, T, K, H]."""
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
    y = matmul(x, p["qkv"], mode=cfg.matmul)
    if cfg.attn_bias:
        y = y + p["qkv_bias"].astype(x.dtype)
    b, t = x.shape[:2]
    q, kk, v = jnp.split(y, [n * h, (n + k) * h], axis=-1)
    return q.reshape(b, t, n, h), kk.reshape(b, t, k, h), v.reshape(b, t, k, h)


def _self_qkv(p: dict, x: jax.Array, ctx: Context,
              cfg: Config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [B, T, N, H], keys and values [B, T, K, H] of self-attention over x: QK-norm,
    then RoPE."""
    if cfg.layout == "decoding":
        q, k, v = _fused_qkv(p, x, cfg)
    else:
        q = _project_q(p, x, cfg)
        k, v = project_kv(p, x, cfg)
    if cfg.qk_norm:
        q, k = apply_norm(p["q_norm"], q, cfg), apply_norm(p["k_norm"], k, cfg)
    if ctx.rope is not None:
        q, k = apply_rope(q, ctx.rope), apply_rope(k, ctx.rope)
    return q, k, v


def _project_q(p: dict, x: jax.Array, cfg: Config) -> jax.Array:
    q = matmul(x, p["q"], mode=cfg.matmul)
    return q + p["q_bias"].astype(x.dtype) if cfg.attn_bias else q


def _attend_out(p: dict, q: jax.Array, k: jax.Array, v: jax.Array, ctx: Context,
                cfg: Config, cache_layout: bool = False) -> jax.Array:
    """Attention of q over k, v under ctx, projected back to [B, T, D]."""
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    if not cache_layout:
        # Keys and values whole along the sequence: on a `context` mesh axis this is the
        # all-gather of context parallelism (queries stay split, `attend`).
        k = constrain(k, ("batch", None, "kv_heads", "head_dim"))
        v = constrain(v, ("batch", None, "kv_heads", "head_dim"))
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_size ** -0.5
    out = attend(q, k, v, ctx.mask, ctx.bias, scale, cfg.attention, ctx.causal, cache_layout,
                 cfg.attn_softcap, p.get("sinks"), cfg.attention_block)
    # One [N*H, D] matmul: as an einsum over (n, h), XLA may transpose the weight to match
    # the activation's layout, a full copy of W_o on every decoding step.
    y = matmul(out, p["o"], n_in=2, mode=cfg.matmul)
    if cfg.out_bias:
        y = y + p["o_bias"].astype(q.dtype)
    return y


def apply_attention(p: dict, x: jax.Array, ctx: Context, cfg: Config) -> jax.Array:
    """Self-attention: x [B, T, D] -> [B, T, D]."""
    return _attend_out(p, *_self_qkv(p, x, ctx, cfg), ctx, cfg)


def apply_cross_attention(p: dict, x: jax.Array, kv: tuple[jax.Array, jax.Array], ctx: Context,
                          cfg: Config, cache_layout: bool = False) -> jax.Array:
    """x [B, T, D] attending over precomputed keys/values `kv` ([B, S, K, H] each, or as a
    cache stores them with cache_layout; `project_kv`) -> [B, T, D]. No RoPE on cross keys."""
    return _attend_out(p, _project_q(p, x, cfg), *kv, ctx, cfg, cache_layout)


def apply_cached_attention(p: dict, x: jax.Array, ctx: Context, cfg: Config, layer: LayerKV,
                           plan: Plan) -> tuple[jax.Array, LayerKV]:
    """Self-attention of a chunk x: [B, T, D] over a layer's cache (R slots) plus its
    own keys; ctx.mask is [B, T, R] (or [B, T, R + T] for a concat plan).
    Returns (y [B, T, D], the layer cache with the chunk's keys and values stored).
    With ctx.key_rope (a streaming cache, `zoo.nn.cache`) keys are stored unrotated and
    rotated to their in-cache positions on every read."""
    if ctx.key_rope is None:
        q, k, v = _self_qkv(p, x, ctx, cfg)
        k, v, layer = update_cache(layer, k, v, plan)
    else:
        q, k, v = _self_qkv(p, x, ctx._replace(rope=None), cfg)
        k, v, layer = update_cache(layer, k, v, plan)
        q, k = apply_rope(q, ctx.rope), apply_rope_cached(k, ctx.key_rope)
    return _attend_out(p, q, k, v, ctx, cfg, cache_layout=True), layer
