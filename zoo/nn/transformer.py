"""The layer every family is built from, and the stack of them.

A layer is assembled from parts the config chooses (`LayerKind`): self-attention of a kind
("global", or "local" over a sliding window, each with its own RoPE), optional
cross-attention, then an MLP or a mixture of experts; each part sits in a residual with the
config's norm placement (pre, post, or sandwich: a norm on the way in and one on the way
out). A stack may mix kinds by `Config.layer_pattern`; every kind of a stack shares one
parameter layout, so the layers stay stacked on a leading `layers` axis.

A stack runs as one `lax.scan` over its stacked layers whatever the pattern: the kinds of a
stack differ only in what their attention reads (mask, RoPE tables), so the scanned layer
picks its kind's by index, and compile time is one layer's at any depth. A stack also owns what is per-stack in published models:
learned positions, the embedding norm, the T5 relative-bias table and the final norm.

Parameter layouts are explicit (`Config.layout`): "stacked" ([L, ...] leaves, training and
checkpoints) or "decoding" (a tuple of per-layer trees with fused projections, run unrolled
over a per-layer cache; `zoo.decoding.unstacked`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.attention import (Context, apply_attention, apply_cached_attention, apply_cross_attention,
                              attention_mask, attention_spec, project_kv)
from zoo.nn.cache import Cache, LayerKV, Plan, Slots, is_stacked, key_positions, plan as cache_plan, window
from zoo.nn.cache import stream_positions
from zoo.nn.cache import per_layer as kv_per_layer, stacked as kv_stacked
from zoo.nn.embeddings import add_positions, position_spec
from zoo.nn.mla import apply_cached_mla, apply_mla, mla_spec
from zoo.nn.mlp import apply_mlp, dense, dense_spec, mlp_spec
from zoo.nn.moe import apply_moe, moe_spec
from zoo.nn.norms import apply_norm, norm_spec
from zoo.nn.param import Spec, init_std, param, stacked
from zoo.nn.masks import MaskParts, PositionBias
from zoo.nn.positions import rope_tables
from zoo.sharding import constrain


# --- layer kinds and their parts ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerKind:
    """The parts of one layer. attention: "global" | "local" (`Config.layer_kind`); cross:
    cross-attention over an encoder's output; ffn: "mlp" | "moe"; attn_norm: False when the
    attention reads the layer's input as is (ModernBERT's first layer)."""

    attention: str = "global"
    cross: bool = False
    ffn: str = "mlp"
    attn_norm: bool = True


def layer_kinds(cfg: Config, num_layers: int, cross: bool = False) -> tuple[LayerKind, ...]:
    """The kind of every layer of a stack of num_layers."""
    ffn = lambda i: "moe" if cfg.moe and i not in cfg.dense_layers else "mlp"
    return tuple(LayerKind(cfg.layer_kind(i), cross, ffn(i), attn_norm=i > 0 or cfg.first_attn_norm)
                 for i in range(num_layers))


def self_attention_part(cfg: Config) -> tuple[Callable, Callable, Callable]:
    """(spec(cfg), apply(p, x, ctx, cfg), apply_cached(p, x, ctx, cfg, layer cache, plan)) of
    the self-attention: multi-head latent attention when cfg sets kv_lora_rank (zoo.nn.mla),
    else zoo.nn.attention's."""
    if cfg.mla:
        return mla_spec, apply_mla, apply_cached_mla
    return attention_spec, apply_attention, apply_cached_attention


# The feed-forward parts: name -> (spec(cfg), apply(p, x, cfg) -> (y, aux loss)).
FFN_PARTS: dict[str, tuple[Callable[[Config], Spec], Callable]] = {
    "mlp": (mlp_spec, lambda p, x, cfg: (apply_mlp(p, x, cfg), jnp.zeros((), jnp.float32))),
    "moe": (moe_spec, apply_moe),
}


