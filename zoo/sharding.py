"""Logical axis names -> mesh axes.

Every parameter and activation carries logical axis names (`zoo.axes(cfg)` for params,
`constrain(x, names)` inside the models). One rule table maps them to the mesh axes
`data`, `fsdp`, `tensor`, `expert` and `context`. Meshes use Auto axis types, so constraints
are hints to XLA's partitioner and the models need no explicit resharding code.

`context` (sequence parallelism) splits the activations' `length` axis; a mesh has it only
when it is asked for (`make_mesh({"data": 2, "context": 4})`), so other meshes are as before.
Attention keeps its queries split and gathers keys and values whole (`zoo.nn.attention`).

    mesh = zoo.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with zoo.sharding.use(mesh):
        shardings = zoo.sharding.tree_shardings(zoo.axes(cfg), mesh, jax.eval_shape(...))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import warnings
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from zoo.nn.quant import QuantizedWeight

MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")
_ALWAYS = MESH_AXES[:4]  # every mesh has these (size 1 when not asked for); context only when asked
Rules = tuple[tuple[str, Any], ...]

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("experts", "expert"),
    ("layers", None),
    ("length", "context"),  # activations' sequence axis (and the learned position table's rows)
    ("head_dim", None),
    ("norm", None),
    ("types", None),
    ("buckets", None),
)

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "zoo_sharding", default=None)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes data, fsdp, tensor, expert (and
    context, only when `shape` names it).

    `shape` gives sizes by name; one size may be -1 (the rest); missing axes get 1.
    Default: every device on `data`."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown}; expected names from {MESH_AXES}")
    names = MESH_AXES if "context" in shape else _ALWAYS
    sizes = {a: int(shape.get(a, 1)) for a in names}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by {known}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
                         f"but there are {len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in names))
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


@contextlib.contextmanager
def use(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context, `constrain` places activations on `mesh` by `rules`."""
    token = _CONTEXT.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def spec_for(logical: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
             rules: Rules = DEFAULT_RULES) -> P:
    """PartitionSpec for one array. A mesh axis used twice, or whose size does not divide
    the dimension, is dropped (that dim is replicated) with a warning."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and shape is not None and shape[i] % size:
            # Try a prefix of the axes before giving up on the dim.
            while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = axes[:-1]
            warnings.warn(f"sharding: dim {i} ({name}) of size {shape[i]} does not divide over "
                          f"mesh axes {target}; using {axes or 'replication'}", stacklevel=3)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def tree_shardings(axes_tree: Any, mesh: Mesh, shapes: Any | None = None,
                   rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of logical-axis tuples (`zoo.axes(cfg)`); `shapes` is the
    matching tree of arrays or ShapeDtypeStructs, used to check divisibility. Where shapes
    holds a `zoo.nn.quant.QuantizedWeight` (`zoo.quantize`), its q and scale get the
    weight's logical axes in their own order (`QuantizedWeight.axes`)."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    if shapes is None:
        return jax.tree.map(lambda a: NamedSharding(mesh, spec_for(a, None, mesh, rules)),
                            axes_tree, is_leaf=is_axes)
    def one(a: tuple, s: Any) -> Any:
        if isinstance(s, QuantizedWeight):
            q_axes, scale_axes = s.axes(a)
            return dataclasses.replace(s, q=NamedSharding(mesh, spec_for(q_axes, s.q.shape, mesh, rules)),
                                       scale=NamedSharding(mesh, spec_for(scale_axes, s.scale.shape, mesh, rules)))
        return NamedSharding(mesh, spec_for(a, s.shape, mesh, rules))

    return jax.tree.map(one, axes_tree, shapes, is_leaf=is_axes)


def active_devices() -> int:
    """Devices of the mesh set by `use` (1 outside it)."""
    context = _CONTEXT.get()
    return 1 if context is None else context[0].size


def active_mesh() -> Mesh | None:
    """The mesh set by `use` (None outside it)."""
    context = _CONTEXT.get()
    return None if context is None else context[0]


def active_rules() -> Rules:
    """The rules set by `use` (DEFAULT_RULES outside it)."""
    context = _CONTEXT.get()
    return DEFAULT_RULES if context is None else context[1]


def context_size(mesh: Mesh | None = None) -> int:
    """How many ways the sequence is split: the `context` axis of `mesh` (default: the mesh
    set by `use`), 1 without one."""
    if mesh is None:
        context = _CONTEXT.get()
        mesh = None if context is None else context[0]
    return 1 if mesh is None else int(mesh.shape.get("context", 1))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation by logical names; a no-op outside `use(mesh)`."""
    context = _CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = spec_for(logical, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
