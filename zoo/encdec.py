"""Encoder-decoder family (T5, BART): bidirectional encoder, causal decoder with
cross-attention, shared token embeddings.

src -> embed -> scan(encoder layer) -> norm = memory
tgt -> embed -> scan(causal layer + cross-attention over memory) -> norm -> head
"""

from __future__ import annotations

import jax

from zoo.config import Config
from zoo.nn.checks import check_mask, check_tokens
from zoo.nn.embeddings import embed_spec, embed_tokens, head_spec, vocab_logits
from zoo.nn.output import Output
from zoo.nn.param import Spec
from zoo.nn.transformer import (cross_context, default_positions, embed_for_stack, run_stack,
                                self_context, stack_spec)


def spec(cfg: Config) -> Spec:
    out = {"embed": embed_spec(cfg), "encoder": stack_spec(cfg, cfg.num_layers),
           "decoder": stack_spec(cfg, cfg.decoder_layers, cross=True)}
    head = head_spec(cfg)
    if head:
        out["head"] = head
    return out


def encode(params: dict, cfg: Config, src: jax.Array, src_mask: jax.Array | None = None,
           key: jax.Array | None = None, remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """src int [B, S] -> (memory [B, S, D], MoE balance loss)."""
    check_tokens("src", src, cfg)
    check_mask("src_mask", src_mask, "src", src)
    keys = jax.random.split(key) if key is not None else (None, None)
    positions = default_positions(src, None)
    stack = params["encoder"]
    x = embed_for_stack(stack, embed_tokens(params["embed"], src, cfg), positions, cfg, keys[0])
    ctx = self_context(stack, cfg, positions, causal=False, valid=src_mask)
    return run_stack(stack, x, ctx, cfg, key=keys[1], remat=remat)


def decode(params: dict, cfg: Config, memory: jax.Array, tgt: jax.Array,
           src_mask: jax.Array | None = None, tgt_mask: jax.Array | None = None,
           key: jax.Array | None = None, remat: bool = False) -> Output:
    """Decoder over tgt int [B, T] attending to memory [B, S, D] -> Output(logits [B, T, V])."""
    check_tokens("tgt", tgt, cfg)
    check_mask("tgt_mask", tgt_mask, "tgt", tgt)
    keys = jax.random.split(key) if key is not None else (None, None)
    positions = default_positions(tgt, None)
    stack = params["decoder"]
    x = embed_for_stack(stack, embed_tokens(params["embed"], tgt, cfg), positions, cfg, keys[0])
    ctx = self_context(stack, cfg, positions, causal=True, valid=tgt_mask)
    cross = cross_context(positions, src_mask, memory.shape[1])
    hidden, aux = run_stack(stack, x, ctx, cfg, memory=memory, cross_ctx=cross, key=keys[1], remat=remat)
    return Output(logits=vocab_logits(params, hidden, cfg), hidden=hidden, aux_loss=aux)


def forward(params: dict, cfg: Config, src: jax.Array, tgt: jax.Array, *,
            src_mask: jax.Array | None = None, tgt_mask: jax.Array | None = None,
            key: jax.Array | None = None, remat: bool = False) -> Output:
    """Sequence-to-sequence forward.

    src: int [B, S] encoder tokens, src_mask: bool [B, S]; tgt: int [B, T] decoder inputs
    (already shifted right), tgt_mask: bool [B, T]; key: dropout RNG.
    Returns Output(logits [B, T, V], hidden [B, T, D], encoder_hidden [B, S, D], aux_loss).
    """
    if cfg.family != "encdec":
        raise ValueError(f"zoo.encdec.forward: cfg.family must be 'encdec', got {cfg.family!r}")
    if getattr(src, "ndim", 2) == 2 and getattr(tgt, "ndim", 2) == 2 and src.shape[0] != tgt.shape[0]:
        raise ValueError(f"tgt: batch {tgt.shape[0]} differs from src batch {src.shape[0]}")
    keys = jax.random.split(key) if key is not None else (None, None)
    memory, enc_aux = encode(params, cfg, src, src_mask, keys[0], remat)
    out = decode(params, cfg, memory, tgt, src_mask, tgt_mask, keys[1], remat)
    return out._replace(encoder_hidden=memory, aux_loss=(enc_aux + out.aux_loss) / 2)