def _norms(cfg: Config, name: str) -> Spec:
    """The norms around sub-layer `name`: `{name}_norm`, plus `{name}_post_norm` (sandwich)."""
    spec = {f"{name}_norm": norm_spec(cfg)}
    if cfg.norm_position == "sandwich":
        spec[f"{name}_post_norm"] = norm_spec(cfg)
    return spec


def layer_spec(cfg: Config, kind: LayerKind = LayerKind()) -> Spec:
    spec = {**(_norms(cfg, "attn") if kind.attn_norm else {}), "attn": self_attention_part(cfg)[0](cfg),
            **_norms(cfg, "mlp")}
    if kind.cross:
        spec.update(_norms(cfg, "cross"), cross=attention_spec(cfg, cross=True))
    spec[kind.ffn] = FFN_PARTS[kind.ffn][0](cfg)
    return spec


def stack_spec(cfg: Config, num_layers: int, cross: bool = False) -> Spec:
    first, kinds = _split_first(layer_kinds(cfg, num_layers, cross))
    layer = layer_spec(cfg, kinds[0])
    if cfg.dense_layers:  # MoE and dense layers: one stacked tree per segment (`segments`)
        layer = {str(a): stacked(layer_spec(cfg, kinds[a]), b - a) for a, b in segments(kinds)}
    elif any(layer_spec(cfg, k) != layer for k in kinds[1:]):
        raise ValueError(f"stack: layer kinds {sorted(set(kinds))} differ in parameters; "
                         "a stack holds one parameter layout")
    layers = layer if cfg.dense_layers else stacked(layer, cfg.shared_layers or len(kinds))
    spec = {**position_spec(cfg), "layers": layers}
    if first is not None:
        spec["first_layer"] = layer_spec(cfg, first)
    if cfg.embed_norm:
        spec["embed_norm"] = norm_spec(cfg, cfg.embed_size)
    if cfg.embed_dim is not None:  # factorised embeddings (ALBERT): [E] -> [D]
        spec["embed_proj"] = dense_spec(cfg.embed_dim, cfg.d_model, (None, "embed"),
                                        std=init_std(cfg, "dense", cfg.embed_dim))
    if cfg.positions == "relative":
        spec["rel_bias"] = param((cfg.relative_buckets, cfg.num_heads), ("buckets", "heads"),
                                 std=init_std(cfg, "rel_bias", cfg.d_model))
    if cfg.final_norm:
        spec["final_norm"] = norm_spec(cfg)
    return spec


def segments(kinds: tuple[LayerKind, ...]) -> list[tuple[int, int]]:
    """(start, stop) of each run of consecutive layers with the same feed-forward part. A
    stack with dense layers in an MoE model (`Config.dense_layers`) stores each run as its
    own stacked tree, `layers/{start}` (DeepSeek's first dense layers: "0" and "3"), and runs
    it as its own scan: the layers of one scan must share one parameter layout."""
    starts = [i for i in range(len(kinds)) if i == 0 or kinds[i].ffn != kinds[i - 1].ffn]
    return list(zip(starts, starts[1:] + [len(kinds)]))


def _split_first(kinds: tuple[LayerKind, ...]) -> tuple[LayerKind | None, tuple[LayerKind, ...]]:
    """(the first layer's kind when it has a parameter layout of its own, kept unstacked as
    the stack's "first_layer" (`Config.first_attn_norm`), else None; the stacked kinds)."""
    return (None, kinds) if kinds[0].attn_norm else (kinds[0], kinds[1:])


# --- what the layers of one forward share -------------------------------------------------
class StackContext(NamedTuple):
    """Built once per forward: the self-attention Context of each attention kind, the
    cross-attention Context and encoder output (encdec decoders), and, over a cache, the
    write Plan of each kind."""

    attention: dict[str, Context]
    cross: Context | None = None
    memory: jax.Array | None = None  # [B, S, D], when cross keys are not cached
    plans: dict[str, Plan] | None = None


class LayerCache(NamedTuple):
    """A layer's cache: self-attention keys/values, and the cross-attention ones (or None)."""

    kv: LayerKV
    cross: LayerKV | None = None


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


