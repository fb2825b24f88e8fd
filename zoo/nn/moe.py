"""Mixture of experts: top-k routing over `num_experts` MLPs, with the Switch-style
load-balancing loss returned to the caller.

Every expert runs on every token and the gate zeroes the unselected ones. That is exact (no
capacity, no dropped tokens, the same numbers as Mixtral), works under vmap/grad/pmap and
shards over the `experts` mesh axis as a plain einsum; it costs num_experts/k times the
FLOPs of a sorted dispatch (`jax.lax.ragged_dot`). MFU counts only the routed experts
(`zoo.flops`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.mlp import activation
from zoo.nn.param import Spec, init_std, param
from zoo.sharding import constrain


def moe_spec(cfg: Config) -> Spec:
    d, f, e = cfg.d_model, cfg.d_ff, cfg.num_experts
    std_in = init_std(cfg, "in", d)
    spec = {
        "router": param((d, e), ("embed", None), std=init_std(cfg, "dense", d)),
        "wi": param((e, d, f), ("experts", "embed", "mlp"), std=std_in),
        "wo": param((e, f, d), ("experts", "mlp", "embed"), std=init_std(cfg, "out", f)),
    }
    if cfg.gated:
        spec["wg"] = param((e, d, f), ("experts", "embed", "mlp"), std=std_in)
    return spec


def route(router_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """router_logits [..., E] -> (gates [..., E] with k non-zeros summing to 1,
    chosen [..., k] expert ids, probs [..., E] full softmax)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top, chosen = jax.lax.top_k(probs, k)
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    gates = jnp.sum(jax.nn.one_hot(chosen, probs.shape[-1], dtype=probs.dtype) * top[..., None], axis=-2)
    return gates, chosen, probs


def balance_loss(probs: jax.Array, chosen: jax.Array, num_experts: int) -> jax.Array:
    """E * sum_e(fraction of routed slots on e * mean router prob of e); 1.0 when uniform."""
    counts = jnp.mean(jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=-2),
                      axis=tuple(range(chosen.ndim - 1)))
    fraction = counts / chosen.shape[-1]
    mean_prob = jnp.mean(probs, axis=tuple(range(probs.ndim - 1)))
    return num_experts * jnp.sum(fraction * mean_prob)


def apply_moe(p: dict, x: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """x: [B, T, D] -> (y [B, T, D], balance loss scalar)."""
    dt = x.dtype
    gates, chosen, probs = route(x @ p["router"].astype(dt), cfg.experts_per_token)
    act = activation(cfg.activation)
    h = jnp.einsum("btd,edf->btef", x, p["wi"].astype(dt))
    if cfg.gated:
        h = act(jnp.einsum("btd,edf->btef", x, p["wg"].astype(dt))) * h
    else:
        h = act(h)
    h = constrain(h, ("batch", "length", "experts", "mlp"))
    y = jnp.einsum("btef,efd,bte->btd", h, p["wo"].astype(dt), gates.astype(dt))
    return y, balance_loss(probs, chosen, cfg.num_experts)
