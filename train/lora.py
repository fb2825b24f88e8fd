"""Low-rank adapters (LoRA) for fine-tuning: `Hparams.lora_rank > 0` adds, next to each target
weight W, a pair A, B of rank r under params["lora"] (the same path), and the step trains only
them (and a task head) while W stays frozen:

    W' = W + (alpha / r) * A @ B        A [..., in, r] (random), B [..., r, out] (zeros)

The model never sees the adapters: `merged` folds them into the weights before the forward
pass (one small matmul per target per step, the same program as full fine-tuning after it),
so every model type, layer stack and mesh takes them unchanged, and export writes W'. The
frozen weights pass through `stop_gradient`, so their gradients are never computed, and the
optimizer (train/optim.py) holds moments for the adapters and the head only.

A target is named by its leaf (`q`, `k`, `v`, `o` of attention, self and cross, by default;
`wi`, `wg`, `wo` of the MLP); its input and output axes follow from its logical axes: the
model axis `embed` is the input when it comes first (q, k, v, wi, wg) and the output when it
comes last (o, wo); leading `layers` / `expert` axes are stacks, each slice its own adapter.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

LORA = "lora"  # the params key of the adapters
TARGETS = ("q", "k", "v", "o")
_STACKS = ("layers", "expert")


def _split(axes: tuple) -> tuple[int, int, int] | None:
    """(stacked, in, out) axis counts of a weight's logical axes, None if it has no `embed`
    at either end of its non-stacked axes."""
    lead = 0
    while lead < len(axes) and axes[lead] in _STACKS:
        lead += 1
    rest = axes[lead:]
    if len(rest) < 2 or "embed" not in (rest[0], rest[-1]):
        return None
    return (lead, 1, len(rest) - 1) if rest[0] == "embed" else (lead, len(rest) - 1, 1)


def _targets(axes: Any, targets: tuple[str, ...]) -> dict[tuple, tuple]:
    """{path of a target weight: its logical axes} over a params' logical-axes tree."""
    found = {}
    for path, ax in jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in targets and isinstance(ax, tuple) and _split(ax) is not None:
            found[tuple(str(getattr(k, "key", k)) for k in path)] = ax
    return found


def _nest(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def check_targets(axes: Any, targets: tuple[str, ...]) -> None:
    """ValueError naming the weights LoRA can adapt when `targets` matches none of a model's."""
    if not _targets(axes, targets):
        names = sorted({p[-1] for p in _targets(axes, ("q", "k", "v", "o", "wi", "wg", "wo", "q_a", "q_b",
                                                        "kv_a", "kv_b"))})
        raise ValueError(f"--lora-targets {','.join(targets)}: no weight of this model has those names; "
                         f"adaptable: {names}")


def adapter_axes(axes: Any, targets: tuple[str, ...]) -> dict:
    """The logical axes of the adapters: A (*stack, *in, None), B (*stack, None, *out)."""
    out = {}
    for path, ax in _targets(axes, targets).items():
        lead, n_in, _ = _split(ax)
        out[path] = {"a": (*ax[:lead + n_in], None), "b": (*ax[:lead], None, *ax[lead + n_in:])}
    return _nest(out)


def init(params: dict, axes: Any, targets: tuple[str, ...], rank: int, key: jax.Array) -> dict:
    """Adapters for the targets of `params` (their shapes and dtypes): A ~ N(0, 1/in), B = 0,
    so W' = W at step 0."""
    out = {}
    found = _targets(axes, targets)
    keys = jax.random.split(key, max(len(found), 1))
    for k, (path, ax) in zip(keys, sorted(found.items())):
        w = params
        for name in path:
            w = w[name]
        lead, n_in, _ = _split(ax)
        shape_in, shape_out = w.shape[:lead + n_in], w.shape[lead + n_in:]
        fan_in = math.prod(w.shape[lead:lead + n_in])
        a = jax.random.normal(k, (*shape_in, rank), jnp.float32) / math.sqrt(fan_in)
        b = jnp.zeros((*w.shape[:lead], rank, *shape_out), jnp.float32)
        out[path] = {"a": a.astype(w.dtype), "b": b.astype(w.dtype)}
    return _nest(out)


def merged(params: dict, alpha: float) -> dict:
    """The model's params with each adapter folded in (W + alpha / r * A @ B), the rest of the
    model frozen (stop_gradient); params without adapters come back unchanged."""
    if LORA not in params:
        return params
    adapters = params[LORA]
    frozen = jax.tree.map(jax.lax.stop_gradient, {k: v for k, v in params.items() if k != LORA})

    def fold(base: Any, adapter: Any) -> Any:
        if isinstance(adapter, dict) and set(adapter) == {"a", "b"}:
            return _fold(base, adapter["a"], adapter["b"], alpha)
        return {k: fold(base[k], adapter[k]) if k in adapter else base[k] for k in base} \
            if isinstance(base, dict) else base

    return fold(frozen, adapters)


def _fold(w: jax.Array, a: jax.Array, b: jax.Array, alpha: float) -> jax.Array:
    rank = a.shape[-1]
    lead = (a.ndim - 1) + (b.ndim - 1) - w.ndim  # stacked axes: a [*stack, *in, r], b [*stack, r, *out]
    stack = w.shape[:lead]
    a2 = a.reshape(*stack, -1, rank).astype(jnp.float32)
    b2 = b.reshape(*stack, rank, -1).astype(jnp.float32)
    delta = jnp.matmul(a2, b2).reshape(w.shape) * (alpha / rank)
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def trainable(axes: dict, head_key: str) -> dict:
    """The optimizer labels of a LoRA state's params, from their logical-axes tree: "train"
    for the adapters and the task head, "frozen" for the rest."""
    label = lambda k: "train" if k in (LORA, head_key) else "frozen"
    return {k: jax.tree.map(lambda _: label(k), v, is_leaf=lambda x: isinstance(x, tuple)) for k, v in axes.items()}
