"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one
forward of k + 1 tokens, inside one `lax.while_loop`.

Acceptance is the standard rule (Leviathan et al. 2023; Chen et al. 2023): draft token d
proposed with draft probability q(d) is kept with probability min(1, p(d) / q(d)) under the
target's p; at the first rejection the token is drawn from normalize(max(0, p - q)), and when
all k are kept a bonus token is drawn from p. Every emitted token then follows the target's
distribution (after temperature / top-k / top-p, applied to both models). Greedy keeps a draft
token when it equals the target's argmax, so the output is the target's greedy output.

A batch advances by the fewest tokens any unfinished row accepted this round (m): rows that
accepted more keep their first m + 1 tokens, which are still tokens of the rule above (the
cut depends only on other rows and on this row's own earlier decisions), so the caches of all
rows stay aligned and rewind together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.decoding import Options, is_stop, new_cache, pad_after_stop, prefill, reach, step
from zoo.nn import cache as kv_cache
from zoo.sampling import Sampler, argmax, choose, probs


def _propose(draft_params: dict, draft_cfg: Config, last: jax.Array, cache: kv_cache.Cache,
             key: jax.Array, k: int, s: Sampler) -> tuple[jax.Array, jax.Array, kv_cache.Cache]:
    """k draft tokens after last [B] -> (tokens [B, k], their distributions [B, k, V], cache).

    The draft runs k + 1 steps so its cache also holds the k-th token."""

    def one(carry: tuple, step_key: jax.Array) -> tuple[tuple, tuple]:
        x, cache = carry
        logits, cache = step(draft_params, draft_cfg, x[:, None], cache)
        token = choose(logits[:, 0], s, step_key)
        return (token, cache), (token, probs(logits[:, 0], s))

    (_, cache), (tokens, dists) = jax.lax.scan(one, (last, cache), jax.random.split(key, k + 1))
    return tokens[:k].T, jnp.moveaxis(dists[:k], 0, 1), cache


def _accepted(drafts: jax.Array, draft_probs: jax.Array, target_logits: jax.Array,
              key: jax.Array, s: Sampler) -> jax.Array:
    """How many leading draft tokens each row keeps, [B] in 0..k."""
    if s.greedy:
        keep = drafts == argmax(target_logits[:, :-1])
    else:
        p = jnp.take_along_axis(probs(target_logits[:, :-1], s), drafts[..., None], axis=-1)[..., 0]
        q = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
        keep = jax.random.uniform(key, drafts.shape) * q < p  # u < p / q, q > 0 (d was drawn)
    return jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)


def _next_token(drafts: jax.Array, draft_probs: jax.Array, target_logits: jax.Array,
                accepted: jax.Array, m: jax.Array, key: jax.Array, s: Sampler) -> jax.Array:
    """Token [B] at index m of the round: the kept draft token where a row accepted more than
    m, else a draw from the residual max(0, p - q) (from p itself after k accepted)."""
    logits_m = jax.lax.dynamic_index_in_dim(target_logits, m, axis=1, keepdims=False)
    if s.greedy:
        return argmax(logits_m)
    b, k, vocab = draft_probs.shape
    q_all = jnp.concatenate([draft_probs, jnp.zeros((b, 1, vocab), draft_probs.dtype)], axis=1)
    p_m = probs(logits_m, s)
    residual = jnp.maximum(p_m - jax.lax.dynamic_index_in_dim(q_all, m, axis=1, keepdims=False), 0.0)
    # p == q leaves nothing: rejection then had probability 0, p is a safe stand-in.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_m)
    drawn = jax.random.categorical(key, jnp.log(residual), axis=-1).astype(jnp.int32)
    padded = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    kept = jax.lax.dynamic_index_in_dim(padded, m, axis=1, keepdims=False)
    return jnp.where(accepted > m, kept, drawn)


def speculative(params: dict, cfg: Config, draft_params: dict, draft_cfg: Config,
                prompt: jax.Array, prompt_mask: jax.Array | None, key: jax.Array,
                opts: Options, start: jax.Array | None = None) -> jax.Array:
    """prompt [B, T] (start: an encdec decoder prompt [B, P]) -> new tokens
    [B, max_new_tokens] (pad after a stop token)."""
    batch, n, k, s = prompt.shape[0], opts.max_new_tokens, opts.num_speculative, opts.sampler
    length = opts.cache_len or reach(cfg, prompt.shape[1], opts, 1 if start is None else start.shape[1])
    logits, target_cache = prefill(params, cfg, prompt, prompt_mask, new_cache(cfg, batch, length, opts), start)
    _, draft_cache = prefill(draft_params, draft_cfg, prompt, prompt_mask,
                             new_cache(draft_cfg, batch, length, opts), start)
    key, first_key = jax.random.split(key)
    first = choose(logits, s, first_key)
    # k + 1 spare columns: every round writes a whole block, of which m + 1 tokens count.
    out = jnp.full((batch, n + k + 1), opts.pad_id, jnp.int32).at[:, 0].set(first)
    start = (jnp.ones((), jnp.int32), out, is_stop(first, opts.stop_tokens), first,
             target_cache, draft_cache, key)

    def cond(carry: tuple) -> jax.Array:
        count, _, done = carry[:3]
        return (count < n) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        count, out, done, last, target_cache, draft_cache, key = carry
        key, k_draft, k_accept, k_draw = jax.random.split(key, 4)
        drafts, draft_probs, draft_cache = _propose(draft_params, draft_cfg, last, draft_cache,
                                                    k_draft, k, s)
        chunk = jnp.concatenate([last[:, None], drafts], axis=1)
        target_logits, target_cache = step(params, cfg, chunk, target_cache)
        accepted = jnp.where(done, k, _accepted(drafts, draft_probs, target_logits, k_accept, s))
        m = jnp.min(accepted)
        token = _next_token(drafts, draft_probs, target_logits, accepted, m, k_draw, s)
        block = jnp.concatenate([drafts, token[:, None]], axis=1)
        block = jnp.where(jnp.arange(k + 1) == m, token[:, None], block)
        block = jnp.where(done[:, None], opts.pad_id, block)
        out = jax.lax.dynamic_update_slice_in_dim(out, block, count, axis=1)
        emitted = jnp.arange(k + 1) <= m
        done = done | jnp.any(is_stop(block, opts.stop_tokens) & emitted, axis=1)
        target_cache = kv_cache.rewind(target_cache, k - m)
        draft_cache = kv_cache.rewind(draft_cache, k - m)
        return count + m + 1, out, done, token, target_cache, draft_cache, key

    count, out, *_ = jax.lax.while_loop(cond, body, start)
    out = jnp.where(jnp.arange(n + k + 1) < count, out, opts.pad_id)[:, :n]
    return pad_after_stop(out, opts.stop_tokens, opts.pad_id)
