"""Blockwise attention in memory linear in the sequence (`Config.attention="blockwise"`).

Queries and keys are cut into blocks; each query block runs over the key blocks with an
online softmax (a running maximum, denominator and weighted sum per query), so no more than
one [bq, bk] block of scores exists at a time. The mask and the position bias of a block are
built from positions (`zoo.nn.masks.MaskParts`, `zoo.nn.positions.PositionBias`), never
read from a [T, S] array. Blocks whose mask is provably empty for every batch row (causal,
sliding window, other segments, padding) are skipped under `lax.cond`, from per-block
bounds of the positions.

The backward pass is its own (`jax.custom_vjp`): the forward keeps only the output and the
log-sum-exp of every query, and the backward recomputes each block's probabilities from
them, accumulating dq over query blocks and dk, dv, the bias table's and the sinks'
gradients as it goes.

The arithmetic is the XLA path's (`zoo.nn.attention.attend`): scores in fp32, scaled, soft-
capped, biased, masked; sinks join the denominator; a query that sees no key outputs the
mean of every value as the XLA path's uniform softmax over masked scores does (0 with sinks).

Layout: batch and kv heads share one leading axis (B*K) and the G query heads of a kv head
sit next to the block's queries (G*bq rows), so every matmul has a single batch axis.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo.nn.masks import MASKED, MaskParts, PositionBias

_FAR = 2 ** 30  # beyond any position: the bound of a block without a valid key


class _Static(NamedTuple):
    scale: float
    softcap: float | None
    block_q: int
    block_k: int


def blockwise_attend(q: jax.Array, k: jax.Array, v: jax.Array, parts: MaskParts,
                     bias: PositionBias | None, scale: float, *, block: int,
                     softcap: float | None = None, sinks: jax.Array | None = None) -> jax.Array:
    """q: [B, T, N, H], k/v: [B, S, K, H] (N a multiple of K), the mask's parts over
    [B, T] x [B, S], an optional position bias and sinks [N] -> [B, T, N, H].

    block: queries and keys per block (smaller sequences are one block)."""
    static = _Static(float(scale), softcap, min(block, q.shape[1]), min(block, k.shape[1]))
    return _attend(static, q, k, v, parts, bias, sinks)


# --- blocks -------------------------------------------------------------------------------
def _pad_to(x: jax.Array, length: int, mode: str = "constant") -> jax.Array:
    """x [B, L, ...] padded along axis 1 to `length` (zeros/False, or `mode="edge"`)."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, mode=mode)


def _row_blocks(x: jax.Array | None, n: int, size: int, mode: str = "constant") -> jax.Array | None:
    """[B, L] -> [n, B, size] (padded)."""
    if x is None:
        return None
    x = _pad_to(x, n * size, mode)
    return jnp.moveaxis(x.reshape(x.shape[0], n, size), 1, 0)


def _q_blocks(q: jax.Array, kv: int, n: int, size: int) -> jax.Array:
    """q [B, T, N, H] -> [n, B*K, G*size, H] (each kv head's G query heads over a block)."""
    b, _, heads, h = q.shape
    g = heads // kv
    x = _pad_to(q, n * size).reshape(b, n, size, kv, g, h)
    return jnp.transpose(x, (1, 0, 3, 4, 2, 5)).reshape(n, b * kv, g * size, h)


def _q_unblocks(x: jax.Array, b: int, t: int, g: int) -> jax.Array:
    """[n, B*K, G*size, H] -> [B, T, N, H] (the inverse of _q_blocks)."""
    n, bkv, gs, h = x.shape
    kv, size = bkv // b, gs // g
    x = jnp.transpose(x.reshape(n, b, kv, g, size, h), (1, 0, 4, 2, 3, 5))
    return x.reshape(b, n * size, kv * g, h)[:, :t]


def _kv_blocks(x: jax.Array, n: int, size: int) -> jax.Array:
    """k or v [B, S, K, H] -> [n, B*K, size, H]."""
    b, _, kv, h = x.shape
    x = _pad_to(x, n * size).reshape(b, n, size, kv, h)
    return jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(n, b * kv, size, h)


