"""Mixture of experts: a router picks `experts_per_token` of `num_experts` MLPs per token,
and only those run (`Config.moe_dispatch="sparse"`).

Routing (`route`): softmax (Mixtral, Qwen3-MoE, gpt-oss, DeepSeek-V2) or sigmoid
(DeepSeek-V3) scores of the router logits (plus a learned bias, gpt-oss); the top k of the
scores plus an optional selection-only bias (DeepSeek-V3's aux-loss-free balancing, moved
by the training option `--score-bias-rate`, train/balance.py), optionally among the best groups
of experts (group-limited routing); the chosen scores, renormalised or not, times
`routed_scaling`. Shared experts (DeepSeek) are one dense MLP beside the routed ones.

Dispatch (`Config.moe_dispatch`):
- "sparse": the k (token, expert) assignments are sorted by expert and each expert's rows
  go through one grouped matmul (`grouped_matmul`): dropless, the FLOPs of the k routed
  experts. Two kernels compute it (`Config.grouped_matmul`, chosen per device by
  `zoo.nn.backend.resolve`): `jax.lax.ragged_dot` ("ragged"; GPUs and TPUs) or, on a CPU,
  where XLA expands ragged_dot into every group over every row, a scan over row tiles of
  one expert each ("tiles"). Quantized experts (`zoo.quantize`: a `QuantizedWeight` with
  the experts axis leading): the tile scan dequantizes each tile's expert matrix inside the
  scan, so only int8 weights are kept; ragged_dot takes float weights, so the whole [E, K, F]
  tensor is dequantized first and then multiplied.
- "dense": every expert runs on every token and the gates zero the unselected ones: E/k
  times the FLOPs, kept as the reference the sparse path is tested against.

Expert parallelism (`Config.expert_parallel`): on a mesh (`zoo.sharding.use`) whose `expert`
axis splits the experts, "all_to_all" (the default) runs the sparse dispatch under
`jax.shard_map` (`_over_experts`): each device sorts its own tokens' assignments by the device
that holds their expert, sends them there in one `jax.lax.all_to_all`, runs only its local
experts' grouped matmul, and sends the results back to be combined with the gates. The send
buffers hold every assignment a device could send to one other (tokens x min(k, local
experts)), so nothing is dropped whatever the router does. The routing, the balance loss and
the expert load stay outside, over the global batch. "gather" leaves the sparse dispatch to
XLA's partitioner, which gathers the expert weights to the tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.mlp import activation, apply_mlp, mlp_spec
from zoo.nn.param import Spec, init_std, param
from zoo.nn.quant import dequantize, is_quantized, shard_view, tie
from zoo.sharding import active_mesh, active_rules, constrain, spec_for

SWIGLU_ALPHA = 1.702  # gpt-oss's clamped SwiGLU: gate * sigmoid(alpha * gate) * (up + 1)


def expert_width(cfg: Config) -> int:
    """The hidden width of one routed expert."""
    return cfg.moe_d_ff or cfg.d_ff


def shared_config(cfg: Config) -> Config:
    """The config of the shared experts' dense MLP (width shared_experts * expert width)."""
    return cfg.replace(d_ff=cfg.shared_experts * expert_width(cfg), num_experts=0, **_NO_MOE)


_NO_MOE = dict(moe_d_ff=None, router="softmax", router_bias=False, router_score_bias=False,
               router_groups=1, router_topk_groups=1, routed_scaling=1.0, shared_experts=0,
               dense_layers=(), swiglu_limit=None)


def moe_spec(cfg: Config) -> Spec:
    """router [D, E] (+ router_bias [E], score_bias [E]); experts wi, wg [E, D, F], wo
    [E, F, D] (+ biases bi, bg [E, F], bo [E, D] with mlp_bias); shared: a dense MLP."""
    d, f, e = cfg.d_model, expert_width(cfg), cfg.num_experts
    std_in = init_std(cfg, "in", d)
    spec = {
        "router": param((d, e), ("embed", None), std=init_std(cfg, "dense", d)),
        "wi": param((e, d, f), ("experts", "embed", "mlp"), std=std_in),
        "wo": param((e, f, d), ("experts", "mlp", "embed"), std=init_std(cfg, "out", f)),
    }
    if cfg.gated:
        spec["wg"] = param((e, d, f), ("experts", "embed", "mlp"), std=std_in)
    if cfg.router_bias:
        spec["router_bias"] = param((e,), (None,), "zeros")
    if cfg.router_score_bias:
        spec["score_bias"] = param((e,), (None,), "zeros")
    if cfg.mlp_bias:
        spec["bi"] = param((e, f), ("experts", "mlp"), "zeros")
        spec["bo"] = param((e, d), ("experts", "embed"), "zeros")
        if cfg.gated:
            spec["bg"] = param((e, f), ("experts", "mlp"), "zeros")
    if cfg.shared_experts:
        spec["shared"] = mlp_spec(shared_config(cfg))
    return spec


