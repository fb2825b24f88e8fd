"""Beam search with length penalty and stop tokens, inside one `lax.while_loop`.

It follows Hugging Face's vectorised beam search (early_stopping=False), so both return the
same sequences on the same weights:

- each step scores every (beam, token) continuation by its summed log-probability (after
  the penalties of `zoo.logits`, applied to the log-probabilities, as transformers does) and keeps
  the best `max(2, 1 + #stop) * num_beams` candidates;
- a candidate that ends (stop token, or the last allowed token) and ranks among the first
  `num_beams` becomes a finished hypothesis scored `sum_logprob / length ** length_penalty`
  (length: tokens generated, the stop token included); the best `num_beams` are kept;
- the best `num_beams` candidates that did not end are the next beams (the cache rows are
  reordered to follow them);
- a prompt is done once `num_beams` hypotheses are finished and the best running beam,
  scored at its current length, cannot beat the worst of them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo import logits as processors
from zoo.config import Config
from zoo.decoding import Options, history, is_stop, new_cache, prefill, reach, step
from zoo.nn import cache as kv_cache

_DEAD = -1.0e9  # score of an impossible beam or an empty hypothesis slot


class Beams(NamedTuple):
    """Search state for B prompts, nb beams, N new tokens."""

    running: jax.Array  # [B, nb, N] tokens of the live beams
    running_scores: jax.Array  # [B, nb] summed log-probs
    finished: jax.Array  # [B, nb, N] finished hypotheses, best first
    finished_scores: jax.Array  # [B, nb] length-penalised scores (_DEAD: empty slot)
    finished_ok: jax.Array  # [B, nb] bool, slot holds a hypothesis
    open: jax.Array  # [B] bool, a running beam may still beat the finished ones
    all_ended: jax.Array  # [] bool, every candidate of the last step ended
    length: jax.Array  # [] int32, tokens generated so far


def _init(batch: int, nb: int, n: int, pad_id: int) -> Beams:
    empty = jnp.full((batch, nb, n), pad_id, jnp.int32)
    # Only beam 0 is live at first, so the first step does not pick one token nb times.
    scores = jnp.where(jnp.arange(nb) == 0, 0.0, _DEAD)
    return Beams(empty, jnp.broadcast_to(scores, (batch, nb)).astype(jnp.float32), empty,
                 jnp.full((batch, nb), _DEAD, jnp.float32), jnp.zeros((batch, nb), bool),
                 jnp.ones((batch,), bool), jnp.zeros((), bool), jnp.zeros((), jnp.int32))


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, M, ...], idx [B, J] -> [B, J, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _select(s: Beams, logits: jax.Array, seen: jax.Array, opts: Options) -> tuple[Beams, jax.Array]:
    """One step from logits [B * nb, V], seen: each beam's prompt [B * nb, P] (`history`).
    Returns (state, source row of each new beam [B * nb])."""
    b, nb, n = s.running.shape
    vocab = logits.shape[-1]
    g = s.length
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = processors.apply(logp, seen, s.running.reshape(b * nb, n), g, opts.penalties,
                            opts.stop_tokens).reshape(b, nb, vocab)
    flat = (logp + s.running_scores[:, :, None]).reshape(b, nb * vocab)
    k = min(max(2, 1 + len(opts.stop_tokens)) * nb, nb * vocab)
    cand_scores, cand_idx = jax.lax.top_k(flat, k)  # [B, K], best first
    cand_beam, cand_tok = cand_idx // vocab, (cand_idx % vocab).astype(jnp.int32)
    cand = _gather(s.running, cand_beam)
    cand = jax.lax.dynamic_update_slice_in_dim(cand, cand_tok[:, :, None], g, axis=2)
    ended = is_stop(cand_tok, opts.stop_tokens) | (g + 1 >= n)

    # Live beams: the best candidates that did not end.
    scores, pick = jax.lax.top_k(cand_scores + jnp.where(ended, _DEAD, 0.0), nb)
    running, source = _gather(cand, pick), _gather(cand_beam, pick)

    # Finished hypotheses: merge the top-nb candidates that ended with the kept ones.
    new_ok = ended & (jnp.arange(k) < nb)
    penalised = cand_scores / (g + 1).astype(jnp.float32) ** opts.length_penalty
    penalised = penalised + jnp.where(new_ok & s.open[:, None], 0.0, _DEAD)
    merged = jnp.concatenate([s.finished_scores, penalised], axis=1)
    fin_scores, keep = jax.lax.top_k(merged, nb)
    finished = _gather(jnp.concatenate([s.finished, cand], axis=1), keep)
    fin_ok = _gather(jnp.concatenate([s.finished_ok, new_ok], axis=1), keep)

    # Can a live beam still win? Its best hope is its score at the current length.
    best_live = scores[:, 0] / (g + 1).astype(jnp.float32) ** opts.length_penalty
    worst = jnp.where(fin_ok, jnp.min(fin_scores, axis=1, keepdims=True), _DEAD)
    still_open = s.open & jnp.any(best_live[:, None] > worst, axis=1)
    state = Beams(running, scores, finished, fin_scores, fin_ok, still_open,
                  jnp.all(ended), g + 1)
    rows = (jnp.arange(b)[:, None] * nb + source).reshape(-1)
    return state, rows


def beam_search(params: dict, cfg: Config, prompt: jax.Array, prompt_mask: jax.Array | None,
                opts: Options, start: jax.Array | None = None) -> jax.Array:
    """prompt [B, T] (start: an encdec decoder prompt [B, P]) -> best hypothesis per prompt
    [B, max_new_tokens], pad after its end."""
    batch, nb, n = prompt.shape[0], opts.num_beams, opts.max_new_tokens
    start_len = 1 if start is None else start.shape[1]
    cache = new_cache(cfg, batch, opts.cache_len or reach(cfg, prompt.shape[1], opts, start_len), opts)
    logits, cache = prefill(params, cfg, prompt, prompt_mask, cache, start)
    cache = kv_cache.repeat_rows(cache, nb)
    seen = jnp.repeat(history(cfg, prompt, prompt_mask, start), nb, axis=0)
    state, rows = _select(_init(batch, nb, n, opts.pad_id), jnp.repeat(logits, nb, axis=0), seen, opts)

    def cond(carry: tuple) -> jax.Array:
        s = carry[0]
        return (s.length < n) & jnp.any(s.open) & ~s.all_ended

    def body(carry: tuple) -> tuple:
        s, rows, cache = carry
        cache = kv_cache.take_rows(cache, rows)
        last = jax.lax.dynamic_slice_in_dim(s.running, s.length - 1, 1, axis=2).reshape(-1, 1)
        logits, cache = step(params, cfg, last, cache)
        s, rows = _select(s, logits[:, 0], seen, opts)
        return s, rows, cache

    state, _, _ = jax.lax.while_loop(cond, body, (state, rows, cache))
    return state.finished[:, 0]
