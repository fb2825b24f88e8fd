"""Where the step runs: the pjit path (`jax.jit` with shardings on a Mesh) or the pmap path.

    mesh = build_mesh("data=2,fsdp=2,tensor=2")            # --mesh; -1 takes the rest
                                                            # (context=N: sequence parallelism)
    runner = make_runner(cfg, hp, mesh, batch_like, "jit")  # or "pmap"
    state = runner.init(seed)                               # created in its shardings
    state, metrics = runner.step(state, batch)              # batch: global, in runner.batch_sh

Both paths take and return the same state layout (NamedShardings on the mesh; under pmap
every leaf is replicated) and a global batch sharded on its batch dim, so checkpoints,
evaluation and the loop need not know which one runs. Every check that can fail (mesh
against devices, batch against the data-parallel size, rules) fails in `build_mesh`,
`rules_from` and `make_runner`, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import zoo
from train.optim import Hparams
from train.step import (TrainState, abstract_state, batch_shardings, check_split, init_state,
                        jit_eval_step, jit_step, pmap_eval_step, pmap_step, state_from_params,
                        state_shardings)

PARALLEL = ("jit", "pmap")
Rules = zoo.sharding.Rules


# --- the mesh and the rules ------------------------------------------------------------------

def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}; sizes are positive
    or -1 (the devices left over)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        name = name.strip()
        try:
            value = int(size)
        except ValueError:
            raise ValueError(f"--mesh: expected AXIS=SIZE[,AXIS=SIZE...], got {text!r}") from None
        if name in out:
            raise ValueError(f"--mesh {text}: axis {name!r} is given twice")
        if value == 0 or value < -1:
            raise ValueError(f"--mesh {text}: {name}={value}; sizes are positive, or -1 for the rest")
        out[name] = value
    return out


def build_mesh(text: str) -> Mesh:
    """The mesh `--mesh` asks for, over the first devices its sizes need (all of them when
    a size is -1). With several processes it must span every device of every process."""
    shape = parse_mesh(text)
    devices = jax.devices()
    if all(s > 0 for s in shape.values()):
        need = math.prod(shape.values())
        if need > len(devices):
            raise ValueError(f"--mesh {text}: needs {need} devices, {len(devices)} available "
                             f"({jax.process_count()} process(es) x {jax.local_device_count()})")
        if need < len(devices) and jax.process_count() > 1:
            raise ValueError(f"--mesh {text}: uses {need} of {len(devices)} devices; with "
                             f"{jax.process_count()} processes the mesh must use them all")
        devices = devices[:need]
    return zoo.sharding.make_mesh(shape, devices)


def rules_from(overrides: dict[str, Any] | None) -> Rules:
    """The default rule table with `overrides` ({logical name: mesh axis, list of axes, or
    None}) taking precedence, e.g. {"embed": None, "mlp": ["tensor", "fsdp"]}."""
    extra = []
    for name, target in (overrides or {}).items():
        axes = [target] if isinstance(target, str) else list(target or [])
        bad = [a for a in axes if a not in zoo.sharding.MESH_AXES]
        if bad or not isinstance(target, (str, list, tuple, type(None))):
            raise ValueError(f"rules: {name!r} -> {target!r}; expected a mesh axis from "
                             f"{zoo.sharding.MESH_AXES}, a list of them, or null")
        extra.append((name, target if isinstance(target, (str, type(None))) else tuple(axes)))
    return zoo.sharding.DEFAULT_RULES + tuple(extra)  # later entries win in spec_for


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the logical `batch` axis is split over."""
    target = dict(rules).get("batch")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def data_parallel_size(mesh: Mesh, rules: Rules = zoo.sharding.DEFAULT_RULES) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """(i, n): this process's devices hold rows [i*B/n, (i+1)*B/n) of a global [B, ...]
    array, so its data loader reads just those (n = 1 when the batch is not split across
    processes, e.g. a mesh with only `tensor` across them)."""
    b = shape[0]
    spans = {idx[0].indices(b)[:2] for idx in sharding.addressable_devices_indices_map(shape).values()}
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    if sum(e - s for s, e in spans) != hi - lo or b % (hi - lo):
        raise ValueError(f"mesh {dict(sharding.mesh.shape)}: process {jax.process_index()} holds "
                         f"batch rows {sorted(spans)}, not one block; keep the batch axes "
                         f"(data, fsdp) outermost across processes")
    return lo // (hi - lo), b // (hi - lo)


