"""Encoder-only family (BERT, RoBERTa): bidirectional attention, MLM head, pooler.

embed (+ types, positions, norm) -> scan(bidirectional layer) -> MLM head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo import encdec
from zoo.config import Config
from zoo.nn.backend import resolve
from zoo.nn.checks import check_mask, check_same_shape, check_tokens
from zoo.nn.embeddings import embed_spec, embed_tokens, head_spec, vocab_logits
from zoo.nn.mlp import activation, dense, dense_spec
from zoo.nn.norms import apply_norm, norm_spec
from zoo.nn.output import Output
from zoo.nn.param import Spec, init_std
from zoo.nn.transformer import default_positions, embed_for_stack, run_stack, self_context, stack_spec


def spec(cfg: Config) -> Spec:
    out = {"embed": embed_spec(cfg), "encoder": stack_spec(cfg, cfg.num_layers)}
    dense_std = init_std(cfg, "dense", cfg.d_model)
    if cfg.mlm_transform:
        # The transform's dense has a bias where the MLPs have one (BERT yes, ModernBERT no).
        # ... and maps back to the embedding width (ALBERT: D -> E).
        out["mlm"] = {"dense": dense_spec(cfg.d_model, cfg.embed_size, ("embed", "mlp"), bias=cfg.mlp_bias,
                                          std=dense_std),
                      "norm": norm_spec(cfg, cfg.embed_size)}
    head = head_spec(cfg)
    if head:
        out["head"] = head
    if cfg.pooler:
        out["pooler"] = dense_spec(cfg.d_model, cfg.d_model, ("embed", "mlp"), std=dense_std)
    return out


def mlm_logits(params: dict, hidden: jax.Array, cfg: Config) -> jax.Array | None:
    """hidden [B, T, D] -> MLM logits [B, T, V] (BERT: dense, act, norm, tied projection;
    ALBERT's dense maps D to its embedding width E). None for a model whose embeddings are
    narrower than D and that has no MLM head to map back (a bare ALBERT body)."""
    if "mlm" in params:
        h = activation(cfg.activation)(dense(hidden, params["mlm"]["dense"], cfg.matmul))
        hidden = apply_norm(params["mlm"]["norm"], h, cfg)
    elif cfg.embed_size != cfg.d_model:
        return None
    return vocab_logits(params, hidden, cfg)


def forward(params: dict, cfg: Config, tokens: jax.Array, *, mask: jax.Array | None = None,
            token_types: jax.Array | None = None, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, key: jax.Array | None = None,
            remat: bool | str = False) -> Output:
    """Bidirectional encoder forward.

    tokens: int [B, T]; mask: bool [B, T], True on real tokens; token_types: int [B, T]
    (BERT segment A/B); segment_ids: int [B, T] for packed rows; key: dropout RNG.
    Returns Output(logits [B, T, V] MLM (see `mlm_logits`), hidden [B, T, D], pooled [B, D]
    with a pooler).
    """
    if cfg.family != "encoder":
        raise ValueError(f"zoo.encoder.forward: cfg.family must be 'encoder', got {cfg.family!r}")
    cfg = resolve(cfg, tokens)
    check_tokens("tokens", tokens, cfg)
    check_mask("mask", mask, "tokens", tokens)
    check_same_shape("token_types", token_types, "tokens", tokens)
    check_same_shape("positions", positions, "tokens", tokens)
    check_same_shape("segment_ids", segment_ids, "tokens", tokens)
    if positions is None:
        positions = default_positions(tokens, None)
    keys = jax.random.split(key) if key is not None else (None, None)
    stack = params["encoder"]
    x = embed_tokens(params["embed"], tokens, cfg, token_types)
    x = embed_for_stack(stack, x, positions, cfg, keys[0])
    ctx = self_context(stack, cfg, positions, causal=False, valid=mask, segments=segment_ids)
    hidden, aux, _ = run_stack(stack, x, ctx, cfg, key=keys[1], remat=remat)
    pooled = jnp.tanh(dense(hidden[:, 0], params["pooler"], cfg.matmul)) if cfg.pooler else None
    return Output(logits=mlm_logits(params, hidden, cfg), hidden=hidden, aux_loss=aux, pooled=pooled)


POOLINGS = ("mean", "cls")


def pool(hidden: jax.Array, mask: jax.Array | None, pooling: str = "mean") -> jax.Array:
    """hidden [B, T, D] -> [B, D] fp32: the mean over real tokens (mask True) or the first
    token ("cls")."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    hidden = hidden.astype(jnp.float32)
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        return jnp.mean(hidden, axis=1)
    weights = mask.astype(jnp.float32)[:, :, None]
    return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def encode(params: dict, cfg: Config, tokens: jax.Array, mask: jax.Array | None = None, *,
           pooling: str = "mean", normalize: bool = False,
           token_types: jax.Array | None = None) -> jax.Array:
    """Sentence embeddings [B, D] fp32 from tokens int [B, T] and mask bool [B, T].

    pooling: "mean" over real tokens (sentence-transformers) or "cls" (the first token's
    last hidden state); normalize: scale each embedding to unit L2 norm. Works for the
    encoder family and for the encoder of an encdec model (sentence-T5 style)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    if cfg.family == "encoder":
        hidden = forward(params, cfg, tokens, mask=mask, token_types=token_types).hidden
    elif cfg.family == "encdec":
        hidden, _ = encdec.encode(params, cfg, tokens, mask)
    else:
        raise ValueError(f"zoo.encode: cfg.family must be 'encoder' or 'encdec', got {cfg.family!r}")
    out = pool(hidden, mask, pooling)
    if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out
