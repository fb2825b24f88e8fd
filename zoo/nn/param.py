"""Parameter declarations: shape, logical axes and initializer, next to each other.

Every block in `zoo.nn` declares its parameters as a nested dict of `Param`s. The same
declaration gives the initialized arrays (`materialize`), the logical axis names
(`logical_axes`) and the parameter count, so shapes and shardings cannot drift apart.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zoo.config import Config

Spec = dict[str, Any]  # nested dict whose leaves are Param


class Param(NamedTuple):
    """One tensor: its shape, one logical axis name per dim, and how to initialize it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"  # normal | zeros | ones
    std: float = 0.02


def param(shape: tuple[int, ...], axes: tuple[str, ...], init: str = "normal", std: float = 0.02) -> Param:
    if len(shape) != len(axes):
        raise ValueError(f"param: shape {shape} and axes {axes} differ in rank")
    return Param(tuple(int(s) for s in shape), tuple(axes), init, std)


# Roles of randomly initialised tensors, for `init_std`.
ROLES = ("embed", "q", "kv", "out", "in", "head", "dense", "rel_bias")


def init_std(cfg: Config, role: str, fan_in: int) -> float:
    """Standard deviation of a normal-initialised tensor under `cfg.initializer`, the
    published scheme of each model family (as transformers' `_init_weights` writes it):

    - "normal" (BERT, RoBERTa, BART, Llama, Mistral, Mixtral): N(0, 0.02) everywhere.
    - "gpt2": N(0, 0.02), except the projections that add into the residual stream
      (role "out": attention output, MLP/expert output), 0.02 / sqrt(2 * num_layers), the
      GPT-2 paper's scaling for the 2 residual branches per layer.
    - "t5" (Mesh TensorFlow's T5): fan-in scaling, 1 / sqrt(fan_in) for every projection;
      the query also by 1 / sqrt(head_dim), because T5 attends without the 1/sqrt(head_dim)
      score scale (attn_scale=1.0); token embeddings N(0, 1); the relative bias table
      1 / sqrt(d_model). An untied vocabulary head is fan-in scaled like the other
      projections (transformers' T5 uses N(0, 1) there, which starts with logits of
      scale sqrt(d_model)).

    role: one of ROLES ("in": MLP/expert input and gate; "out": a projection into the
    residual stream; "dense": pooler, MLM transform, router, task heads); fan_in: the
    number of inputs summed per output (the contracted size)."""
    if role not in ROLES:
        raise ValueError(f"init_std: role must be one of {ROLES}, got {role!r}")
    if cfg.initializer == "t5":
        if role == "embed":
            return 1.0
        if role == "q":
            return (fan_in * cfg.head_size) ** -0.5
        return fan_in ** -0.5
    if cfg.initializer == "gpt2" and role == "out":
        return 0.02 / math.sqrt(2 * cfg.num_layers)
    return 0.02


def _is_param(x: Any) -> bool:
    return isinstance(x, Param)


def stacked(spec: Spec, n: int) -> Spec:
    """Prepends a `layers` axis of size n to every parameter (for `lax.scan`)."""
    return jax.tree.map(lambda p: p._replace(shape=(n, *p.shape), axes=("layers", *p.axes)),
                        spec, is_leaf=_is_param)


def materialize(spec: Spec, key: jax.Array, dtype: Any) -> dict[str, Any]:
    """Initializes every Param. Each tensor's key is derived from its path, so adding a
    parameter elsewhere never changes the values of the others."""

    def init_one(path: tuple, p: Param) -> jax.Array:
        name = jax.tree_util.keystr(path)
        k = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        if p.init == "zeros":
            return jnp.zeros(p.shape, dtype)
        if p.init == "ones":
            return jnp.ones(p.shape, dtype)
        return (p.std * jax.random.normal(k, p.shape, jnp.float32)).astype(dtype)

    return jax.tree_util.tree_map_with_path(init_one, spec, is_leaf=_is_param)


def logical_axes(spec: Spec) -> dict[str, Any]:
    """The same tree with each leaf replaced by its tuple of logical axis names."""
    return jax.tree.map(lambda p: p.axes, spec, is_leaf=_is_param)


def size(p: Param, routed: tuple[int, int] | None = None) -> int:
    """Scalars in one declaration. routed (k, E): a tensor with an "experts" axis counts
    only the k of its E experts that one token is routed to."""
    n = math.prod(p.shape)
    if routed is not None and "experts" in p.axes:
        n = n // routed[1] * routed[0]
    return n


def count(spec: Spec, routed: tuple[int, int] | None = None) -> int:
    """Total number of scalars declared (routed: see `size`)."""
    return sum(size(p, routed) for p in jax.tree.leaves(spec, is_leaf=_is_param))
