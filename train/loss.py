"""Cross-entropy statistics from logits, whole or in sequence chunks.

`from_logits` reads [B, T, V] logits. `chunked` never holds them: it runs the vocabulary
projection one [B, C] slice of the sequence at a time and computes the objective's gradient
on the way (a custom VJP), so the largest activation of a large-vocabulary model, and its
gradient, are [B, C, V] instead of [B, T, V]. Both return the same sums:
ce (weighted cross entropy), z (weighted logsumexp^2), correct (weighted targets at the
max logit) and objective = ce + z_loss * z, the only one `chunked` differentiates.
With label smoothing s the objective's cross entropy is taken against (1 - s) * onehot + s / V
(optax.smooth_labels, PyTorch's label_smoothing) while `ce` stays the plain one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Sums = dict[str, jax.Array]
LogitsFn = Callable[[Any, jax.Array], jax.Array]  # (head params, hidden [B, C, D]) -> [B, C, V]


def _stats(logits: jax.Array, targets: jax.Array, w: jax.Array, z_loss: float, smoothing: float = 0.0
           ) -> tuple[Sums, jax.Array, jax.Array]:
    """Sums of fp32 logits [..., V]; also the softmax's unnormalised exp and lse [...]."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    ex = jnp.exp(logits - top[..., None])
    lse = top + jnp.log(jnp.sum(ex, axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce, z = jnp.sum((lse - target_logit) * w), jnp.sum(jnp.square(lse) * w)
    # One max pass serves both the stable logsumexp and accuracy (a target at the max counts
    # as correct).
    correct = jnp.sum((target_logit >= top).astype(jnp.float32) * w)
    smoothed = ce
    if smoothing:  # the uniform target's cross entropy is lse - mean(logits)
        uniform = jnp.sum((lse - jnp.mean(logits, axis=-1)) * w)
        smoothed = (1 - smoothing) * ce + smoothing * uniform
    return {"ce": ce, "z": z, "correct": correct, "objective": smoothed + z_loss * z}, ex, lse


def from_logits(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                z_loss: float = 0.0, label_smoothing: float = 0.0) -> Sums:
    """logits [B, T, V] (any float dtype; reduced in fp32), targets int [B, T], weights [B, T]."""
    return _stats(logits.astype(jnp.float32), targets, weights.astype(jnp.float32), z_loss, label_smoothing)[0]


def chunked(logits_fn: LogitsFn, head: Any, hidden: jax.Array, targets: jax.Array,
            weights: jax.Array, z_loss: float, chunk: int, label_smoothing: float = 0.0) -> Sums:
    """The sums of `from_logits(logits_fn(head, hidden), ...)` over sequence chunks of
    `chunk` positions. hidden [B, T, D] with T a multiple of chunk; `head` is the pytree of
    parameters logits_fn reads. Only `objective` carries gradients (to head and hidden)."""
    b, t = targets.shape
    if chunk < 1 or t % chunk:
        raise ValueError(f"loss chunk {chunk} must be a positive divisor of the sequence length {t}")

    def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [T/C, B, C, ...]; B stays sharded
        return jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)

    sums = _chunked(logits_fn, (float(z_loss), float(label_smoothing)), head, split(hidden), split(targets),
                    split(weights.astype(jnp.float32)))
    return {**{k: jax.lax.stop_gradient(v) for k, v in sums.items()}, "objective": sums["objective"]}


def _scan(logits_fn: LogitsFn, terms: tuple[float, float], head: Any, hidden: jax.Array, targets: jax.Array,
          w: jax.Array, with_grads: bool) -> tuple[Sums, Any]:
    """Sums over the chunks [N, B, C, ...]; with_grads: also d objective / d (head, hidden).
    terms: (z_loss, label smoothing)."""
    z_loss, smoothing = terms
    zero = jnp.zeros((), jnp.float32)
    init = {k: zero for k in ("ce", "z", "correct", "objective")}

    def body(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array | None]:
        sums, d_head = carry
        h, tg, wc = xs
        if not with_grads:
            s, _, _ = _stats(logits_fn(head, h).astype(jnp.float32), tg, wc, z_loss, smoothing)
            return (jax.tree.map(jnp.add, sums, s), d_head), None
        logits, pullback = jax.vjp(logits_fn, head, h)
        s, ex, lse = _stats(logits.astype(jnp.float32), tg, wc, z_loss, smoothing)
        # d objective / d logits = w * (softmax * (1 + 2 z_loss lse) - target distribution),
        # the target distribution being (1 - smoothing) * onehot + smoothing / V
        probs = ex / jnp.sum(ex, axis=-1, keepdims=True)
        onehot = tg[..., None] == jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        target = (1 - smoothing) * onehot + smoothing / logits.shape[-1] if smoothing else onehot
        d_logits = wc[..., None] * (probs * (1 + 2 * z_loss * lse)[..., None] - target)
        dh_head, dh = pullback(d_logits.astype(logits.dtype))
        return (jax.tree.map(jnp.add, sums, s), jax.tree.map(jnp.add, d_head, dh_head)), dh

    d_head0 = jax.tree.map(jnp.zeros_like, head) if with_grads else None
    (sums, d_head), d_hidden = jax.lax.scan(body, (init, d_head0), (hidden, targets, w))
    return sums, (d_head, d_hidden)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(logits_fn: LogitsFn, terms: tuple[float, float], head: Any, hidden: jax.Array,
             targets: jax.Array, w: jax.Array) -> Sums:
    return _scan(logits_fn, terms, head, hidden, targets, w, with_grads=False)[0]


def _chunked_fwd(logits_fn: LogitsFn, terms: tuple[float, float], head: Any, hidden: jax.Array,
                 targets: jax.Array, w: jax.Array) -> tuple[Sums, Any]:
    # The gradient is computed here, with the logits of each chunk still at hand: the
    # backward pass then only scales it, and no chunk's logits are recomputed or stored.
    return _scan(logits_fn, terms, head, hidden, targets, w, with_grads=True)


def _chunked_bwd(logits_fn: LogitsFn, terms: tuple[float, float], grads: Any, g: Sums) -> tuple:
    d_head, d_hidden = grads
    scale = g["objective"]
    return (jax.tree.map(lambda x: (x * scale).astype(x.dtype), d_head),
            (d_hidden * scale).astype(d_hidden.dtype), None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
