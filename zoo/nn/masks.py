"""What a query sees and how its scores are biased, from positions: `attention_mask`
builds the [B, Tq, Tk] boolean mask and `MaskParts` carries what it is built from;
`PositionBias` builds ALiBi or T5 relative biases for any block of positions. Blockwise
attention (`zoo.nn.blockwise`) builds both one block at a time, never holding [Tq, Tk].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.positions import alibi_bias, relative_bias

MASKED = -1e30  # the score of a hidden key: finite, so fully masked rows stay NaN-free
NO_WINDOW = 2 ** 30  # MaskParts.window of a kind without a sliding window


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, *, causal: bool,
                   k_valid: jax.Array | None = None, window: int | jax.Array | None = None,
                   q_segments: jax.Array | None = None, k_segments: jax.Array | None = None,
                   prefix: jax.Array | None = None,
                   k_prefix: jax.Array | None = None) -> jax.Array:
    """[B, Tq, Tk] bool from positions [B, Tq] / [B, Tk].

    causal: a key is visible when its position is <= the query's; `prefix` ([B, Tq] bool,
    self-attention only) additionally lets prefix queries see every prefix key (`k_prefix`
    [B, Tk], default `prefix`: the keys' flags when keys are another block of the row).
    window: keys `window` or more positions away are hidden: back from the query when
    causal, on either side otherwise (an encoder's local attention; ModernBERT's
    local_attention = 2 * (window - 1)).
    k_valid: [B, Tk] False for padding. Segments: only equal ids attend (packing).
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    allowed = jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)
    if causal:
        visible = k <= q
        if prefix is not None:
            k_prefix = prefix if k_prefix is None else k_prefix
            visible = visible | (prefix[:, :, None] & k_prefix[:, None, :])
        allowed = allowed & visible
    if window is not None:
        allowed = allowed & ((q - k if causal else jnp.abs(q - k)) < window)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    if q_segments is not None and k_segments is not None:
        allowed = allowed & (q_segments[:, :, None] == k_segments[:, None, :])
    return allowed


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q_pos", "k_pos", "window", "k_valid", "q_segments",
                                "k_segments", "q_prefix", "k_prefix"],
                   meta_fields=["causal", "same_tokens"])
@dataclasses.dataclass(frozen=True)
class MaskParts:
    """The arguments of `attention_mask` for queries [B, T] over keys [B, S], kept apart.

    window is an int32 scalar array (NO_WINDOW: none), so the Contexts of a stack's
    attention kinds share one structure and stack (`zoo.nn.transformer._run_scanned`).
    """

    q_pos: jax.Array  # [B, T] int
    k_pos: jax.Array  # [B, S] int
    window: jax.Array  # [] int32
    k_valid: jax.Array | None = None  # [B, S] bool
    q_segments: jax.Array | None = None  # [B, T] int
    k_segments: jax.Array | None = None  # [B, S] int
    q_prefix: jax.Array | None = None  # [B, T] bool (causal self-attention)
    k_prefix: jax.Array | None = None  # [B, S] bool
    causal: bool = False
    same_tokens: bool = False  # queries and keys are one row's tokens (self-attention)

    @staticmethod
    def build(q_pos: jax.Array, k_pos: jax.Array, *, causal: bool,
              k_valid: jax.Array | None = None, window: int | None = None,
              q_segments: jax.Array | None = None, k_segments: jax.Array | None = None,
              prefix: jax.Array | None = None) -> "MaskParts":
        """The parts of `attention_mask` called with the same arguments (prefix: self-attention;
        the same positions array for queries and keys marks self-attention, `same_tokens`)."""
        w = jnp.asarray(NO_WINDOW if window is None else window, jnp.int32)
        return MaskParts(q_pos, k_pos, w, k_valid, q_segments, k_segments, prefix, prefix, causal,
                         q_pos is k_pos)

    def dense(self) -> jax.Array:
        """The [B, T, S] bool mask, as `attention_mask` builds it."""
        return self.block(self.q_pos, self.k_pos, self.k_valid, self.q_segments,
                          self.k_segments, self.q_prefix, self.k_prefix)

    def block(self, q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array | None,
              q_segments: jax.Array | None, k_segments: jax.Array | None,
              q_prefix: jax.Array | None, k_prefix: jax.Array | None) -> jax.Array:
        """The mask [B, bq, bk] of a block of queries over a block of keys (the fields'
        slices, each [B, bq] or [B, bk]) under this mask's causality and window."""
        return attention_mask(q_pos, k_pos, causal=self.causal, k_valid=k_valid,
                              window=self.window, q_segments=q_segments, k_segments=k_segments,
                              prefix=q_prefix, k_prefix=k_prefix)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["table"],
                   meta_fields=["cfg", "bidirectional"])
@dataclasses.dataclass(frozen=True)
class PositionBias:
    """A model's additive score bias as a function of query and key positions: ALiBi
    (table None) or T5's relative buckets (table [buckets, N], learned). Called on
    positions [B, Tq], [B, Tk] -> [B, N, Tq, Tk] fp32; blockwise attention calls it one
    block at a time and differentiates it for the table's gradient."""

    table: jax.Array | None
    cfg: Config
    bidirectional: bool

    def __call__(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        if self.table is None:
            return alibi_bias(q_pos, k_pos, self.cfg.num_heads)
        return relative_bias(self.table, q_pos, k_pos, self.bidirectional, self.cfg)
