"""Decoder-only family (GPT-2, Llama, Mistral, Mixtral): causal LM.

embed -> scan(causal layer) -> final norm -> vocabulary head.
"""

from __future__ import annotations

import jax

from zoo.config import Config
from zoo.nn.checks import check_mask, check_same_shape, check_tokens
from zoo.nn.embeddings import embed_spec, embed_tokens, head_spec, vocab_logits
from zoo.nn.output import Output
from zoo.nn.param import Spec
from zoo.nn.transformer import default_positions, embed_for_stack, run_stack, self_context, stack_spec


def spec(cfg: Config) -> Spec:
    out = {"embed": embed_spec(cfg), "decoder": stack_spec(cfg, cfg.num_layers)}
    head = head_spec(cfg)
    if head:
        out["head"] = head
    return out


def forward(params: dict, cfg: Config, tokens: jax.Array, *, mask: jax.Array | None = None,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            prefix_mask: jax.Array | None = None, key: jax.Array | None = None,
            remat: bool = False) -> Output:
    """Causal LM forward.

    tokens: int [B, T]; mask: bool [B, T], True on real tokens (left or right padding);
    positions: int [B, T] (default: 0.. over real tokens); segment_ids: int [B, T] for packed
    rows (tokens attend only within their segment); prefix_mask: bool [B, T], True on a
    bidirectional prefix (prefix LM); key: dropout RNG (None: no dropout).
    Returns Output(logits [B, T, V], hidden [B, T, D], aux_loss).
    """
    if cfg.family != "decoder":
        raise ValueError(f"zoo.decoder.forward: cfg.family must be 'decoder', got {cfg.family!r}")
    check_tokens("tokens", tokens, cfg)
    check_mask("mask", mask, "tokens", tokens)
    check_mask("prefix_mask", prefix_mask, "tokens", tokens)
    check_same_shape("positions", positions, "tokens", tokens)
    check_same_shape("segment_ids", segment_ids, "tokens", tokens)
    if positions is None:
        positions = default_positions(tokens, mask)
    keys = jax.random.split(key) if key is not None else (None, None)
    stack = params["decoder"]
    x = embed_for_stack(stack, embed_tokens(params["embed"], tokens, cfg), positions, cfg, keys[0])
    ctx = self_context(stack, cfg, positions, causal=True, valid=mask, segments=segment_ids,
                       prefix=prefix_mask)
    hidden, aux = run_stack(stack, x, ctx, cfg, key=keys[1], remat=remat)
    return Output(logits=vocab_logits(params, hidden, cfg), hidden=hidden, aux_loss=aux)