# --- the runner -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Runner:
    """A model's step and eval step on one mesh, by the pjit or the pmap path.

    state_sh: the state's shardings (a TrainState of NamedShardings); batch_sh: the batch's,
    batch leaves [B, ...] split over the data-parallel axes. Call `step` and `eval_step`
    with global arrays in those shardings."""

    cfg: zoo.Config
    hp: Hparams
    mesh: Mesh
    rules: Rules
    parallel: str
    state_sh: TrainState
    batch_sh: dict[str, NamedSharding]
    shapes: dict[str, tuple[tuple[int, ...], Any]]
    _step: Callable
    _eval: Callable
    _split: Callable | None  # pmap: [B, ...] -> [n, B / n, ...] (global)
    task: Any = None  # a fine-tuning head's static part (TrainState.task)

    def init(self, seed: int, params: Any = None) -> TrainState:
        """A fresh state, created directly in its shardings; `params` (a pretrained body,
        with the task head under "task_head" when the runner has a task): start from them."""
        if params is None:
            init = jax.jit(init_state, static_argnums=(0, 1, 3), out_shardings=self.state_sh)
            return init(self.cfg, self.hp, jax.random.key(seed), self.task)
        rng = jax.random.key_data(jax.random.split(jax.random.key(seed))[1])
        start = jax.jit(state_from_params, static_argnums=(0, 1, 4), out_shardings=self.state_sh)
        given = {k: v for k, v in self.state_sh.params.items() if k in params}  # LoRA adapters start inside
        return start(self.cfg, self.hp, jax.device_put(params, given), rng, self.task)

    def place(self, state: TrainState) -> TrainState:
        """`state` (on any devices or mesh, or on the host) moved into this runner's shardings."""
        return jax.device_put(state, self.state_sh)

    def step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        """(state, batch) -> (state, metrics); the state is donated."""
        self._check(batch)
        if self.parallel == "pmap":
            return self._step(state, self._local(batch))
        with zoo.sharding.use(self.mesh, self.rules):
            return self._step(state, batch)

    def eval_step(self, state: TrainState, batch: dict[str, jax.Array]) -> dict:
        self._check(batch)
        if self.parallel == "pmap":
            return self._eval(state, self._local(batch))
        with zoo.sharding.use(self.mesh, self.rules):
            return self._eval(state, batch)

    def global_state(self, state: TrainState) -> TrainState:
        """The state as global arrays on the mesh (what checkpoints save). Multi-process pmap
        hands back each process's local copy; elsewhere the state already is global."""
        if self.parallel == "pmap" and jax.process_count() > 1:
            return multihost_utils.host_local_array_to_global_array(state, self.mesh, P())
        return state

    def _local(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """pmap's input: a leading axis over devices, and only this process's devices."""
        split = self._split(batch)
        if jax.process_count() > 1:
            split = multihost_utils.global_array_to_host_local_array(split, self.mesh, P("data"))
        return split

    def _check(self, batch: dict[str, Any]) -> None:
        got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}
        if got != self.shapes:
            diff = {k: (self.shapes.get(k), got.get(k)) for k in set(got) | set(self.shapes)
                    if got.get(k) != self.shapes.get(k)}
            raise ValueError("batch: shapes differ from those the step was compiled for "
                             "(compiled, given): " + ", ".join(f"{k}: {a} vs {b}" for k, (a, b)
                                                               in sorted(diff.items())))


def check_fit(batch_size: int, mesh: Mesh, rules: Rules, parallel: str, accum_steps: int) -> None:
    """The batch must split evenly over the data-parallel devices (and each device's share
    over the micro-batches); pmap is data parallel only."""
    if parallel not in PARALLEL:
        raise ValueError(f"--parallel: expected one of {PARALLEL}, got {parallel!r}")
    shape = {k: v for k, v in mesh.shape.items() if v > 1}
    if parallel == "pmap" and set(shape) - {"data"}:
        raise ValueError(f"--parallel pmap is data parallel only: put every device on `data` "
                         f"(--mesh data=-1), got mesh {shape}")
    dp = mesh.size if parallel == "pmap" else data_parallel_size(mesh, rules)
    check_split(batch_size, accum_steps, dp, f" of mesh {shape or '{}'} (batch -> {batch_axes(mesh, rules)})")


def check_context(cfg: zoo.Config, mesh: Mesh, batch_like: dict[str, Any]) -> None:
    """With a `context` mesh axis (sequence parallelism) every batch leaf's length (dim 1
    of [B, T]) must split evenly over it, and the attention must be one that runs split
    (`zoo.nn.attention.check_context`)."""
    c = zoo.sharding.context_size(mesh)
    if c == 1:
        return
    zoo.nn.attention.check_context(cfg.attention, c)
    for name, x in sorted(batch_like.items()):
        if len(x.shape) >= 2 and x.shape[1] % c:
            raise ValueError(f"--mesh context={c} does not divide the sequence length: batch "
                             f"{name!r} has {x.shape[1]} tokens per row; choose --seq-len (and "
                             f"the objective's lengths) a multiple of {c}, or another context size")


def make_runner(cfg: zoo.Config, hp: Hparams, mesh: Mesh, batch_like: dict[str, Any],
                parallel: str = "jit", rules: Rules = zoo.sharding.DEFAULT_RULES,
                task: Any = None) -> Runner:
    """Checks and builds (but does not compile) the step for `batch_like` ({name: array or
    ShapeDtypeStruct [B, ...]}) on `mesh`; `task`: a fine-tuning head's static part
    (train/step.py). Raises ValueError on any mismatch."""
    b = next(iter(batch_like.values())).shape[0]
    check_fit(b, mesh, rules, parallel, hp.accum_steps)
    check_context(cfg, mesh, batch_like)
    state_sh = state_shardings(abstract_state(cfg, hp, task), mesh, rules)
    batch_sh = batch_shardings(dict(batch_like), mesh, rules)
    shapes = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch_like.items()}
    if parallel == "jit":
        return Runner(cfg, hp, mesh, rules, parallel, state_sh, batch_sh, shapes,
                      jit_step(state_sh, batch_sh, mesh), jit_eval_step(state_sh, batch_sh, mesh), None, task)
    devices = list(mesh.devices.flat)
    n = len(devices)
    split = jax.jit(lambda batch: jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch),
                    out_shardings=NamedSharding(mesh, P("data")))
    return Runner(cfg, hp, mesh, rules, parallel, state_sh, batch_sh, shapes,
                  pmap_step(devices), pmap_eval_step(devices), split, task)