def _kv_unblocks(x: jax.Array, b: int, s: int) -> jax.Array:
    """[n, B*K, size, H] -> [B, S, K, H] (the inverse of _kv_blocks)."""
    n, bkv, size, h = x.shape
    x = jnp.transpose(x.reshape(n, b, bkv // b, size, h), (1, 0, 3, 2, 4))
    return x.reshape(b, n * size, bkv // b, h)[:, :s]


def _row_stats(x: jax.Array, n: int, size: int) -> jax.Array:
    """Per-query statistics [B, T, N] -> [n, B*K, G*size] (the layout of _q_blocks); the
    caller reshapes N into (K, G) by passing x as [B, T, K, G]."""
    b, _, kv, g = x.shape
    x = _pad_to(x, n * size).reshape(b, n, size, kv, g)
    return jnp.transpose(x, (1, 0, 3, 4, 2)).reshape(n, b * kv, g * size)


class _QParts(NamedTuple):
    """The mask parts of the query blocks, each [n, B, bq] (or None)."""
    pos: jax.Array
    segments: jax.Array | None
    prefix: jax.Array | None


class _KParts(NamedTuple):
    """The mask parts of the key blocks, each [n, B, bk] (or None); valid always set, False
    on the padding that fills the last block."""
    pos: jax.Array
    valid: jax.Array
    segments: jax.Array | None
    prefix: jax.Array | None


def _mask_blocks(parts: MaskParts, nq: int, bq: int, nk: int, bk: int) -> tuple[_QParts, _KParts]:
    """Positions and segment ids repeat their last value into the padding (keeping each
    block's bounds tight); prefix flags and validity pad with False."""
    valid = parts.k_valid if parts.k_valid is not None else jnp.ones(parts.k_pos.shape, bool)
    qp = _QParts(_row_blocks(parts.q_pos, nq, bq, "edge"), _row_blocks(parts.q_segments, nq, bq, "edge"),
                 _row_blocks(parts.q_prefix, nq, bq))
    kp = _KParts(_row_blocks(parts.k_pos, nk, bk, "edge"), _row_blocks(valid, nk, bk),
                 _row_blocks(parts.k_segments, nk, bk, "edge"), _row_blocks(parts.k_prefix, nk, bk))
    return qp, kp


def _tied(qb: jax.Array, qp: _QParts, kp: _KParts) -> tuple[jax.Array, _QParts, _KParts]:
    """The mask parts, made to depend on the queries: under a scan over layers JAX hoists
    work that reads only loop constants (the positions) out of the loop, and would then
    keep every block's mask of the backward pass at once, [T, S] after all."""
    return jax.lax.optimization_barrier((qb, qp, kp))


def _needed(parts: MaskParts, qp: _QParts, kp: _KParts) -> jax.Array:
    """[nq, nk] bool: False where a block's mask is empty in every batch row, judged from
    the bounds of its positions and segment ids (sound for any ids: a True may still hold
    an empty block, a False never hides a visible key)."""
    def lo(x):  # the least of each query block, [nq, 1, B]
        return jnp.min(x, axis=-1)[:, None]

    def hi(x):
        return jnp.max(x, axis=-1)[:, None]

    def k_lo(x):  # the least over each key block's valid keys, [1, nk, B]
        return jnp.min(jnp.where(kp.valid, x, _FAR), axis=-1)[None]

    def k_hi(x):
        return jnp.max(jnp.where(kp.valid, x, -_FAR), axis=-1)[None]

    empty = ~jnp.any(kp.valid, axis=-1)[None]
    if qp.segments is not None and kp.segments is not None:
        empty = empty | (hi(qp.segments) < k_lo(kp.segments)) | (lo(qp.segments) > k_hi(kp.segments))
    if parts.causal:
        hidden = k_lo(kp.pos) > hi(qp.pos)
        if qp.prefix is not None:
            hidden = hidden & ~(jnp.any(qp.prefix, -1)[:, None] & jnp.any(kp.prefix & kp.valid, -1)[None])
        empty = empty | hidden
    far = (lo(qp.pos) - k_hi(kp.pos)) >= parts.window
    if not parts.causal:
        far = far | ((k_lo(kp.pos) - hi(qp.pos)) >= parts.window)
    return ~jnp.all(empty | far, axis=-1)


def _block_mask(parts: MaskParts, qp: _QParts, kp: _KParts, kv: int, g: int) -> jax.Array:
    """One block's mask from its parts ([B, bq] / [B, bk]) -> [B*K, G*bq, bk]."""
    m = parts.block(qp.pos, kp.pos, kp.valid, qp.segments, kp.segments, qp.prefix, kp.prefix)
    b, bq, bk = m.shape
    return jnp.broadcast_to(m[:, None, None], (b, kv, g, bq, bk)).reshape(b * kv, g * bq, bk)


def _scores(static: _Static, qi: jax.Array, kj: jax.Array, bias: PositionBias | None,
            qp: _QParts, kp: _KParts) -> tuple[jax.Array, jax.Array | None]:
    """Scores of a block [B*K, G*bq, bk] in fp32 after scale, soft-cap and bias; and
    tanh(scaled / softcap) for the backward (None without soft-capping)."""
    s = jnp.einsum("xqh,xch->xqc", qi, kj, preferred_element_type=jnp.float32) * static.scale
    tanh = None
    if static.softcap is not None:
        tanh = jnp.tanh(s / static.softcap)
        s = static.softcap * tanh
    if bias is not None:
        s = s + _bias_block(bias, qp.pos, kp.pos, s.shape)
    return s, tanh


def _bias_block(bias: PositionBias, q_pos: jax.Array, k_pos: jax.Array,
                shape: tuple[int, ...]) -> jax.Array:
    """The bias of a block [B, N, bq, bk] in the scores' layout `shape` [B*K, G*bq, bk]."""
    x = bias(q_pos, k_pos).astype(jnp.float32)
    b, n, bq, bk = x.shape
    kv = shape[0] // b
    return x.reshape(b * kv, (n // kv) * bq, bk)


# --- forward ------------------------------------------------------------------------------
def _forward(static: _Static, q: jax.Array, k: jax.Array, v: jax.Array, parts: MaskParts,
             bias: PositionBias | None, sinks: jax.Array | None):
    """-> (out [B, T, N, H], log-sum-exp [nq, B*K, G*bq]: +inf where a query sees no key
    and there are no sinks)."""
    b, t, n, _ = q.shape
    s_len, kv = k.shape[1], k.shape[2]
    g = n // kv
    bq, bk = static.block_q, static.block_k
    nq, nk = -(-t // bq), -(-s_len // bk)
    qb, kb, vb = _q_blocks(q, kv, nq, bq), _kv_blocks(k, nk, bk), _kv_blocks(v, nk, bk)
    qb, qp, kp = _tied(qb, *_mask_blocks(parts, nq, bq, nk, bk))
    need = _needed(parts, qp, kp)

    def q_block(xs):
        qi, qpi, need_i = xs

        def k_step(carry, ys):
            kj, vj, kpj, need_ij = ys

            def visit(carry):
                m, l, acc = carry
                s, _ = _scores(static, qi, kj, bias, qpi, kpj)
                mask = _block_mask(parts, qpi, kpj, kv, g)
                m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASKED), axis=-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                acc = alpha[..., None] * acc + jnp.einsum(
                    "xqc,xch->xqh", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, alpha * l + jnp.sum(p, axis=-1), acc

            return jax.lax.cond(need_ij, visit, lambda c: c, carry), None

        rows = qi.shape[:2]
        init = (jnp.full(rows, MASKED, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros((*rows, v.shape[-1]), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(k_step, init, (kb, vb, kp, need_i))
        return m, l, acc

    m, l, acc = jax.lax.map(q_block, (qb, qp, need))
    seen = l > 0
    if sinks is None:
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        mean_v = jnp.mean(v.astype(jnp.float32), axis=1)  # [B, K, H]: a query that sees nothing
        mean_v = mean_v.reshape(b * kv, 1, -1)
        out = jnp.where(seen[..., None], out, mean_v[None])
    else:
        sk = _sink_rows(sinks, b, kv, bq)
        top = jnp.maximum(m, sk)
        total = l * jnp.exp(m - top) + jnp.exp(sk - top)
        lse = top + jnp.log(total)
        out = acc * (jnp.exp(m - top) / total)[..., None]
    return _q_unblocks(out, b, t, g).astype(v.dtype), lse


def _sink_rows(sinks: jax.Array, b: int, kv: int, bq: int) -> jax.Array:
    """sinks [N] -> [1, B*K, G*bq] in the row layout of a query block."""
    g = sinks.shape[0] // kv
    s = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv, g, 1), (b, kv, g, bq))
    return s.reshape(1, b * kv, g * bq)


# --- backward -----------------------------------------------------------------------------
def _backward(static: _Static, res: tuple, dout: jax.Array):
    q, k, v, parts, bias, sinks, out, lse = res
    b, t, n, h = q.shape
    s_len, kv = k.shape[1], k.shape[2]
    g = n // kv
    bq, bk = static.block_q, static.block_k
    nq, nk = -(-t // bq), -(-s_len // bk)
    qb, kb, vb = _q_blocks(q, kv, nq, bq), _kv_blocks(k, nk, bk), _kv_blocks(v, nk, bk)
    dob = _q_blocks(dout, kv, nq, bq)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, N]
    delta = _row_stats(delta.reshape(b, t, kv, g), nq, bq)
    qb, qp, kp = _tied(qb, *_mask_blocks(parts, nq, bq, nk, bk))
    need = _needed(parts, qp, kp)
    table = None if bias is None else bias.table

    def k_block(carry, xs):
        dq, dtable = carry
        kj, vj, kpj, need_j = xs

        def q_step(c, ys):
            i, qi, doi, lse_i, delta_i, qpi, need_ij = ys

            def visit(c):
                dq, dk, dv, dtable = c
                s, tanh = _scores(static, qi, kj, bias, qpi, kpj)
                mask = _block_mask(parts, qpi, kpj, kv, g)
                p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
                dv = dv + jnp.einsum("xqc,xqh->xch", p.astype(doi.dtype), doi,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("xqh,xch->xqc", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None])  # d(scores after cap and bias)
                if table is not None:
                    dtable = dtable + _bias_table_grad(bias, qpi.pos, kpj.pos, ds)
                if tanh is not None:
                    ds = ds * (1.0 - tanh * tanh)
                ds = (ds * static.scale).astype(qi.dtype)
                dq = dq.at[i].add(jnp.einsum("xqc,xch->xqh", ds, kj, preferred_element_type=jnp.float32))
                dk = dk + jnp.einsum("xqc,xqh->xch", ds, qi, preferred_element_type=jnp.float32)
                return dq, dk, dv, dtable

            return jax.lax.cond(need_ij, visit, lambda c: c, c), None

        zeros = jnp.zeros(kj.shape[:2] + (h,), jnp.float32)
        zeros_v = jnp.zeros(vj.shape, jnp.float32)
        (dq, dk, dv, dtable), _ = jax.lax.scan(
            q_step, (dq, zeros, zeros_v, dtable), (jnp.arange(nq), qb, dob, lse, delta, qp, need_j))
        return (dq, dtable), (dk, dv)

    dtable0 = None if table is None else jnp.zeros(table.shape, jnp.float32)
    dq0 = jnp.zeros(qb.shape, jnp.float32)
    (dq, dtable), (dk, dv) = jax.lax.scan(k_block, (dq0, dtable0), (kb, vb, kp, need.T))
    dk, dv = _kv_unblocks(dk, b, s_len), _kv_unblocks(dv, b, s_len)
    dsinks = None
    if sinks is None:
        dv = dv + _unseen_value_grad(dout, lse, b, t, kv, g, s_len)
    else:
        p_sink = jnp.exp(_sink_rows(sinks, b, kv, bq) - lse)  # [nq, B*K, G*bq]
        dsinks = -jnp.sum((p_sink * delta).reshape(nq, b, kv, g, bq), axis=(0, 1, 4)).reshape(n)
        dsinks = dsinks.astype(sinks.dtype)
    dbias = None if table is None else dataclasses.replace(bias, table=dtable.astype(table.dtype))
    return (_q_unblocks(dq, b, t, g).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None, dbias, dsinks)


def _bias_table_grad(bias: PositionBias, q_pos: jax.Array, k_pos: jax.Array,
                     ds: jax.Array) -> jax.Array:
    """The gradient of a block's bias table from the scores' gradient ds [B*K, G*bq, bk]."""
    def block(table):
        return _bias_block(dataclasses.replace(bias, table=table), q_pos, k_pos, ds.shape)

    _, vjp = jax.vjp(block, bias.table)
    return vjp(ds)[0].astype(jnp.float32)


def _unseen_value_grad(dout: jax.Array, lse: jax.Array, b: int, t: int, kv: int, g: int,
                       s_len: int) -> jax.Array:
    """dv [B, S, K, H] of the queries that see no key (lse +inf, no sinks): each output the
    mean of every value, so each value gets 1/S of their output gradients."""
    unseen = jnp.isinf(lse).reshape(lse.shape[0], b, kv, g, -1)  # [nq, B, K, G, bq]
    unseen = jnp.transpose(unseen, (1, 0, 4, 2, 3)).reshape(b, -1, kv, g)[:, :t]  # [B, T, K, G]
    do = dout.astype(jnp.float32).reshape(b, t, kv, g, -1)
    total = jnp.sum(jnp.where(unseen[..., None], do, 0.0), axis=(1, 3))  # [B, K, H]
    return jnp.broadcast_to(total[:, None] / s_len, (b, s_len, kv, total.shape[-1]))


# --- the custom VJP -----------------------------------------------------------------------
def _attend_fwd(static, q, k, v, parts, bias, sinks):
    out, lse = _forward(static, q, k, v, parts, bias, sinks)
    return out, (q, k, v, parts, bias, sinks, out, lse)


def _attend_primal(static, q, k, v, parts, bias, sinks):
    return _forward(static, q, k, v, parts, bias, sinks)[0]


_attend = jax.custom_vjp(_attend_primal, nondiff_argnums=(0,))
_attend.defvjp(_attend_fwd, _backward)
