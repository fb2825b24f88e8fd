"""Token, type and absolute position embeddings, and the output projections onto the
vocabulary (tied or untied, with optional bias)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.checks import check_positions
from zoo.nn.linear import matmul, matmul_transposed
from zoo.nn.param import Spec, init_std, param
from zoo.nn.quant import take_rows
from zoo.nn.positions import sinusoidal_table


def embed_spec(cfg: Config) -> Spec:
    """Token (and type) tables [V, E], E = cfg.embed_size (d_model unless factorised)."""
    std = init_std(cfg, "embed", 1)
    spec = {"tokens": param((cfg.vocab_size, cfg.embed_size), ("vocab", "embed"), std=std)}
    if cfg.type_vocab_size:
        spec["types"] = param((cfg.type_vocab_size, cfg.embed_size), ("types", "embed"), std=std)
    return spec


def head_spec(cfg: Config) -> Spec:
    """Output projection [E, V] when untied (E = cfg.embed_size), and the logits bias [V]
    when configured."""
    spec = {}
    if not cfg.tie_embeddings:
        spec["kernel"] = param((cfg.embed_size, cfg.vocab_size), ("embed", "vocab"),
                               std=init_std(cfg, "head", cfg.embed_size))
    if cfg.logits_bias:
        spec["bias"] = param((cfg.vocab_size,), ("vocab",), "zeros")
    return spec


def embed_tokens(p: dict, tokens: jax.Array, cfg: Config,
                 token_types: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] int -> [B, T, E] in the compute dtype (E = cfg.embed_size)."""
    dt = jnp.dtype(cfg.dtype)
    x = take_rows(p["tokens"], tokens).astype(dt)  # a quantized table: just these rows
    if cfg.embed_scale != 1.0:
        x = x * jnp.asarray(cfg.embed_scale, dt)
    if "types" in p:
        types = jnp.zeros_like(tokens) if token_types is None else token_types
        x = x + jnp.take(p["types"], types, axis=0, mode="clip").astype(dt)
    return x


def position_spec(cfg: Config) -> Spec:
    if cfg.positions == "learned":
        rows = cfg.max_len + cfg.position_offset
        return {"positions": param((rows, cfg.embed_size), ("length", "embed"), std=init_std(cfg, "embed", 1))}
    return {}


def add_positions(p_stack: dict, x: jax.Array, positions: jax.Array, cfg: Config) -> jax.Array:
    """Adds learned or sinusoidal absolute position embeddings; x: [B, T, E],
    positions [B, T] < max_len (`check_positions`)."""
    check_positions(positions, cfg)
    if cfg.positions == "learned":
        table = p_stack["positions"]
        return x + jnp.take(table, positions + cfg.position_offset, axis=0, mode="clip").astype(x.dtype)
    if cfg.positions == "sinusoidal":
        table = jnp.asarray(sinusoidal_table(cfg.max_len, x.shape[-1]))
        return x + jnp.take(table, positions, axis=0, mode="clip").astype(x.dtype)
    return x


def vocab_logits(params: dict, hidden: jax.Array, cfg: Config) -> jax.Array:
    """hidden [B, T, E] -> logits [B, T, V] in the compute dtype (soft-capped when
    cfg.final_softcap is set)."""
    head = params.get("head", {})
    if cfg.tie_embeddings:
        if cfg.logit_scale != 1.0:
            hidden = hidden * jnp.asarray(cfg.logit_scale, hidden.dtype)
        logits = matmul_transposed(hidden, params["embed"]["tokens"], mode=cfg.matmul)
    else:
        logits = matmul(hidden, head["kernel"], mode=cfg.matmul)
    if cfg.logits_bias:
        logits = logits + head["bias"].astype(logits.dtype)
    if cfg.final_softcap is not None:
        logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
    return logits
