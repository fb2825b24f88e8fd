"""The layer every family is built from, and the scanned stack of them.

A layer is self-attention, optional cross-attention, then an MLP or MoE, each wrapped in a
pre- or post-norm residual. A stack owns what is per-stack in published models: learned
positions, the embedding norm, the T5 relative-bias table, the layers (stacked on a leading
`layers` axis and run with `lax.scan`) and the final norm.
"""

from __future__ import annotations

import functools

from typing import Callable

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.attention import (Context, apply_attention, apply_cached_attention, attention_mask,
                              attention_spec, project_kv)
from zoo.nn.cache import Cache, LayerKV, Plan, key_positions, plan as cache_plan
from zoo.nn.cache import per_layer as kv_per_layer, stacked as kv_stacked
from zoo.nn.embeddings import add_positions, position_spec
from zoo.nn.mlp import apply_mlp, mlp_spec
from zoo.nn.moe import apply_moe, moe_spec
from zoo.nn.norms import apply_norm, norm_spec
from zoo.nn.param import Spec, init_std, param, stacked
from zoo.nn.positions import alibi_bias, relative_bias, rope_tables
from zoo.sharding import constrain


def layer_spec(cfg: Config, cross: bool) -> Spec:
    spec = {"attn_norm": norm_spec(cfg), "attn": attention_spec(cfg), "mlp_norm": norm_spec(cfg)}
    if cross:
        spec["cross_norm"] = norm_spec(cfg)
        spec["cross"] = attention_spec(cfg, cross=True)
    spec["moe" if cfg.moe else "mlp"] = moe_spec(cfg) if cfg.moe else mlp_spec(cfg)
    return spec


def stack_spec(cfg: Config, num_layers: int, cross: bool = False) -> Spec:
    spec = {**position_spec(cfg), "layers": stacked(layer_spec(cfg, cross), num_layers)}
    if cfg.embed_norm:
        spec["embed_norm"] = norm_spec(cfg)
    if cfg.positions == "relative":
        spec["rel_bias"] = param((cfg.relative_buckets, cfg.num_heads), ("buckets", "heads"),
                                 std=init_std(cfg, "rel_bias", cfg.d_model))
    if cfg.final_norm:
        spec["final_norm"] = norm_spec(cfg)
    return spec


# What the backward pass may keep from the forward of each layer (`remat`); the rest is
# recomputed. "none": everything autodiff saves; "full": only the layer's input; "dots":
# every matmul output (norms, activations and softmax are recomputed, which on a
# bandwidth-bound device is cheaper than storing and reloading them); "minimal": only the
# weight matmuls (attention scores are recomputed too).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat: bool | str) -> Callable | None:
    """The checkpoint policy of a `remat` setting (False/"none" -> None, True -> "full")."""
    if remat is False or remat == "none":
        return None
    if remat is True:
        remat = "full"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat: expected one of {('none', *REMAT_POLICIES)} or a bool, got {remat!r}")
    return REMAT_POLICIES[remat]


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _residual(x: jax.Array, norm_p: dict, sublayer: Callable[[jax.Array], jax.Array],
              cfg: Config, key: jax.Array | None) -> jax.Array:
    if cfg.norm_position == "pre":
        return x + dropout(sublayer(apply_norm(norm_p, x, cfg)), cfg.dropout, key)
    return apply_norm(norm_p, x + dropout(sublayer(x), cfg.dropout, key), cfg)


def self_context(p_stack: dict, cfg: Config, positions: jax.Array, *, causal: bool,
                 valid: jax.Array | None, segments: jax.Array | None = None,
                 prefix: jax.Array | None = None) -> Context:
    """Mask, position bias and RoPE positions for self-attention over [B, T] positions."""
    mask = attention_mask(positions, positions, causal=causal, k_valid=valid,
                          window=cfg.sliding_window, q_segments=segments, k_segments=segments,
                          prefix=prefix)
    return Context(mask, position_bias(p_stack, cfg, positions, positions, bidirectional=not causal),
                   positions if cfg.positions == "rope" else None, causal=causal and prefix is None)


