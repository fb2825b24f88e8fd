"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p
(nucleus), min-p and typical sampling, applied in that order (as Hugging Face's warpers do).

`Sampler` is static data (hashable, a valid jit static argument). Every function works on
logits [..., V] and keeps them in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


class Sampler(NamedTuple):
    """greedy=True: argmax (the other fields are unused). Otherwise sample from
    softmax(logits / temperature), restricted to the top_k tokens (0: all), then to the
    smallest set whose probability reaches top_p (1.0: all), then to the tokens at least
    min_p times as probable as the best (0.0: all), then to the locally typical set of
    mass typical_p (1.0: all)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0


def check(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None = None,
          typical_p: float | None = None) -> None:
    """Raises ValueError naming the first bad sampling argument."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k: expected an int >= 1 (or None), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a number in (0, 1] (or None), got {top_p!r}")
    for name, value in (("min_p", min_p), ("typical_p", typical_p)):
        if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
            raise ValueError(f"{name}: expected a number in (0, 1] (or None), got {value!r}")


def process(logits: jax.Array, s: Sampler) -> jax.Array:
    """logits [..., V] -> fp32 logits whose softmax is the sampling distribution (tokens
    outside top-k / top-p at -inf). Greedy: the raw logits."""
    logits = logits.astype(jnp.float32)
    if s.greedy:
        return logits
    logits = logits / s.temperature
    vocab = logits.shape[-1]
    if 0 < s.top_k < vocab:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if s.top_p < 1.0:
        logits = _top_p(logits, s.top_p)
    if s.min_p > 0.0:
        logits = _min_p(logits, s.min_p)
    if s.typical_p < 1.0:
        logits = _typical(logits, s.typical_p)
    return logits


def _top_p(logits: jax.Array, top_p: float) -> jax.Array:
    """Keeps the most probable tokens until their probability reaches top_p (at least one):
    a token stays when the tokens ranked above it hold less than top_p."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better tokens
    keep_sorted = before < top_p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, _NEG_INF)


def _min_p(logits: jax.Array, min_p: float) -> jax.Array:
    """Keeps the tokens whose probability is at least min_p times the best one's (the best
    always stays)."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), _NEG_INF, logits)


def _typical(logits: jax.Array, mass: float) -> jax.Array:
    """Locally typical sampling (Meister et al. 2022): rank tokens by how far their surprisal
    -log p is from the entropy H, closest first, and keep them until their probability
    reaches `mass`. As transformers' TypicalLogitsWarper: the cut is at the first rank whose
    running mass reaches `mass`, and every token as close to H as that one stays (ties)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1, keepdims=True)
    distance = jnp.abs(-logp - entropy)  # inf for tokens already removed
    order = jnp.argsort(distance, axis=-1, stable=True)
    sorted_distance = jnp.take_along_axis(distance, order, axis=-1)
    running = jnp.cumsum(jnp.take_along_axis(p, order, axis=-1), axis=-1)
    cut = jnp.minimum(jnp.sum(running < mass, axis=-1, keepdims=True), logits.shape[-1] - 1)
    threshold = jnp.take_along_axis(sorted_distance, cut, axis=-1)
    return jnp.where(distance > threshold, _NEG_INF, logits)


def argmax(logits: jax.Array) -> jax.Array:
    """logits [..., V] -> int32 [...]: the first index of the largest value (of the first NaN,
    if any), as `jnp.argmax`. Written as two plain reductions (the maximum, then the smallest
    index holding it) because XLA's CPU backend runs argmax's paired value-and-index
    reduction unvectorized (measured in bench/RESULTS.md, decoding, session 6)."""
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN if any is NaN
    hit = (logits == top) | jnp.isnan(logits)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def choose(logits: jax.Array, s: Sampler, key: jax.Array | None) -> jax.Array:
    """logits [..., V] -> token ids [...] int32: argmax, or a sample of process(logits)."""
    if s.greedy:
        return argmax(logits)
    return jax.random.categorical(key, process(logits, s), axis=-1).astype(jnp.int32)


def probs(logits: jax.Array, s: Sampler) -> jax.Array:
    """The distribution `choose` draws from, [..., V] fp32 (greedy: one-hot argmax)."""
    if s.greedy:
        return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(process(logits, s), axis=-1)
