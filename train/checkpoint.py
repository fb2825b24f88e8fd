"""Checkpoints with orbax-checkpoint: the train state (params, optimizer, step, RNG) plus a
JSON record (config, hparams, objective, data position, tokenizer and data fingerprints, and
the shape, dtype and digest of every saved array).

Saves are asynchronous: `save` returns once the arrays are copied to host, and the files
are written in the background; a step directory appears only when it is complete, so a run
killed mid-save resumes from the previous checkpoint. Restoring takes a target tree with
shardings, so a checkpoint restores onto any mesh.

Damage is found, not trained on: every restore recomputes each array's digest and compares
it with the one saved, and `restore_intact` goes back to the newest checkpoint that reads
and verifies. Orbax keeps the newest `keep` checkpoints and deletes an old one only once a
newer one is complete, so the one a run resumed from stays until the run has saved past it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import zoo
from train import hosts
from train.rundir import Damaged, NotFinite, WriteFailed, first_line, is_disk_full
from train.optim import Hparams
from train.step import TrainState, state_shardings

FORMAT = 1
# Record fields that must agree for a resumed run to continue the same run.
_MUST_MATCH = ("format", "config", "objective", "seq_len", "batch_size", "seed", "tokenizer",
               "data_fingerprint", "hparams")
_HPARAMS_FREE = ("total_steps",)  # a resumed run may be extended
_TMP = ".orbax-checkpoint-tmp"  # orbax's suffix for a step directory still being written
DAMAGED = ".damaged"  # suffix of a damaged step directory moved out of the way


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to a different run."""


class CheckpointDamaged(CheckpointError, Damaged):
    """A checkpoint whose files cannot be read or whose arrays differ from what was saved."""


