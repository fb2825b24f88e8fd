"""DeepSeek-V3's auxiliary-loss-free load balancing, as a training option
(`Hparams.score_bias_rate`): after each optimizer step, every MoE layer's selection bias
(`score_bias` [E], `Config.router_score_bias`) moves by rate * sign(mean load - load of the
expert): overloaded experts get picked less, idle ones more. The bias never trains by
gradient; the forward reports each layer's expert load in the gradient of its score_bias
(`zoo.nn.moe.load_probe`), which `split_loads` takes out before the optimizer sees it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _is_bias(path: tuple) -> bool:
    return str(getattr(path[-1], "key", path[-1])) == "score_bias"


def split_loads(grads: Any) -> tuple[Any, Any]:
    """(grads with every score_bias entry zero, the tree of those entries: the loads
    [..., E] the forward reported, None elsewhere)."""
    loads = jax.tree_util.tree_map_with_path(lambda p, g: g if _is_bias(p) else None, grads)
    zeroed = jax.tree_util.tree_map_with_path(lambda p, g: jnp.zeros_like(g) if _is_bias(p) else g, grads)
    return zeroed, loads


def update_score_bias(params: Any, loads: Any, rate: float) -> Any:
    """params with each score_bias [..., E] moved by rate * sign(mean load - load)."""
    if rate == 0.0:
        return params

    def move(bias: jax.Array, load: jax.Array | None) -> jax.Array:
        if load is None:
            return bias
        step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        return (bias + rate * step).astype(bias.dtype)

    return jax.tree.map(move, params, loads, is_leaf=lambda x: x is None)