def cross_context(q_len_positions: jax.Array, memory_valid: jax.Array | None,
                  memory_len: int) -> Context:
    """Cross-attention: every decoder position sees every valid encoder position."""
    b = q_len_positions.shape[0]
    k_pos = jnp.broadcast_to(jnp.arange(memory_len), (b, memory_len))
    mask = attention_mask(q_len_positions, k_pos, causal=False, k_valid=memory_valid)
    return Context(mask, None, None)


def position_bias(p_stack: dict, cfg: Config, q_pos: jax.Array, k_pos: jax.Array,
                  bidirectional: bool) -> jax.Array | None:
    if cfg.positions == "alibi":
        return alibi_bias(q_pos, k_pos, cfg.num_heads)
    if cfg.positions == "relative":
        return relative_bias(p_stack["rel_bias"], q_pos, k_pos, bidirectional, cfg)
    return None


def embed_for_stack(p_stack: dict, x: jax.Array, positions: jax.Array, cfg: Config,
                    key: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, T, D] -> stack input: absolute positions, embedding norm, dropout."""
    x = add_positions(p_stack, x, positions, cfg)
    if "embed_norm" in p_stack:
        x = apply_norm(p_stack["embed_norm"], x, cfg)
    return dropout(x, cfg.dropout, key)


def apply_layer(p: dict, x: jax.Array, ctx: Context, cfg: Config,
                memory: jax.Array | None = None, cross_ctx: Context | None = None,
                key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One layer. x: [B, T, D]; memory: encoder output [B, S, D] for cross-attention.
    Returns (x, MoE balance loss or 0)."""
    x, aux, _ = _layer(p, x, ctx, cfg, memory, cross_ctx, key)
    return x, aux


def _layer(p: dict, x: jax.Array, ctx: Context, cfg: Config, memory: jax.Array | None,
           cross_ctx: Context | None, key: jax.Array | None, kv: LayerKV | None = None,
           plan: Plan | None = None, cross_kv: LayerKV | None = None
           ) -> tuple[jax.Array, jax.Array, LayerKV | None]:
    """apply_layer, optionally over a layer cache `kv` (written by `plan`) and with cached
    cross-attention keys/values `cross_kv`. Returns (x, aux, updated kv or None)."""
    keys = list(jax.random.split(key, 3)) if key is not None else [None] * 3
    rope = rope_tables(cfg, "global", ctx.positions) if cfg.positions == "rope" else None
    stored = {}

    def self_attention(h: jax.Array) -> jax.Array:
        if kv is None:
            return apply_attention(p["attn"], h, ctx, cfg, rope)
        y, stored["kv"] = apply_cached_attention(p["attn"], h, ctx, cfg, kv, plan, rope)
        return y

    x = _residual(x, p["attn_norm"], self_attention, cfg, keys[0])
    if memory is not None or cross_kv is not None:
        cached = cross_kv is not None  # in the cache layout
        ckv = (cross_kv.k, cross_kv.v) if cached else project_kv(p["cross"], memory)
        x = _residual(x, p["cross_norm"],
                      lambda h: apply_attention(p["cross"], h, cross_ctx, cfg, kv=ckv,
                                                cache_layout=cached), cfg, keys[1])
    aux = jnp.zeros((), jnp.float32)
    if cfg.moe:
        moe_out = {}

        def run_moe(h: jax.Array) -> jax.Array:
            y, moe_out["aux"] = apply_moe(p["moe"], h, cfg)
            return y

        x = _residual(x, p["mlp_norm"], run_moe, cfg, keys[2])
        aux = moe_out["aux"]
    else:
        x = _residual(x, p["mlp_norm"], lambda h: apply_mlp(p["mlp"], h, cfg), cfg, keys[2])
    return constrain(x, ("batch", "length", "embed")), aux, stored.get("kv")