def _arrays(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def _names(tree: Any) -> list[str]:
    """"params/decoder/layers/mlp/wi", ... for each leaf of `tree`, in leaf order."""
    return [jax.tree_util.keystr(p, simple=True, separator="/")
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# --- digests ----------------------------------------------------------------------------------

def _bits(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 (same shape; 8-byte dtypes gain a last axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
    """[2] uint32: the sum of x's bits and their sum weighted by an odd hash of the position.
    Integer sums wrap exactly in any order, so the digest is the same whatever the sharding
    or process count; any change to one element changes both words."""
    v = _bits(x)
    pos = jnp.zeros(v.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(v.ndim)):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, v.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= v.shape[axis]
    weight = (pos * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
    return jnp.stack([jnp.sum(v, dtype=jnp.uint32), jnp.sum(v * weight, dtype=jnp.uint32)])


def _finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.array(True)


@jax.jit
def _inspect(arrays: Any) -> tuple[Any, Any]:
    return jax.tree.map(_digest, arrays), jax.tree.map(_finite, arrays)


def _fetch(tree: Any) -> list[np.ndarray]:
    """Leaves of a tree of small replicated results, on this host (any process count)."""
    return [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(tree)]


def describe(arrays: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({name: {"shape", "dtype", "digest"}}, names of arrays holding NaN or inf)."""
    digests, finite = _inspect(arrays)
    names, leaves = _names(arrays), jax.tree.leaves(arrays)
    out = {}
    for name, x, d in zip(names, leaves, _fetch(digests)):
        dtype = "key" if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else str(x.dtype)
        out[name] = {"shape": list(x.shape), "dtype": dtype, "digest": f"{int(d[0]):08x}{int(d[1]):08x}"}
    return out, [n for n, ok in zip(names, _fetch(finite)) if not ok]


# --- quiet reads --------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """orbax and TensorStore answer a damaged file with log records, whole TensorStore
    specs and, when their abandoned reads are collected, "Exception ignored in coroutine"
    tracebacks; inside, all of that is dropped and the caller says it in one line."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        gc.collect()  # the abandoned reads die here, inside, not at some later collection
        sys.unraisablehook = hook
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quiet_libraries() -> None:
    """For the command line, which says each failure once, in one line: orbax logs every
    failed write from its background thread with a traceback (through absl), and after a
    failed write TensorStore's callbacks find orbax's event loops closed and print
    "RuntimeError: Event loop is closed" tracebacks (through sys.excepthook) or leave
    coroutines never awaited; those are dropped, anything else still shows."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def on_exception(kind: type, value: BaseException, tb: Any) -> None:
        if not _closed_loop(value):
            excepthook(kind, value, tb)

    def on_unraisable(unraisable: Any) -> None:
        if not (_closed_loop(unraisable.exc_value) or inspect.iscoroutine(unraisable.object)):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


def _closed_loop(e: BaseException | None) -> bool:
    return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`, saving every `every`
    steps (and whenever `save(..., force=True)`). Nothing is created before the first save."""

    def __init__(self, directory: str | Path, every: int, keep: int = 3, use_async: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint: every and keep must be >= 1, got every={every}, keep={keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=use_async, create=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # the step of a save that may still be in flight

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # --- saving

    def save(self, step: int, state: TrainState, record: dict[str, Any], force: bool = False) -> bool:
        """Saves when `step` is due (or `force`); returns whether a save started. Raises
        NotFinite (nothing saved) when an array holds NaN or inf, and WriteFailed when this
        save, or the one before it still being written, cannot be written."""
        if not (force or self._manager.should_save(step)):
            return False
        arrays = _arrays(state)
        described, bad = describe(arrays)
        if bad:
            raise NotFinite(f"the state at step {step} holds NaN or inf ({_few(bad)}); not saved: "
                            f"{self.intact_note(step)}")
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                  record=ocp.args.JsonSave({"format": FORMAT, **record, "arrays": described}))
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._writes(step):
            started = self._manager.save(step, args=args, force=True)
        if started:
            self._writing = step
        return started

    def wait(self) -> None:
        """Waits for the save in flight; WriteFailed if it could not be written."""
        with self._writes(None):
            self._manager.wait_until_finished()
        self._writing = None

    def close(self) -> None:
        """Waits for the save in flight (WriteFailed if it failed), then lets go; what a
        failed save left half-written is removed once no write of it is running."""
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception), quiet():
                self._manager.close()
            self.remove_partial()

    @contextlib.contextmanager
    def _writes(self, step: int | None) -> Iterator[None]:
        """Turns a failed write into one WriteFailed line, with the partial directory removed."""
        try:
            yield
        except Exception as e:
            with contextlib.suppress(Exception), quiet():
                self._manager.wait_until_finished()  # the rest of that save's writes stop first
            self._manager.reload()
            done = set(self.all_steps())
            failed = next((s for s in (self._writing, step) if s is not None and s not in done), step)
            self._writing = None
            self.remove_partial()
            where = f"{'a checkpoint' if failed is None else f'checkpoint {failed}'} in {self.directory}"
            if is_disk_full(e):
                raise WriteFailed(f"no space left on device while saving {where}; "
                                  f"{self.intact_note(failed)}; free space and --resume (keeping "
                                  f"--keep checkpoints needs room for one more)") from None
            raise WriteFailed(f"could not save {where} ({first_line(e)}); "
                              f"{self.intact_note(failed)}") from None

    def last_saved(self) -> int | None:
        """The newest step saved, counting a save still being written."""
        steps = self.all_steps() + ([self._writing] if self._writing is not None else [])
        return max(steps) if steps else None

    def intact_note(self, newer_than: int | None = None) -> str:
        """"checkpoint N is intact" for the newest complete one older than `newer_than`."""
        older = [s for s in self.all_steps() if newer_than is None or s < newer_than]
        return f"checkpoint {older[-1]} is intact" if older else "no earlier checkpoint exists"

    def remove_partial(self, settle_s: float = 5.0) -> list[Path]:
        """Deletes step directories that orbax left half-written (process 0 does it).

        After a failed write, the other writes of that save (TensorStore's, on orbax's
        background threads) can still be finishing and re-create the directory, so removal
        repeats until a look finds none, for at most `settle_s` seconds."""
        deadline = time.monotonic() + settle_s
        removed: list[Path] = []
        while True:
            partial = sorted(self.directory.glob(f"*{_TMP}*")) if self.directory.is_dir() else []
            if not partial or not hosts.is_primary() or time.monotonic() > deadline:
                return removed or partial
            for path in partial:
                shutil.rmtree(path, ignore_errors=True)
            removed += [p for p in partial if p not in removed]
            time.sleep(0.1)

    # --- reading

    def read_record(self, step: int | None = None) -> tuple[int, dict[str, Any]]:
        """(step, record) of `step` (default: the latest). CheckpointDamaged if unreadable."""
        step = self._step_or_latest(step)
        try:
            with quiet():
                args = ocp.args.Composite(record=ocp.args.JsonRestore())
                record = self._manager.restore(step, args=args)["record"]
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointDamaged(f"checkpoint {self.directory / str(step)} is damaged: its record "
                                    f"cannot be read ({first_line(e)})") from None
        if not isinstance(record, dict):
            raise CheckpointDamaged(f"checkpoint {self.directory / str(step)} is damaged: its record "
                                    f"is not a JSON object")
        return step, record

    def restore(self, like: TrainState, mesh: jax.sharding.Mesh, step: int | None = None,
                rules: zoo.sharding.Rules = zoo.sharding.DEFAULT_RULES,
                record: dict[str, Any] | None = None) -> TrainState:
        """The state saved at `step` (default latest), placed on `mesh` by `rules`, whatever
        mesh or process count saved it, and checked against the digests saved with it.
        `like` may be abstract (`train.abstract_state`). CheckpointError when it was saved
        for another model; CheckpointDamaged when it cannot be read or differs."""
        step = self._step_or_latest(step)
        where = self.directory / str(step)
        if record is None:
            record = self.read_record(step)[1]
        shardings = state_shardings(like, mesh, rules)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              _arrays(like), _arrays(shardings))
        saved = record.get("arrays")  # absent in checkpoints from before digests
        if isinstance(saved, dict):
            _check_model(saved, target, where)
        try:
            with quiet():
                args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
                out = self._manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointDamaged(f"checkpoint {where} is damaged: its arrays cannot be read "
                                    f"({first_line(e)})") from None
        arrays = out["state"]
        _check_shapes(target, arrays, where)
        if isinstance(saved, dict):
            now, _ = describe(arrays)
            differ = [n for n, d in now.items() if saved.get(n, {}).get("digest") != d["digest"]]
            if differ:
                verb = "differs" if len(differ) == 1 else "differ"
                raise CheckpointDamaged(f"checkpoint {where} is damaged: {_few(differ)} {verb} from "
                                        f"what was saved (digest mismatch)")
        return like.replace(**arrays)

    def restore_intact(self, like: TrainState, mesh: jax.sharding.Mesh,
                       rules: zoo.sharding.Rules = zoo.sharding.DEFAULT_RULES,
                       check: Callable[[dict[str, Any], Path], None] | None = None,
                       ) -> tuple[TrainState, int, dict[str, Any], list[tuple[int, str]]]:
        """(state, step, record, damaged) of the newest checkpoint that reads and verifies;
        `damaged` lists the newer ones passed over as (step, why). `check(record, where)`
        vets each record before its arrays are read (a record of another run raises there).
        CheckpointDamaged when none is intact; CheckpointError when there is none."""
        damaged = []
        for step in reversed(self._steps_or_raise()):
            try:
                _, record = self.read_record(step)
                if check is not None:
                    check(record, self.directory / str(step))
                state = self.restore(like, mesh, step, rules, record=record)
            except CheckpointDamaged as e:
                damaged.append((step, _why(e)))
                continue
            return state, step, record, damaged
        raise CheckpointDamaged(f"no intact checkpoint in {self.directory}: "
                                + "; ".join(f"{s}: {why.split(' (')[0]}" for s, why in damaged)
                                + f" (details: python -m train check --run {self.directory.parent}; "
                                f"a copy of the run dir, if you have one, can be resumed)")

    def set_aside(self, step: int) -> Path:
        """Moves the damaged step directory to `<step>.damaged` (so the run can save that step
        again and rotation never counts it); returns the new path. Process 0 moves it."""
        source = self.directory / str(step)
        target = self.directory / f"{step}{DAMAGED}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{DAMAGED}-{n}"
        if hosts.is_primary():
            source.rename(target)
        hosts.barrier(f"checkpoint {step} set aside")
        self._manager.reload()
        return target

    def _steps_or_raise(self) -> list[int]:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"checkpoint: no checkpoint under {self.directory}")
        return steps

    def _step_or_latest(self, step: int | None) -> int:
        steps = self._steps_or_raise()
        if step is None:
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"checkpoint: no step {step} under {self.directory}; have {steps}")
        return step


def _few(names: list[str], n: int = 2) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _why(e: CheckpointDamaged) -> str:
    """The reason part of a CheckpointDamaged message (after "is damaged: ")."""
    return str(e).split(" is damaged: ", 1)[-1]


def _check_model(saved: dict[str, Any], target: Any, where: Path) -> None:
    """CheckpointError when the saved arrays' names, shapes or dtypes are not the model's."""
    names, leaves = _names(target), jax.tree.leaves(target)
    want = {n: (list(x.shape), "key" if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else str(x.dtype))
            for n, x in zip(names, leaves)}
    got = {n: (a.get("shape"), a.get("dtype")) for n, a in saved.items() if isinstance(a, dict)}
    differ = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
    if differ:
        n = differ[0]
        raise CheckpointError(f"checkpoint {where} was saved for a different model: {n} is "
                              f"{_shape(got.get(n))} there and {_shape(want.get(n))} here"
                              + (f" ({len(differ) - 1} more arrays differ)" if len(differ) > 1 else ""))


def _shape(spec: tuple | None) -> str:
    return "absent" if spec is None else f"{spec[1]}{spec[0]}"


def _check_shapes(target: Any, arrays: Any, where: Path) -> None:
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), target)
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), arrays)
    if want != got:
        raise CheckpointError(f"checkpoint {where}: saved arrays differ from the model's in shape "
                              f"or dtype; it was saved for a different model")


