"""Checkpoints with orbax-checkpoint: the train state (params, optimizer, step, RNG) plus a
JSON record (config, hparams, objective, data position, tokenizer and data fingerprints).

Saves are asynchronous: `save` returns once the arrays are copied to host, and the files
are written in the background; a step directory appears only when it is complete, so a run
killed mid-save resumes from the previous checkpoint. Restoring takes a target tree with
shardings, so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

import zoo
from train.step import TrainState, state_shardings

FORMAT = 1
# Record fields that must agree for a resumed run to continue the same run.
_MUST_MATCH = ("format", "config", "objective", "seq_len", "batch_size", "seed", "tokenizer",
               "data_fingerprint", "hparams")
_HPARAMS_FREE = ("total_steps",)  # a resumed run may be extended


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to a different run."""


def _arrays(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`, saving every `every`
    steps (and whenever `save(..., force=True)`)."""

    def __init__(self, directory: str | Path, every: int, keep: int = 3, use_async: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint: every and keep must be >= 1, got every={every}, keep={keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=use_async, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, record: dict[str, Any], force: bool = False) -> bool:
        """Saves when `step` is due (or `force`); returns whether a save started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(_arrays(state)),
                                  record=ocp.args.JsonSave({"format": FORMAT, **record}))
        return self._manager.save(step, args=args, force=force)

    def read_record(self, step: int | None = None) -> tuple[int, dict[str, Any]]:
        """(step, record) of `step` (default: the latest). Raises CheckpointError."""
        step = self._step_or_latest(step)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
            record = out["record"]
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: the record cannot be "
                                  f"read ({type(e).__name__}: {e}); the checkpoint is corrupt") from e
        if not isinstance(record, dict):
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: the record is not a JSON object")
        return step, record

    def restore(self, like: TrainState, mesh: jax.sharding.Mesh, step: int | None = None,
                rules: zoo.sharding.Rules = zoo.sharding.DEFAULT_RULES) -> TrainState:
        """The state saved at `step` (default latest), placed on `mesh` by `rules`, whatever
        mesh or process count saved it. `like` may be abstract (`train.abstract_state`)."""
        step = self._step_or_latest(step)
        shardings = state_shardings(like, mesh, rules)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              _arrays(like), _arrays(shardings))
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: the state cannot be "
                                  f"restored ({type(e).__name__}: {e}); it is corrupt or was saved "
                                  f"for a different model") from e
        arrays = out["state"]
        _check_shapes(target, arrays, self.directory / str(step))
        return like.replace(**arrays)

    def _step_or_latest(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"checkpoint: no checkpoint under {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"checkpoint: no step {step} under {self.directory}; have {steps}")
        return step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _check_shapes(target: Any, arrays: Any, where: Path) -> None:
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), target)
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), arrays)
    if want != got:
        raise CheckpointError(f"checkpoint {where}: saved arrays differ from the model's in shape "
                              f"or dtype; it was saved for a different model")


def check_record(saved: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raises CheckpointError listing every field where a checkpoint's record differs from
    the run being resumed (the model, objective, batch, seed, tokenizer, data, hparams)."""
    diffs = []
    for name in _MUST_MATCH:
        a, b = saved.get(name), {"format": FORMAT, **expected}.get(name)
        if name == "hparams" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in _HPARAMS_FREE}
            b = {k: v for k, v in b.items() if k not in _HPARAMS_FREE}
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            diffs += [f"{name}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in keys]
        elif json.dumps(a) != json.dumps(b):
            diffs.append(f"{name}: checkpoint {a!r}, now {b!r}")
    if diffs:
        raise CheckpointError(f"checkpoint {where} belongs to a different run:\n  " + "\n  ".join(diffs)
                              + "\nresume with the settings it was saved with, or use a new --run-dir")


__all__ = ["Checkpointer", "CheckpointError", "check_record"]