def run_stack(p_stack: dict, x: jax.Array, ctx: Context, cfg: Config,
              memory: jax.Array | None = None, cross_ctx: Context | None = None,
              key: jax.Array | None = None, remat: bool | str = False) -> tuple[jax.Array, jax.Array]:
    """Scans the stacked layers over x: [B, T, D]; applies the final norm. remat: a policy
    name of REMAT_POLICIES, "none", or a bool (True = "full").
    Returns (hidden [B, T, D], mean MoE balance loss over layers)."""
    x, aux, _ = run_stack_cached(p_stack, x, ctx, cfg, memory, cross_ctx, key=key, remat=remat)
    return x, aux


def unstack_layers(params: dict) -> dict:
    """params with every stack's `layers` (arrays with a leading [L] axis) split into a tuple
    of L per-layer trees. Stacks then run as an unrolled Python loop over separate buffers:
    what decoding wants, since a scan slices (copies) each layer's weights on every token.
    Training keeps the stack (one compiled layer, compile time flat in depth)."""
    def split(node: object) -> object:
        if not isinstance(node, dict):
            return node
        out = {k: split(v) for k, v in node.items() if k != "layers"}
        if "layers" in node:
            layers = node["layers"]
            n = layers_count(layers)
            out["layers"] = layers if isinstance(layers, tuple) else tuple(
                jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))
        return out

    return split(params)


def layers_count(layers: dict | tuple) -> int:
    """L of a stack's layers, stacked or unstacked."""
    return len(layers) if isinstance(layers, tuple) else jax.tree.leaves(layers)[0].shape[0]


