"""Decoder-only family (GPT-2, Llama, Mistral, Mixtral): causal LM.

embed -> scan(causal layer) -> final norm -> vocabulary head.
"""

from __future__ import annotations

import jax

from zoo.config import Config
from zoo.nn.backend import resolve
from zoo.nn.cache import Cache, advance
from zoo.nn.checks import check_mask, check_same_shape, check_tokens
from zoo.nn.embeddings import embed_spec, embed_tokens, head_spec, vocab_logits
from zoo.nn.output import Output
from zoo.nn.param import Spec
from zoo.nn.transformer import (StackCache, cached_context, cached_positions, default_positions,
                                embed_for_stack, run_stack, self_context, stack_spec)


def spec(cfg: Config) -> Spec:
    out = {"embed": embed_spec(cfg), "decoder": stack_spec(cfg, cfg.num_layers)}
    head = head_spec(cfg)
    if head:
        out["head"] = head
    return out


def forward(params: dict, cfg: Config, tokens: jax.Array, *, mask: jax.Array | None = None,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            prefix_mask: jax.Array | None = None, key: jax.Array | None = None,
            remat: bool | str = False, cache: Cache | None = None) -> Output:
    """Causal LM forward.

    tokens: int [B, T]; mask: bool [B, T], True on real tokens (left or right padding);
    positions: int [B, T] (default: 0.. over real tokens); segment_ids: int [B, T] for packed
    rows (tokens attend only within their segment); prefix_mask: bool [B, T], True on a
    bidirectional prefix (prefix LM); key: dropout RNG (None: no dropout).
    cache: a `zoo.nn.cache.Cache` (`zoo.init_cache`): tokens continue the cached rows
    (positions default to each row's cached length) and attend over the cache.
    Returns Output(logits [B, T, V], hidden [B, T, D], aux_loss, cache with the chunk added).
    """
    if cfg.family != "decoder":
        raise ValueError(f"zoo.decoder.forward: cfg.family must be 'decoder', got {cfg.family!r}")
    cfg = resolve(cfg, tokens)
    check_tokens("tokens", tokens, cfg)
    check_mask("mask", mask, "tokens", tokens)
    check_mask("prefix_mask", prefix_mask, "tokens", tokens)
    check_same_shape("positions", positions, "tokens", tokens)
    check_same_shape("segment_ids", segment_ids, "tokens", tokens)
    if cache is not None:
        if segment_ids is not None or prefix_mask is not None:
            raise ValueError("zoo.decoder.forward: segment_ids and prefix_mask do not combine with cache")
        hidden, aux, cache = cached_hidden(params, cfg, tokens, cache, mask=mask,
                                           positions=positions, key=key)
        return Output(logits=vocab_logits(params, hidden, cfg), hidden=hidden, aux_loss=aux, cache=cache)
    if positions is None:
        positions = default_positions(tokens, mask)
    keys = jax.random.split(key) if key is not None else (None, None)
    stack = params["decoder"]
    x = embed_for_stack(stack, embed_tokens(params["embed"], tokens, cfg), positions, cfg, keys[0])
    ctx = self_context(stack, cfg, positions, causal=True, valid=mask, segments=segment_ids,
                       prefix=prefix_mask)
    hidden, aux, _ = run_stack(stack, x, ctx, cfg, key=keys[1], remat=remat)
    return Output(logits=vocab_logits(params, hidden, cfg), hidden=hidden, aux_loss=aux)


def cached_hidden(params: dict, cfg: Config, tokens: jax.Array, cache: Cache, *,
                  mask: jax.Array | None = None, positions: jax.Array | None = None,
                  key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Cache]:
    """A chunk tokens [B, T] through the stack over `cache` -> (hidden [B, T, D] after the
    final norm, MoE loss, updated cache). Callers that need only some logits (decoding)
    project just those."""
    cfg = resolve(cfg)
    if cache.batch != tokens.shape[0]:
        raise ValueError(f"cache: batch {cache.batch} differs from tokens batch {tokens.shape[0]}")
    if positions is None:
        positions = cached_positions(cache, mask, tokens.shape[1])
    keys = jax.random.split(key) if key is not None else (None, None)
    stack = params["decoder"]
    x = embed_for_stack(stack, embed_tokens(params["embed"], tokens, cfg), positions, cfg, keys[0])
    ctx, slots = cached_context(stack, cfg, positions, mask, cache)
    hidden, aux, layers = run_stack(stack, x, ctx, cfg, key=keys[1], cache=StackCache(cache.kv))
    return hidden, aux, advance(cache, layers.kv, slots, tokens.shape[1], mask)