# --- routing ------------------------------------------------------------------------------
class Routing(NamedTuple):
    """weights [..., k] fp32: the factor of each chosen expert's output; chosen [..., k]
    int32 expert ids; scores [..., E] fp32: the router's scores (for the balance loss)."""

    weights: jax.Array
    chosen: jax.Array
    scores: jax.Array


def route(logits: jax.Array, cfg: Config, score_bias: jax.Array | None = None) -> Routing:
    """router logits [..., E] -> Routing under cfg's router settings. score_bias [E] shifts
    the scores for the choice only and gets no gradient (DeepSeek-V3)."""
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if cfg.router == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if score_bias is None else scores + jax.lax.stop_gradient(score_bias.astype(jnp.float32))
    if cfg.router_groups > 1:
        choice = _limit_groups(choice, cfg)
    _, chosen = jax.lax.top_k(choice, cfg.experts_per_token)
    weights = jnp.take_along_axis(scores, chosen, axis=-1)
    if cfg.router_norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights * cfg.routed_scaling, chosen.astype(jnp.int32), scores)


def _limit_groups(choice: jax.Array, cfg: Config) -> jax.Array:
    """choice [..., E] with every expert outside the token's best router_topk_groups groups
    at -inf. A group's score: its best expert (DeepSeek-V2, softmax) or the sum of its best
    two (DeepSeek-V3, sigmoid)."""
    g = cfg.router_groups
    grouped = choice.reshape(*choice.shape[:-1], g, choice.shape[-1] // g)
    if cfg.router == "sigmoid":
        group_score = jnp.sum(jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0], axis=-1)
    else:
        group_score = jnp.max(grouped, axis=-1)
    _, best = jax.lax.top_k(group_score, cfg.router_topk_groups)
    keep = jnp.any(best[..., :, None] == jnp.arange(g), axis=-2)  # [..., g]
    return jnp.where(keep[..., None], grouped, -jnp.inf).reshape(choice.shape)


@jax.custom_vjp
def load_probe(score_bias: jax.Array, load: jax.Array) -> jax.Array:
    """A scalar 0 whose "gradient" with respect to score_bias [E] is load [E]: added to the
    balance loss, it carries each layer's expert load out of the forward in the gradient of
    its score_bias (which the router's choice does not differentiate), where the training
    option `train.balance` reads it and moves the bias (DeepSeek-V3's aux-loss-free
    balancing) instead of the optimizer."""
    return jnp.zeros((), jnp.float32)


load_probe.defvjp(lambda bias, load: (jnp.zeros((), jnp.float32), load),
                  lambda load, _: (load, jnp.zeros_like(load)))


def expert_load(chosen: jax.Array, num_experts: int) -> jax.Array:
    """chosen [..., k] -> [E] fp32: the share of the routed slots each expert got (sums to 1)."""
    counts = jnp.zeros((num_experts,), jnp.float32).at[chosen.reshape(-1)].add(1.0)
    return counts / chosen.size


def balance_loss(scores: jax.Array, chosen: jax.Array, num_experts: int) -> jax.Array:
    """Switch's E * sum_e(share of routed slots on e * mean router probability of e); 1.0
    when uniform. Sigmoid scores are normalised per token first (DeepSeek-V3's form)."""
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    mean_prob = jnp.mean(probs.reshape(-1, num_experts), axis=0)
    return num_experts * jnp.sum(expert_load(chosen, num_experts) * mean_prob)