def run_stack_cached(p_stack: dict, x: jax.Array, ctx: Context, cfg: Config,
                     memory: jax.Array | None = None, cross_ctx: Context | None = None,
                     kv: LayerKV | tuple[LayerKV, ...] | None = None, plan: Plan | None = None,
                     cross_kv: LayerKV | tuple[LayerKV, ...] | None = None,
                     key: jax.Array | None = None, remat: bool | str = False
                     ) -> tuple[jax.Array, jax.Array, LayerKV | tuple[LayerKV, ...] | None]:
    """run_stack over layer caches kv and cross_kv (`zoo.nn.cache` layouts), stacked on a
    leading [L] axis (each layer's slice is scan xs, its update scan ys) or per layer (tuples).
    Stacked layers run as a `lax.scan`; unstacked ones (`unstack_layers`) as an unrolled
    loop. Returns (hidden [B, T, D], mean MoE loss, updated kv in its layout, or None)."""
    if isinstance(p_stack["layers"], tuple):
        return _run_unrolled(p_stack, x, ctx, cfg, memory, cross_ctx, kv, plan, cross_kv, key)
    if not cfg.scan_layers and kv is None and cross_kv is None:
        stack = {**p_stack, "layers": split_layers(p_stack["layers"])}
        return _run_unrolled(stack, x, ctx, cfg, memory, cross_ctx, None, plan, None, key, remat)
    num_layers = layers_count(p_stack["layers"])
    keys = jax.random.split(key, num_layers) if key is not None else None
    kv = None if kv is None else kv_stacked(kv)
    cross_kv = None if cross_kv is None else kv_stacked(cross_kv)

    def body(h: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
        layer_p, layer_key, layer_kv, layer_cross = xs
        h, aux, new_kv = _layer(layer_p, h, ctx, cfg, memory, cross_ctx, layer_key,
                                layer_kv, plan, layer_cross)
        return h, (aux, new_kv)

    policy = remat_policy(remat)
    if policy is not None:
        body = jax.checkpoint(body, policy=policy)
    x, (aux, new_kv) = jax.lax.scan(body, x, (p_stack["layers"], keys, kv, cross_kv))
    if "final_norm" in p_stack:
        x = apply_norm(p_stack["final_norm"], x, cfg)
    return x, jnp.mean(aux), new_kv


def split_layers(layers: dict) -> tuple[dict, ...]:
    """A stack's layers [L, ...] as L per-layer trees, through one `split` per array: its
    gradient is one concatenate back into the stacked layout (indexing layer by layer would
    pad each layer's gradient to the full stack and add them up)."""
    leaves, tree = jax.tree.flatten(layers)
    n = leaves[0].shape[0]
    parts = [jnp.split(a, n) for a in leaves]
    return tuple(tree.unflatten([jnp.squeeze(p[i], 0) for p in parts]) for i in range(n))


def _run_unrolled(p_stack: dict, x: jax.Array, ctx: Context, cfg: Config,
                  memory: jax.Array | None, cross_ctx: Context | None,
                  kv: LayerKV | tuple[LayerKV, ...] | None, plan: Plan | None,
                  cross_kv: LayerKV | tuple[LayerKV, ...] | None, key: jax.Array | None,
                  remat: bool | str = False
                  ) -> tuple[jax.Array, jax.Array, tuple[LayerKV, ...] | None]:
    layers = p_stack["layers"]
    keys = jax.random.split(key, len(layers)) if key is not None else [None] * len(layers)
    kv = None if kv is None else kv_per_layer(kv)
    cross_kv = None if cross_kv is None else kv_per_layer(cross_kv)
    layer = functools.partial(_layer, ctx=ctx, cfg=cfg, memory=memory, cross_ctx=cross_ctx, plan=plan)
    policy = remat_policy(remat)
    if policy is not None:
        layer = jax.checkpoint(layer, policy=policy)
    auxes, new_kv = [], []
    for i, layer_p in enumerate(layers):
        x, aux, layer_kv = layer(layer_p, x, key=keys[i], kv=None if kv is None else kv[i],
                                 cross_kv=None if cross_kv is None else cross_kv[i])
        auxes.append(aux)
        new_kv.append(layer_kv)
    if "final_norm" in p_stack:
        x = apply_norm(p_stack["final_norm"], x, cfg)
    return x, jnp.mean(jnp.stack(auxes)), None if kv is None else tuple(new_kv)


def cached_self_context(p_stack: dict, cfg: Config, positions: jax.Array,
                        valid: jax.Array | None, cache: Cache) -> tuple[Context, Plan, jax.Array]:
    """Causal context of a chunk at positions [B, T] over a cache plus the chunk itself.

    Returns (Context with mask [B, T, R or R+T], the write plan, the cache's new slot
    positions [B, R]). Padding (valid False) is stored at position -1: never attended."""
    plan = cache_plan(cache, positions.shape[1], cfg.sliding_window)
    new_pos = positions if valid is None else jnp.where(valid, positions, -1)
    k_pos, slot_pos = key_positions(cache, plan, new_pos)
    mask = attention_mask(positions, k_pos, causal=True, k_valid=k_pos >= 0, window=cfg.sliding_window)
    bias = position_bias(p_stack, cfg, positions, k_pos, bidirectional=False)
    # Context.causal stays False: cache slots are not aligned with query indices (left
    # padding, rings, rewinds), so only the position mask may decide what is visible.
    return Context(mask, bias, positions if cfg.positions == "rope" else None), plan, slot_pos


def cached_positions(cache: Cache, valid: jax.Array | None, length: int) -> jax.Array:
    """[B, T] positions of a chunk that continues each row of the cache (real tokens
    count up from the row's length; padding repeats the previous position)."""
    if valid is None:
        return cache.lengths[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    steps = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
    return cache.lengths[:, None] + jnp.maximum(steps, 0)


def default_positions(tokens: jax.Array, mask: jax.Array | None) -> jax.Array:
    """[B, T] positions: 0.. over real tokens (so left padding starts real text at 0)."""
    if mask is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


