"""Pallas splash attention on TPUs (`Config.attention="splash"`, what "auto" picks on a TPU).

`jax.experimental.pallas.ops.tpu.splash_attention` runs blocks of queries over blocks of keys
in the TPU's vector memory, skipping the blocks its static mask hides, with a fused backward
pass. Its masks go by token index (`CausalMask`, `LocalMask` windows, `FullMask`) and-ed with
segment ids; zoo's go by position (`zoo.nn.masks`). They agree on every query that is not
padding when each segment's positions count up by one per token, which holds for the
forwards zoo runs to train and score (packed rows, right padding, left padding with
`zoo.nn.transformer.default_positions`): padding takes a segment id of its own, so a padded
query sees padded keys (its output differs from the XLA path's; nothing reads it) and a real
one never sees them.

`splash_unfit` names what a call needs that the kernel lacks; such a call runs blockwise
(`zoo.nn.blockwise`, memory linear in the length all the same): a prefix LM, ALiBi or T5
biases (the kernel adds no bias), cross-attention, a window that is data (the Contexts of a
stack with local and global layers, scanned), lengths that are not a multiple of 128, a
cache. Off a TPU the kernel runs only in Pallas interpret mode
(`jax.experimental.pallas.tpu.force_tpu_interpret_mode`); that is all that ran here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from zoo.nn.masks import NO_WINDOW, MaskParts, PositionBias

_BLOCKS = (512, 256, 128)  # the kernel's block sizes, largest dividing the length first


def splash_unfit(parts: MaskParts, bias: PositionBias | None, q_shape: tuple[int, ...],
                 k_shape: tuple[int, ...]) -> str | None:
    """Why the splash kernel cannot run this call (q [B, T, N, H], k [B, S, K, H]), or None."""
    t, s = q_shape[1], k_shape[1]
    if not parts.same_tokens or t != s:
        return "not self-attention"
    if parts.q_prefix is not None:
        return "a prefix-LM mask"
    if bias is not None:
        return "an additive position bias (ALiBi / relative)"
    if _block(t) is None:
        return f"length {t} is not a multiple of {_BLOCKS[-1]}"
    if _static_window(parts) is None:
        return "a sliding window that is data (a stack of local and global layers)"
    return None


def _block(length: int) -> int | None:
    return next((b for b in _BLOCKS if length % b == 0), None)


def _static_window(parts: MaskParts) -> int | None:
    """The window as a Python int (NO_WINDOW: none), or None while it is traced."""
    try:
        return int(parts.window)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def _mask(parts: MaskParts, length: int, heads: int) -> splash.MultiHeadMask:
    window = _static_window(parts)
    shape = (length, length)
    if window != NO_WINDOW:  # keys less than `window` positions back (and ahead, two-sided)
        one = splash.LocalMask(shape, (window - 1, 0 if parts.causal else window - 1), offset=0)
    elif parts.causal:
        one = splash.CausalMask(shape)
    else:
        one = splash.FullMask(shape)
    return splash.MultiHeadMask([one] * heads)


def splash_attend(q: jax.Array, k: jax.Array, v: jax.Array, parts: MaskParts, scale: float, *,
                  softcap: float | None = None, sinks: jax.Array | None = None) -> jax.Array:
    """q: [B, T, N, H], k/v: [B, T, K, H] under parts (`splash_unfit` None) -> [B, T, N, H]."""
    t, n = q.shape[1], q.shape[2]
    b = _block(t)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                              block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    kernel = splash.make_splash_mha(_mask(parts, t, n), head_shards=1, q_seq_shards=1,
                                    block_sizes=sizes, attn_logits_soft_cap=softcap)
    valid = jnp.ones(parts.q_pos.shape, bool) if parts.k_valid is None else parts.k_valid
    seg = jnp.zeros(parts.q_pos.shape, jnp.int32) if parts.q_segments is None else parts.q_segments
    seg = jnp.where(valid, seg, -1).astype(jnp.int32)  # padding: its own segment
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, N, T, H], the kernel's layout per row

    def row(q, k, v, seg):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg), sinks=sinks)

    # Row by row under lax.map: vmap's extra grid axis trips the interpret mode's dimension
    # semantics (jax 0.10.2), and a TPU runs the rows one after the other either way.
    rows = (heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), seg)
    out = jax.lax.map(lambda xs: row(*xs), rows)
    return heads_first(out).astype(v.dtype)