# --- the experts --------------------------------------------------------------------------
def _gate(g: jax.Array, h: jax.Array, cfg: Config) -> jax.Array:
    """The gated activation act(g) * h; with swiglu_limit gpt-oss's clamped form."""
    if cfg.swiglu_limit is None:
        return activation(cfg.activation)(g) * h
    g = jnp.minimum(g, cfg.swiglu_limit)
    h = jnp.clip(h, -cfg.swiglu_limit, cfg.swiglu_limit)
    return g * jax.nn.sigmoid(SWIGLU_ALPHA * g) * (h + 1)


def apply_moe(p: dict, x: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """x: [B, T, D] -> (y [B, T, D], balance loss scalar)."""
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), p["router"].astype(jnp.float32))
    if "router_bias" in p:
        logits = logits + p["router_bias"].astype(jnp.float32)
    r = route(logits, cfg, p.get("score_bias"))
    if cfg.moe_dispatch == "dense":
        y = _dense(p, x, r, cfg)
    else:
        split = _expert_split(p, x, cfg)
        y = _sparse(p, x, r, cfg) if split is None else _over_experts(p, x, r, cfg, split)
    if "shared" in p:
        y = y + apply_mlp(p["shared"], x, cfg)
    aux = balance_loss(r.scores, r.chosen, cfg.num_experts)
    if "score_bias" in p:
        aux = aux + load_probe(p["score_bias"], expert_load(r.chosen, cfg.num_experts))
    return y, aux


def _dense(p: dict, x: jax.Array, r: Routing, cfg: Config) -> jax.Array:
    """Every expert on every token; the gates [B, T, E] keep the chosen k."""
    dt = x.dtype
    gates = jnp.sum(jax.nn.one_hot(r.chosen, cfg.num_experts, dtype=jnp.float32) * r.weights[..., None], axis=-2)
    h = jnp.einsum("btd,edf->btef", x, dequantize(p["wi"], dt)) + _bias(p, "bi", dt)
    if cfg.gated:
        h = _gate(jnp.einsum("btd,edf->btef", x, dequantize(p["wg"], dt)) + _bias(p, "bg", dt), h, cfg)
    else:
        h = activation(cfg.activation)(h)
    h = constrain(h, ("batch", "length", "experts", "mlp"))
    y = jnp.einsum("btef,efd,bte->btd", h, dequantize(p["wo"], dt), gates.astype(dt))
    if "bo" in p:
        y = y + jnp.einsum("bte,ed->btd", gates.astype(dt), p["bo"].astype(dt))
    return y


def _bias(p: dict, name: str, dt) -> jax.Array | float:
    return p[name].astype(dt) if name in p else 0.0


