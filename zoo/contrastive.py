"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation"),
inside one `lax.while_loop`.

Each step takes the top_k most probable next tokens, feeds all of them (the cache's rows
repeated top_k times) to get each candidate's last hidden state h_v, and keeps

    argmax_v  (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j)

over the hidden states h_j of every real token before it (prompt and new tokens). The
candidate's step already computed the next logits and cache rows, so the chosen ones carry
on. The penalties of `zoo.logits` apply to the logits before the top_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo import logits as processors
from zoo.config import Config
from zoo.decoding import (Options, history, is_stop, logits, new_cache, prefill_hidden, reach,
                          step_hidden)
from zoo.nn import cache as kv_cache
from zoo.sampling import argmax


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def scores(probs: jax.Array, candidates: jax.Array, context: jax.Array, valid: jax.Array,
           alpha: float) -> jax.Array:
    """probs [B, K] of the candidates, their hidden states [B, K, D], the context's [B, L, D]
    (valid bool [B, L]) -> contrastive scores [B, K]."""
    cosine = jnp.einsum("bkd,bld->bkl", _unit(candidates), _unit(context))
    degeneration = jnp.max(jnp.where(valid[:, None, :], cosine, -jnp.inf), axis=-1)
    return (1.0 - alpha) * probs - alpha * degeneration


def contrastive(params: dict, cfg: Config, prompt: jax.Array, prompt_mask: jax.Array | None,
                opts: Options, start: jax.Array | None = None) -> jax.Array:
    """prompt [B, T] (start: an encdec decoder prompt [B, P]) -> new tokens
    [B, max_new_tokens] (pad after a stop token)."""
    batch, n, k = prompt.shape[0], opts.max_new_tokens, opts.contrastive_k
    start_len = 1 if start is None else start.shape[1]
    cache = new_cache(cfg, batch, opts.cache_len or reach(cfg, prompt.shape[1], opts, start_len), opts)
    hidden, mask, cache = prefill_hidden(params, cfg, prompt, prompt_mask, cache, start)
    seen = history(cfg, prompt, prompt_mask, start)
    width = hidden.shape[1]
    mask = jnp.ones(hidden.shape[:2], bool) if mask is None else mask
    context = jnp.concatenate([hidden, jnp.zeros((batch, n, hidden.shape[-1]), hidden.dtype)], axis=1)
    valid = jnp.concatenate([mask, jnp.zeros((batch, n), bool)], axis=1)
    out = jnp.full((batch, n), opts.pad_id, jnp.int32)
    rows = jnp.arange(batch)

    def cond(carry: tuple) -> jax.Array:
        i, _, done = carry[:3]
        return (i < n) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, out, done, cache, next_logits, context, valid = carry
        next_logits = processors.apply(next_logits, seen, out, i, opts.penalties, opts.stop_tokens)
        top_probs, top_ids = jax.lax.top_k(jax.nn.softmax(next_logits, axis=-1), k)  # [B, K]
        h, cand_cache = step_hidden(params, cfg, top_ids.reshape(batch * k, 1),
                                    kv_cache.repeat_rows(cache, k))
        h = h.reshape(batch, k, -1)
        best = argmax(scores(top_probs, h, context, valid, opts.penalty_alpha))  # [B]
        chosen = rows * k + best
        token = jnp.where(done, opts.pad_id, top_ids[rows, best])
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        context = jax.lax.dynamic_update_slice_in_dim(context, h[rows, best][:, None], width + i, axis=1)
        valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((batch, 1), bool), width + i, axis=1)
        cache = kv_cache.take_rows(cand_cache, chosen)
        next_logits = logits(params, cfg, h.reshape(batch * k, 1, -1)[chosen])[:, 0]
        return i + 1, out, done | is_stop(token, opts.stop_tokens), cache, next_logits, context, valid

    first = logits(params, cfg, hidden[:, -1:])[:, 0]
    start = (jnp.zeros((), jnp.int32), out, jnp.zeros((batch,), bool), cache, first, context, valid)
    return jax.lax.while_loop(cond, body, start)[1]