def _residual(x: jax.Array, p: dict, name: str, sublayer: Callable[[jax.Array], jax.Array],
              cfg: Config, key: jax.Array | None) -> jax.Array:
    """x plus sub-layer `name` under the config's norm placement (a layer without the norm,
    `LayerKind.attn_norm`, feeds x to the sub-layer as is)."""
    norm = p.get(f"{name}_norm")
    if cfg.norm_position == "post":
        return apply_norm(norm, x + dropout(sublayer(x), cfg.dropout, key), cfg)
    y = sublayer(x if norm is None else apply_norm(norm, x, cfg))
    if cfg.norm_position == "sandwich":
        y = apply_norm(p[f"{name}_post_norm"], y, cfg)
    return x + dropout(y, cfg.dropout, key)


def apply_layer(p: dict, x: jax.Array, kind: LayerKind, ctx: StackContext, cfg: Config,
                key: jax.Array | None = None, cache: LayerCache | None = None
                ) -> tuple[jax.Array, jax.Array, LayerCache | None]:
    """One layer of `kind` on x [B, T, D], optionally over its cache (written by
    ctx.plans). Returns (x, MoE balance loss or 0, the updated cache or None)."""
    keys = list(jax.random.split(key, 3)) if key is not None else [None] * 3
    attn_ctx = ctx.attention[kind.attention]
    stored = {}

    _, attend, attend_cached = self_attention_part(cfg)

    def self_attention(h: jax.Array) -> jax.Array:
        if cache is None:
            return attend(p["attn"], h, attn_ctx, cfg)
        y, stored["kv"] = attend_cached(p["attn"], h, attn_ctx, cfg, cache.kv,
                                        ctx.plans[kind.attention])
        return y

    x = _residual(x, p, "attn", self_attention, cfg, keys[0])
    if kind.cross:
        cached = cache is not None and cache.cross is not None
        kv = (cache.cross.k, cache.cross.v) if cached else project_kv(p["cross"], ctx.memory, cfg)
        x = _residual(x, p, "cross", lambda h: apply_cross_attention(
            p["cross"], h, kv, ctx.cross, cfg, cache_layout=cached), cfg, keys[1])
    out = {}

    def ffn(h: jax.Array) -> jax.Array:
        y, out["aux"] = FFN_PARTS[kind.ffn][1](p[kind.ffn], h, cfg)
        return y

    x = _residual(x, p, "mlp", ffn, cfg, keys[2])
    new_cache = None if cache is None else cache._replace(kv=stored["kv"])
    return constrain(x, ("batch", "length", "embed")), out["aux"], new_cache


# --- the stack ----------------------------------------------------------------------------
class StackCache(NamedTuple):
    """The caches of a stack's layers: kv (and cross, or None) as LayerKV stacked on [L] or
    tuples of L LayerKV (`zoo.nn.cache` layouts)."""

    kv: LayerKV | tuple[LayerKV, ...]
    cross: LayerKV | tuple[LayerKV, ...] | None = None