def _sparse(p: dict, x: jax.Array, r: Routing, cfg: Config) -> jax.Array:
    """The N*k assignments sorted by expert, each expert's rows through its weights only."""
    b, t, d = x.shape
    k = cfg.experts_per_token
    expert = r.chosen.reshape(-1)  # [N*k], assignment j belongs to token j // k
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.zeros((cfg.num_experts,), jnp.int32).at[expert].add(1)
    out = _experts(p, x.reshape(b * t, d)[order // k], sizes, expert[order], cfg)
    out = out * r.weights.reshape(-1)[order][:, None].astype(x.dtype)
    y = jnp.zeros((b * t, d), x.dtype).at[order // k].add(out)
    return y.reshape(b, t, d)


def _experts(p: dict, rows: jax.Array, sizes: jax.Array, expert: jax.Array, cfg: Config,
             expected_rows: int | None = None, reduce: tuple[str, ...] = ()) -> jax.Array:
    """rows [M, D] sorted by expert (sizes [G] int32; rows past their sum are padding),
    expert [M] each row's expert in [0, G) -> each row through its expert's MLP [M, D].
    expected_rows: the rows in use for the tile kernel's height (default M); reduce: mesh
    axes the experts' width is split over inside a shard_map (summed before the output bias)."""
    dt = rows.dtype

    def project(h: jax.Array, w: str, bias: str | None) -> jax.Array:
        weight = p[w] if is_quantized(p[w]) else p[w].astype(dt)
        y = grouped_matmul(h, weight, sizes, cfg.grouped_matmul, cfg.matmul, expected_rows)
        return y + p[bias].astype(dt)[expert] if bias in p else y

    h = project(rows, "wi", "bi")
    h = _gate(project(rows, "wg", "bg"), h, cfg) if cfg.gated else activation(cfg.activation)(h)
    y = project(h, "wo", None)
    if reduce:
        y = jax.lax.psum(y, reduce)
    return y + p["bo"].astype(dt)[expert] if "bo" in p else y


# --- expert parallelism -------------------------------------------------------------------
ROUTED = ("wi", "wg", "wo", "bi", "bg", "bo")  # the experts' own tensors, split on `expert`


class _Split(NamedTuple):
    """How `_over_experts` maps onto the active mesh: the shard_map's mesh, the specs of the
    tokens [B, T, ...] and of each routed tensor, the expert axis's size, and the mesh axes
    the experts' width (`mlp`) is split over."""

    mesh: jax.sharding.Mesh
    tokens: jax.sharding.PartitionSpec
    weights: dict
    devices: int
    width_axes: tuple[str, ...]


def _expert_split(p: dict, x: jax.Array, cfg: Config) -> _Split | None:
    """The split of `_over_experts` when cfg.expert_parallel is "all_to_all" and the active
    mesh puts the experts' axis on an `expert` mesh axis of size > 1 alone (None: run the
    sparse dispatch as one program and let XLA's partitioner place it). The weights keep
    their expert and width splits; `embed` (fsdp) is gathered, as FSDP does before a matmul."""
    mesh = active_mesh()
    if cfg.expert_parallel != "all_to_all" or mesh is None or mesh.shape.get("expert", 1) == 1:
        return None
    rules, spec = active_rules(), moe_spec(cfg)
    with warnings.catch_warnings():  # a dim the mesh cannot split stays whole, as in `constrain`
        warnings.simplefilter("ignore")
        axes = {name: tuple(None if a == "embed" else a for a in spec[name].axes)
                for name in ROUTED if name in p}
        weights = {name: spec_for(a, p[name].shape, mesh, rules) for name, a in axes.items()}
        tokens = spec_for(("batch", "length"), x.shape[:2], mesh, rules)
        if weights["wi"][0] != "expert":
            return None
        width = weights["wi"][2]
        for name in weights:  # a QuantizedWeight: its q and scale split as their own axes say
            if is_quantized(p[name]):
                w, (q_axes, scale_axes) = p[name], p[name].axes(axes[name])
                q = spec_for(q_axes, w.q.shape, mesh, rules)
                scale = spec_for(scale_axes, w.scale.shape, mesh, rules)
                if w.scale.shape[-1] > 1 and q[-1] != scale[-1]:  # each block must hold whole groups
                    raise ValueError(f"quantize: {name}'s {w.scale.shape[-1]} scale groups do not split "
                                     f"over the mesh axes {q[-1]} of its inputs; pick a group_size "
                                     "that makes them divide (or bits=8 without group_size)")
                weights[name] = dataclasses.replace(w, q=q, scale=scale)
    width_axes = () if width is None else (width,) if isinstance(width, str) else tuple(width)
    return _Split(mesh, tokens, weights, mesh.shape["expert"], width_axes)


def _over_experts(p: dict, x: jax.Array, r: Routing, cfg: Config, split: _Split) -> jax.Array:
    """The sparse dispatch with tokens x [B, T, D] and the routed experts split over the
    `expert` mesh axis: `_exchange` on every device, under shard_map -> y [B, T, D].

    check_vma=False: the tile kernel's lax.cond branches differ in the axes they vary over;
    the cotangents of inputs a device shares (the weights over `data`, the tokens over
    `tensor`) are still summed over the axes their specs leave out."""
    routed = {name: p[name] for name in split.weights}
    token_spec = jax.sharding.PartitionSpec(*split.tokens, None)
    run = jax.shard_map(functools.partial(_exchange, cfg=cfg, devices=split.devices, reduce=split.width_axes),
                        mesh=split.mesh, in_specs=(split.weights, token_spec, token_spec, token_spec),
                        out_specs=token_spec, check_vma=False)
    return run(routed, x, r.weights, r.chosen)


def _exchange(p: dict, x: jax.Array, weights: jax.Array, chosen: jax.Array, *, cfg: Config,
              devices: int, reduce: tuple[str, ...]) -> jax.Array:
    """One device's part: its tokens x [b, t, D] with their gates and experts [b, t, k], its
    experts' tensors ([E / devices, ...]) -> y [b, t, D].

    Assignments go out in a buffer [devices, C, D], block j for the device holding experts
    [j * E/devices, (j+1) * E/devices), each block the assignments to that device in expert
    order and zeros after them; C = tokens * min(k, E/devices), what one device can be sent
    by one other when each token picks k distinct experts. A second buffer carries each
    row's local expert (E/devices on padding). The same slots bring the results back."""
    p = {name: shard_view(w) for name, w in p.items()}  # quantized: shapes of this device's block
    b, t, d = x.shape
    k, n = cfg.experts_per_token, b * t
    owned = cfg.num_experts // devices  # experts per device
    cap = n * min(k, owned)
    expert = chosen.reshape(-1)  # [n*k], assignment j belongs to token j // k
    order = jnp.argsort(expert, stable=True)
    sent = jnp.zeros((devices,), jnp.int32).at[expert // owned].add(1)  # per receiving device
    slot = (jnp.cumsum(sent) - sent)[:, None] + jnp.arange(cap)  # [devices, C]: sorted index
    valid = jnp.arange(cap) < sent[:, None]
    pick = order[jnp.where(valid, slot, 0)]  # the assignment in each slot
    token = pick // k
    rows = jnp.where(valid[..., None], x.reshape(n, d)[token], 0)
    ids = jnp.where(valid, expert[pick] % owned, owned)
    swap = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0)
    out = _local_experts(p, swap(rows).reshape(devices * cap, d), swap(ids).reshape(-1), cfg, owned,
                         n * k, reduce)
    out = swap(out.reshape(devices, cap, d))
    gate = jnp.where(valid, weights.reshape(-1)[pick], 0).astype(x.dtype)
    y = jnp.zeros((n, d), x.dtype).at[token].add(out * gate[..., None])
    return y.reshape(b, t, d)


def _local_experts(p: dict, rows: jax.Array, ids: jax.Array, cfg: Config, local: int,
                   expected_rows: int, reduce: tuple[str, ...]) -> jax.Array:
    """Received rows [M, D] with their local expert ids [M] (`local`: padding) through
    those experts, in the order received -> [M, D] (padding rows: not meaningful)."""
    order = jnp.argsort(ids, stable=True)  # padding last
    sizes = jnp.zeros((local,), jnp.int32).at[ids].add(1, mode="drop")
    expert = jnp.minimum(ids[order], local - 1)  # a bias row for the padding too (its gate is 0)
    out = _experts(p, rows[order], sizes, expert, cfg, expected_rows, reduce)
    return out[jnp.argsort(order)]


# --- grouped matmul -----------------------------------------------------------------------
def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, kernel: str = "ragged",
                   mode: str = "xla", expected_rows: int | None = None) -> jax.Array:
    """x [M, K] (rows sorted by group, sizes [G] int32 summing to M or less: the rows past
    their sum are padding and give zeros) times w [G, K, F]: each group's rows by its own
    matrix -> [M, F]. kernel: `Config.grouped_matmul` ("auto" is "ragged" here); mode:
    `Config.matmul`; expected_rows: how many rows are in use, for the tile kernel's height
    (default M). w may be a `zoo.nn.quant.QuantizedWeight` (lead dim G): "tiles"
    dequantizes each tile's matrix inside its scan, "ragged" the whole w before ragged_dot."""
    accumulate = x.dtype == jnp.bfloat16 and mode == "f32_accumulate"
    out_type = jnp.float32 if accumulate else None
    if kernel == "tiles":
        y = _tiled(x, w, sizes, out_type, expected_rows or x.shape[0])
    else:
        x, w = tie(x, w)  # dequantized per call, not hoisted out of a decoding loop
        y = jax.lax.ragged_dot(x, dequantize(w, x.dtype), sizes, preferred_element_type=out_type)
    return y.astype(x.dtype)


def tile_rows(rows: int, groups: int) -> int:
    """The tile height of `_tiled`: a power of two near a group's average rows, in [8, 256]:
    taller tiles run faster on a CPU, and the padding (under one tile per group) stays
    within the rows."""
    target = max(1, rows // groups)
    return int(min(256, max(8, 2 ** int(math.log2(target)))))


def _tiled(x: jax.Array, w: jax.Array, sizes: jax.Array, out_type, expected_rows: int) -> jax.Array:
    """grouped_matmul as a scan over tiles of m rows that each belong to one group: every
    group's rows are padded to whole tiles, the scan multiplies each used tile by its
    group's matrix and skips the unused ones (`lax.cond`). Costs the rows plus under one
    tile of padding per group, whatever the number of groups. Rows past the groups go
    nowhere (an index past the tiles, dropped) and read back as zeros."""
    (n, kdim), (g, _, f) = x.shape, w.shape
    m = tile_rows(expected_rows, g)
    tiles = -(-n // m) + min(g, n)  # static bound: ceil(n/m) full tiles + one partial per group
    padded = (sizes + m - 1) // m * m
    pad_end = jnp.cumsum(padded)
    group = jnp.repeat(jnp.arange(g), sizes, total_repeat_length=n)  # group of each row
    dest = pad_end[group] - padded[group] + jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[group]
    dest = jnp.where(jnp.arange(n) < jnp.sum(sizes), dest, tiles * m)
    xt = jnp.zeros((tiles * m, kdim), x.dtype).at[dest].set(x, mode="drop").reshape(tiles, m, kdim)
    tile_group = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(tiles) * m, side="right"), g - 1)
    if is_quantized(w):  # inference: no hand-written VJP (jax.grad refuses int8 q anyway)
        y = _tile_forward(xt, w, tile_group, pad_end[-1] // m, out_type)
    else:
        y = _tile_products(xt, w, tile_group, pad_end[-1] // m, out_type)
    return y.reshape(tiles * m, f).at[dest].get(mode="fill", fill_value=0)


def _dot(a: jax.Array, b: jax.Array, out_type, dims=((1,), (0,))) -> jax.Array:
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=out_type).astype(out_type or a.dtype)


def _tile_forward(xt: jax.Array, w: jax.Array, tile_group: jax.Array, used: jax.Array, out_type) -> jax.Array:
    """xt [T, m, K] -> [T, m, F]: tile t by w[tile_group[t]], zeros from tile `used` on (a
    quantized w: that expert's matrix dequantized in the tile's step)."""
    zero = jnp.zeros((xt.shape[1], w.shape[2]), out_type or xt.dtype)

    def matrix(gid: jax.Array) -> jax.Array:
        if not is_quantized(w):
            return w[gid]
        return dequantize(jax.tree.map(lambda a: a[gid], w), xt.dtype)

    def body(_, xs):
        i, rows, gid = xs
        return None, jax.lax.cond(i < used, lambda: _dot(rows, matrix(gid), out_type), lambda: zero)

    return jax.lax.scan(body, None, (jnp.arange(xt.shape[0]), xt, tile_group))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tile_products(xt, w, tile_group, used, out_type):
    return _tile_forward(xt, w, tile_group, used, out_type)


def _tile_products_fwd(xt, w, tile_group, used, out_type):
    return _tile_forward(xt, w, tile_group, used, out_type), (xt, w, tile_group, used)


def _tile_products_bwd(out_type, res, dy):
    """The weight gradient accumulates in the scan's carry, one group's [K, F] slice updated
    in place per tile (autodiff of `w[gid]` inside the scan would add a full [G, K, F]
    array per tile)."""
    xt, w, tile_group, used = res
    zero_dx = jnp.zeros(xt.shape[1:], xt.dtype)

    def body(dw, xs):
        i, rows, gid, dyt = xs

        def run(dw):
            slab = jax.lax.dynamic_index_in_dim(dw, gid, keepdims=False)
            slab = slab + _dot(rows, dyt.astype(rows.dtype), jnp.float32, ((0,), (0,)))
            dx = _dot(dyt.astype(rows.dtype), w[gid], out_type, ((1,), (1,))).astype(xt.dtype)
            return jax.lax.dynamic_update_index_in_dim(dw, slab, gid, 0), dx

        return jax.lax.cond(i < used, run, lambda dw: (dw, zero_dx), dw)

    dw, dx = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (jnp.arange(xt.shape[0]), xt, tile_group, dy))
    return dx, dw.astype(w.dtype), None, None


_tile_products.defvjp(_tile_products_fwd, _tile_products_bwd)