def _as_config(d: dict[str, Any]) -> dict[str, Any]:
    """A recorded model config as JSON gives it back: fields added to zoo.Config since it was
    saved take their defaults (the model they describe did not have them), lists compare
    equal to tuples. A record zoo cannot read stays as it is (and differs, by name)."""
    try:
        return json.loads(zoo.Config.from_dict(d).to_json())
    except (TypeError, ValueError):
        return d


def _hparam_defaults() -> dict[str, Any]:
    """Every Hparams field at its default, in the form a checkpoint record holds (JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(Hparams())))


def check_record(saved: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raises CheckpointError listing every field where a checkpoint's record differs from
    the run being resumed (the model, objective, batch, seed, tokenizer, data, hparams)."""
    diffs = []
    for name in _MUST_MATCH:
        a, b = saved.get(name), {"format": FORMAT, **expected}.get(name)
        if name == "hparams" and isinstance(a, dict) and isinstance(b, dict):
            # A field added to Hparams after the checkpoint was saved ran at its default then.
            b = json.loads(json.dumps(b))
            a = {**{k: v for k, v in _hparam_defaults().items() if k in b}, **a}
            a = {k: v for k, v in a.items() if k not in _HPARAMS_FREE}
            b = {k: v for k, v in b.items() if k not in _HPARAMS_FREE}
        if name == "config" and isinstance(a, dict) and isinstance(b, dict):
            a, b = _as_config(a), _as_config(b)
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            diffs += [f"{name}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in keys]
        elif json.dumps(a) != json.dumps(b):
            diffs.append(f"{name}: checkpoint {a!r}, now {b!r}")
    if diffs:
        raise CheckpointError(f"checkpoint {where} belongs to a different run:\n  " + "\n  ".join(diffs)
                              + "\nresume with the settings it was saved with, or use a new --run-dir")


__all__ = ["Checkpointer", "CheckpointError", "CheckpointDamaged", "check_record", "describe", "quiet",
           "quiet_libraries"]
