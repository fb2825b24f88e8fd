"""Logits processors that read the tokens a row has seen so far: repetition penalty,
no-repeat n-grams and a minimum number of new tokens. One implementation serves greedy,
sampling, beam search and contrastive search (`zoo.generate`), with the rules of transformers'
RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor and
MinNewTokensLengthLogitsProcessor, applied in that order (greedy and sampling: to the logits,
before temperature / top-k / top-p; beam search: to the log-probabilities).

The tokens seen are a fixed-size buffer, so every step has the same shapes inside the
decoding loop: `history` [R, P] (the prompt, left-aligned, -1 on padding; encdec: the decoder
start token) followed by `generated` [R, N], of which the first `count` are real.

Padding: -1 is no token, so only a prompt's real tokens count. transformers counts the pad
tokens of a left-padded decoder prompt in its n-grams (it reads input_ids as given) but skips
them for the repetition penalty; the two agree except where an n-gram runs through padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Penalties(NamedTuple):
    """Static settings (hashable, a jit static argument); the defaults change nothing.

    repetition_penalty: a seen token's logit is divided by it when positive, multiplied
    when negative (> 1 discourages repeats). no_repeat_ngram_size: n > 0 bans any token that
    would complete an n-gram already seen. min_new_tokens: the stop tokens are banned until
    this many tokens were generated."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0

    @property
    def active(self) -> bool:
        return self != Penalties()


def check(repetition_penalty: float | None, no_repeat_ngram_size: int | None,
          min_new_tokens: int | None, max_new_tokens: int) -> Penalties:
    """The Penalties of generate's keywords (None: off); ValueError naming a bad one."""
    if repetition_penalty is not None and not (
            isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty: expected a number > 0, got {repetition_penalty!r}")
    for name, value in (("no_repeat_ngram_size", no_repeat_ngram_size), ("min_new_tokens", min_new_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    if min_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise ValueError(f"min_new_tokens: {min_new_tokens} is more than max_new_tokens={max_new_tokens}")
    return Penalties(float(1.0 if repetition_penalty is None else repetition_penalty),
                     no_repeat_ngram_size or 0, min_new_tokens or 0)


def apply(scores: jax.Array, history: jax.Array, generated: jax.Array, count: jax.Array,
          p: Penalties, stop_tokens: tuple[int, ...]) -> jax.Array:
    """scores [R, V] for new token number `count` (0-based) -> processed scores [R, V].

    history: int [R, P], -1 on padding; generated: int [R, N], the first `count` real."""
    if not p.active:
        return scores
    seen = _seen(history, generated, count)
    if p.repetition_penalty != 1.0:
        penalised = jnp.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        scores = jnp.where(_one_hot_any(seen, scores.shape[-1]), penalised, scores)
    if p.no_repeat_ngram_size:
        banned = _ngram_bans(seen, history.shape[1] + count, p.no_repeat_ngram_size, scores.shape[-1])
        scores = jnp.where(banned, -jnp.inf, scores)
    if p.min_new_tokens and stop_tokens:
        stops = jnp.isin(jnp.arange(scores.shape[-1]), jnp.asarray(stop_tokens, jnp.int32))
        scores = jnp.where(stops & (count < p.min_new_tokens), -jnp.inf, scores)
    return scores


def _seen(history: jax.Array, generated: jax.Array, count: jax.Array) -> jax.Array:
    """[R, P + N]: history, then the first `count` generated tokens, -1 after them."""
    made = jnp.where(jnp.arange(generated.shape[1]) < count, generated, -1)
    return jnp.concatenate([history, made.astype(jnp.int32)], axis=1)


def _one_hot_any(ids: jax.Array, vocab: int) -> jax.Array:
    """ids int [R, L] (-1: none) -> bool [R, V], True on every id a row holds. A scatter into
    one spare column for the -1s, so no [R, L, V] one-hot is built."""
    rows = jnp.arange(ids.shape[0])[:, None]
    hit = jnp.zeros((ids.shape[0], vocab + 1), bool).at[rows, jnp.where(ids < 0, vocab, ids)].set(True)
    return hit[:, :vocab]


def _ngram_bans(seen: jax.Array, end: jax.Array, n: int, vocab: int) -> jax.Array:
    """bool [R, V]: tokens that would repeat an n-gram of seen[:, :end]. Every window of n
    seen tokens whose first n - 1 equal the last n - 1 seen bans its own last token (the
    window at the end itself holds a -1 there, which bans nothing)."""
    length = seen.shape[1]
    if n > length:
        return jnp.zeros((seen.shape[0], vocab), bool)
    suffix = jax.lax.dynamic_slice_in_dim(seen, jnp.maximum(end - (n - 1), 0), n - 1, axis=1)
    windows = seen[:, jnp.arange(length - n + 1)[:, None] + jnp.arange(n)]  # [R, W, n]
    match = jnp.all(windows[..., :-1] == suffix[:, None, :], axis=-1) & (end >= n)
    return _one_hot_any(jnp.where(match, windows[..., -1], -1), vocab)