def run_stack(p_stack: dict, x: jax.Array, ctx: StackContext, cfg: Config, *,
              key: jax.Array | None = None, remat: bool | str = False,
              cache: StackCache | None = None, cross: bool = False
              ) -> tuple[jax.Array, jax.Array, StackCache | None]:
    """The stack's layers over x [B, T, D], then the final norm.

    Stacked parameters run as one scan (or unrolled when cfg.scan_layers is False or the
    cache is per layer); the decoding layout runs unrolled.
    remat: a policy name of REMAT_POLICIES, "none", or a bool (True = "full"); it applies to
    every layer either way. cross: the layers have cross-attention (encdec decoder).
    Returns (hidden [B, T, D], mean MoE balance loss over layers, updated cache or None)."""
    layers = p_stack["layers"]
    if cfg.dense_layers and cfg.layout != "decoding":
        x, aux, cache = _run_segments(layers, x, ctx, cfg, key, remat, cache, cross)
        return (apply_norm(p_stack["final_norm"], x, cfg) if "final_norm" in p_stack else x), aux, cache
    num = len(layers) if cfg.layout == "decoding" else jax.tree.leaves(layers)[0].shape[0]
    first = "first_layer" in p_stack  # a first layer of its own layout (encoders, no cache)
    sets = None
    if cfg.shared_layers:  # the stored parameter sets run over the stack's whole depth
        num_sets, num = num, (cfg.decoder_layers if cross else cfg.num_layers) - first
        sets = layer_sets(cfg, num, num_sets)
    first_kind, kinds = _split_first(layer_kinds(cfg, num + first, cross))
    keys = jax.random.split(key, num + first) if key is not None else None
    if first:
        x, first_aux, _ = _layer_fn(first_kind, ctx, cfg, remat)(
            p_stack["first_layer"], x, None if keys is None else keys[num], None)
        keys = None if keys is None else keys[:num]
    per_layer_cache = cache is not None and not is_stacked(cache.kv)
    if cfg.layout == "decoding":
        x, aux, cache = _run_unrolled(_by_set(layers, sets), x, kinds, ctx, cfg, keys, remat, cache)
    elif per_layer_cache or not cfg.scan_layers:
        x, aux, cache = _run_unrolled(_by_set(split_layers(layers), sets), x, kinds, ctx, cfg, keys,
                                      remat, cache)
    else:
        x, aux, cache = _run_scanned(layers, x, kinds, ctx, cfg, keys, remat, cache, sets)
    if first:
        aux = (first_aux + num * aux) / (num + 1)
    if "final_norm" in p_stack:
        x = apply_norm(p_stack["final_norm"], x, cfg)
    return x, aux, cache


def _run_segments(layers: dict, x: jax.Array, ctx: StackContext, cfg: Config, key: jax.Array | None,
                  remat: bool | str, cache: StackCache | None, cross: bool
                  ) -> tuple[jax.Array, jax.Array, StackCache | None]:
    """The stacked segments `layers/{start}` (`segments`) one after the other, each as a scan
    (or unrolled, as run_stack decides). Returns the balance loss averaged over the MoE
    layers, and the cache with every segment's layers written."""
    num = sum(jax.tree.leaves(seg)[0].shape[0] for seg in layers.values())
    kinds = layer_kinds(cfg, num, cross)
    keys = jax.random.split(key, num) if key is not None else None
    per_layer_cache = cache is not None and not is_stacked(cache.kv)
    cut = lambda kv, a, b: None if kv is None else (jax.tree.map(lambda t: t[a:b], kv) if is_stacked(kv) else kv[a:b])
    total, parts = jnp.zeros((), jnp.float32), []
    for a, b in segments(kinds):
        part = None if cache is None else StackCache(cut(cache.kv, a, b), cut(cache.cross, a, b))
        seg_keys = None if keys is None else keys[a:b]
        if per_layer_cache or not cfg.scan_layers:
            x, aux, part = _run_unrolled(split_layers(layers[str(a)]), x, kinds[a:b], ctx, cfg, seg_keys,
                                         remat, part)
        else:
            x, aux, part = _run_scanned(layers[str(a)], x, kinds[a:b], ctx, cfg, seg_keys, remat, part)
        total, parts = total + aux * (b - a), parts + [part]
    if cache is not None:
        kv = [part.kv for part in parts]
        joined = jax.tree.map(lambda *t: jnp.concatenate(t), *kv) if is_stacked(kv[0]) else sum(kv, ())
        cache = cache._replace(kv=joined)
    return x, total / max(1, sum(k.ffn == "moe" for k in kinds)), cache


def layer_sets(cfg: Config, depth: int, num_sets: int) -> tuple[int, ...]:
    """The parameter set each of a stack's depth layers runs (`Config.shared_layers` = n
    sets, num_sets of them stored): blocks of depth / n consecutive layers share one, as
    ALBERT's num_hidden_groups do."""
    n = cfg.shared_layers
    if num_sets != n or depth % n:
        raise ValueError(f"stack: {depth} layers over {num_sets} stored parameter sets, but "
                         f"Config.shared_layers={n} must equal the sets and divide the depth")
    return tuple(i // (depth // n) for i in range(depth))


def _by_set(layers: tuple[dict, ...], sets: tuple[int, ...] | None) -> tuple[dict, ...]:
    """Per-layer trees: each layer's parameter set (sets None: the layers as they are)."""
    return layers if sets is None else tuple(layers[s] for s in sets)


def _layer_fn(kind: LayerKind, ctx: StackContext, cfg: Config, remat: bool | str) -> Callable:
    def layer(p: dict, x: jax.Array, key: jax.Array | None, cache: LayerCache | None):
        return apply_layer(p, x, kind, ctx, cfg, key, cache)

    policy = remat_policy(remat)
    return layer if policy is None else jax.checkpoint(layer, policy=policy)


def _run_unrolled(layers: tuple[dict, ...], x: jax.Array, kinds: tuple[LayerKind, ...],
                  ctx: StackContext, cfg: Config, keys: jax.Array | None, remat: bool | str,
                  cache: StackCache | None) -> tuple[jax.Array, jax.Array, StackCache | None]:
    stacked_cache = cache is not None and is_stacked(cache.kv)
    kv = None if cache is None else kv_per_layer(cache.kv)
    cross = None if cache is None or cache.cross is None else kv_per_layer(cache.cross)
    fns = {kind: _layer_fn(kind, ctx, cfg, remat) for kind in set(kinds)}
    auxes, new_kv = [], []
    for i, (p, kind) in enumerate(zip(layers, kinds)):
        layer_cache = None if kv is None else LayerCache(kv[i], None if cross is None else cross[i])
        x, aux, layer_cache = fns[kind](p, x, None if keys is None else keys[i], layer_cache)
        auxes.append(aux)
        new_kv.append(None if layer_cache is None else layer_cache.kv)
    if cache is not None:
        cache = cache._replace(kv=kv_stacked(tuple(new_kv)) if stacked_cache else tuple(new_kv))
    return x, jnp.mean(jnp.stack(auxes)), cache


def _run_scanned(layers: dict, x: jax.Array, kinds: tuple[LayerKind, ...], ctx: StackContext,
                 cfg: Config, keys: jax.Array | None, remat: bool | str,
                 cache: StackCache | None, sets: tuple[int, ...] | None = None
                 ) -> tuple[jax.Array, jax.Array, StackCache | None]:
    """One `lax.scan` over the stacked [L, ...] leaves as they are (no copy of the weights or
    their gradients). The layer kinds of a stack differ only in what their attention reads
    (mask, RoPE tables: `StackContext.attention`), not in code, so the body is one layer that
    picks its kind's Context by index: compile time is one layer's at any depth and any
    pattern. Stacked caches belong to single-kind stacks. Shared parameter sets
    (`layer_sets`) run as a scan over the sets around a scan over each set's block of
    layers: inside a block the weights are loop-invariant, so the backward pass keeps one
    copy of each set, not one per layer."""
    names = sorted({k.attention for k in kinds})  # `layer_kinds` varies only the attention
    body_kind = dataclasses.replace(kinds[0], attention=names[0])
    layer = _layer_fn(body_kind, ctx, cfg, remat)
    if len(names) > 1:  # each layer's Context, picked from the kinds' stacked Contexts
        stacked_ctx = jax.tree.map(lambda *c: jnp.stack(c), *(ctx.attention[n] for n in names))
        ids = jnp.asarray([names.index(k.attention) for k in kinds], jnp.int32)

    def body(h: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
        p, key, kv, cross, kind_id = xs
        run = layer
        if kind_id is not None:
            picked = jax.tree.map(lambda a: a[kind_id], stacked_ctx)
            run = _layer_fn(body_kind, ctx._replace(attention={names[0]: picked}), cfg, remat)
        h, aux, layer_cache = run(p, h, key, None if kv is None else LayerCache(kv, cross))
        return h, (aux, None if layer_cache is None else layer_cache.kv)

    per_layer = (keys, None if cache is None else kv_stacked(cache.kv),
                 None if cache is None or cache.cross is None else kv_stacked(cache.cross),
                 ids if len(names) > 1 else None)
    if sets is None:
        x, (aux, kv) = jax.lax.scan(body, x, (layers, *per_layer))
    else:
        x, (aux, kv) = _scan_blocks(body, x, layers, per_layer, len(kinds) // (sets[-1] + 1))
    return x, jnp.mean(aux), None if cache is None else cache._replace(kv=kv)


def _scan_blocks(body: Callable, x: jax.Array, layers: dict, per_layer: tuple, block: int):
    """`lax.scan(body, x, (p, *per_layer))` over layers that run their parameter sets
    [n, ...] in blocks of `block` consecutive layers: a scan over the sets whose body scans
    its block with p fixed. per_layer: [L, ...] leaves (keys, caches, kind ids) or None."""
    blocked = jax.tree.map(lambda a: a.reshape(-1, block, *a.shape[1:]), per_layer)

    def run_block(h: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
        p, rest = xs
        return jax.lax.scan(lambda h_, r: body(h_, (p, *r)), h, rest, length=block)

    x, out = jax.lax.scan(run_block, x, (layers, blocked))
    return x, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out)


def split_layers(layers: dict) -> tuple[dict, ...]:
    """A stack's layers [L, ...] as L per-layer trees, through one `split` per array: its
    gradient is one concatenate back into the stacked layout (indexing layer by layer would
    pad each layer's gradient to the full stack and add them up)."""
    leaves, tree = jax.tree.flatten(layers)
    n = leaves[0].shape[0]
    parts = [jnp.split(a, n) for a in leaves]
    return tuple(tree.unflatten([jnp.squeeze(p[i], 0) for p in parts]) for i in range(n))


def unstack_layers(p_stack: dict) -> dict:
    """A stack with its `layers` ([L, ...] leaves, or segments of them: `segments`) as a
    tuple of L per-layer trees."""
    layers = p_stack["layers"]
    parts = [layers[k] for k in sorted(layers, key=int)] if is_segmented(layers) else [layers]
    per_layer = lambda seg: tuple(jax.tree.map(lambda a, i=i: a[i], seg)
                                  for i in range(jax.tree.leaves(seg)[0].shape[0]))
    return {**p_stack, "layers": sum((per_layer(seg) for seg in parts), ())}


def is_segmented(layers: dict | tuple) -> bool:
    """True for a stack's layers stored as segments `{start: stacked tree}` (`segments`)."""
    return isinstance(layers, dict) and all(k.isdigit() for k in layers)


# --- contexts -----------------------------------------------------------------------------
def attention_kinds(cfg: Config) -> list[str]:
    """The attention kinds a stack of cfg uses."""
    return sorted(set(cfg.layer_pattern) or {cfg.layer_kind(0)})


def self_context(p_stack: dict, cfg: Config, positions: jax.Array, *, causal: bool,
                 valid: jax.Array | None, segments: jax.Array | None = None,
                 prefix: jax.Array | None = None, memory: jax.Array | None = None, memory_valid: jax.Array | None = None
                 ) -> StackContext:
    """What the layers of a stack over positions [B, T] share: per attention kind, the mask
    (its window for "local"), the position bias and the RoPE tables; for an encdec decoder
    (memory [B, S, D]), the cross-attention Context over the valid memory [B, S]."""
    # The blockwise path builds each block's mask and bias from positions: no [T, T] here.
    blockwise = cfg.attention in ("blockwise", "splash")
    bias = bias_parts(p_stack, cfg, bidirectional=not causal)
    if bias is not None and not blockwise:
        bias = bias(positions, positions)
    build_mask = MaskParts.build if blockwise else attention_mask
    contexts = {}
    for kind in attention_kinds(cfg):
        mask = build_mask(positions, positions, causal=causal, k_valid=valid,
                          window=window(cfg, kind), q_segments=segments, k_segments=segments,
                          prefix=prefix)
        contexts[kind] = Context(mask, bias, _rope(cfg, kind, positions),
                                 causal=causal and prefix is None)
    cross = None if memory is None else cross_context(positions, memory_valid, memory.shape[1], blockwise)
    return StackContext(contexts, cross, memory)


def _rope(cfg: Config, kind: str, positions: jax.Array):
    return rope_tables(cfg, kind, positions) if cfg.positions == "rope" else None


def cross_context(q_positions: jax.Array, memory_valid: jax.Array | None, memory_len: int,
                  blockwise: bool = False) -> Context:
    """Cross-attention: every decoder position sees every valid encoder position (blockwise:
    the mask as MaskParts)."""
    b = q_positions.shape[0]
    k_pos = jnp.broadcast_to(jnp.arange(memory_len), (b, memory_len))
    mask = (MaskParts.build if blockwise else attention_mask)(q_positions, k_pos, causal=False,
                                                               k_valid=memory_valid)
    return Context(mask, None, None)


def position_bias(p_stack: dict, cfg: Config, q_pos: jax.Array, k_pos: jax.Array,
                  bidirectional: bool) -> jax.Array | None:
    bias = bias_parts(p_stack, cfg, bidirectional)
    return None if bias is None else bias(q_pos, k_pos)


def bias_parts(p_stack: dict, cfg: Config, bidirectional: bool) -> PositionBias | None:
    """The stack's score bias as a function of positions (ALiBi, T5 relative), or None."""
    if cfg.positions == "alibi":
        return PositionBias(None, cfg, bidirectional)
    if cfg.positions == "relative":
        return PositionBias(p_stack["rel_bias"], cfg, bidirectional)
    return None


def cached_context(p_stack: dict, cfg: Config, positions: jax.Array, valid: jax.Array | None,
                   cache: Cache) -> tuple[StackContext, dict[str, Slots]]:
    """Causal context of a chunk at positions [B, T] over a cache plus the chunk itself, per
    slot group of the cache (each with its own plan and mask [B, T, R or R+T]).

    Returns (StackContext, the cache's slots with the chunk's positions written). Padding
    (valid False) is stored at position -1: never attended."""
    new_pos = positions if valid is None else jnp.where(valid, positions, -1)
    contexts, plans, slots = {}, {}, {}
    for kind, group in cache.slots.items():
        w = window(cfg, kind)
        plans[kind] = cache_plan(cache, kind, positions.shape[1], w, new_pos)
        k_pos, slots[kind] = key_positions(group, plans[kind], new_pos)
        mask = attention_mask(positions, k_pos, causal=True, k_valid=k_pos >= 0, window=w)
        q_at, k_at = stream_positions(cache, positions, k_pos)  # in-cache when streaming
        bias = position_bias(p_stack, cfg, q_at, k_at, bidirectional=False)
        # Context.causal stays False: cache slots are not aligned with query indices (left
        # padding, rings, rewinds), so only the position mask may decide what is visible.
        key_rope = None if cache.stream is None else _rope(cfg, kind, k_at)
        contexts[kind] = Context(mask, bias, _rope(cfg, kind, q_at), key_rope=key_rope)
    cross = None
    if cache.cross is not None:
        cross = cross_context(positions, cache.cross_valid, cache.cross_len)
    return StackContext(contexts, cross, None, plans), slots


def embed_for_stack(p_stack: dict, x: jax.Array, positions: jax.Array, cfg: Config,
                    key: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, T, E] -> stack input [B, T, D]: absolute positions, embedding
    norm, dropout, and the projection to d_model of factorised embeddings (E = embed_dim)."""
    x = add_positions(p_stack, x, positions, cfg)
    if "embed_norm" in p_stack:
        x = apply_norm(p_stack["embed_norm"], x, cfg)
    x = dropout(x, cfg.dropout, key)
    if "embed_proj" in p_stack:
        x = dense(x, p_stack["embed_proj"], cfg.matmul)
    return x


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
