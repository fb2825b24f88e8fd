"""`python -m train check --run DIR`: verifies every checkpoint of a run dir. Each one is
read onto the host's CPU, every array's digest is recomputed and compared with the one saved,
and each checkpoint gets one line. Exit 0 when all are intact, 3 when any is damaged, 2 on a
usage error (rundir.EXIT_*)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import jax

import zoo
from train.checkpoint import DAMAGED, Checkpointer, CheckpointDamaged, CheckpointError, quiet_libraries
from train.optim import Hparams
from train.rundir import EXIT_DAMAGED, EXIT_DONE, EXIT_USAGE
from train.step import abstract_state


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train check", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run dir of `python -m train` (--run-dir)")
    return p


def _like(record: dict[str, Any]) -> Any:
    """The abstract train state a record describes (its model config and hparams)."""
    cfg = zoo.Config.from_dict(record["config"])
    known = {f.name for f in dataclasses.fields(Hparams)}
    hp = Hparams(**{k: v for k, v in record["hparams"].items() if k in known})
    if "head" in record:  # a fine-tuning run's state carries its task head (train/export.py)
        from train.export import head_from_config

        return abstract_state(cfg, hp, head_from_config(record["head"]))
    return abstract_state(cfg, hp)


def check_step(ckpt: Checkpointer, step: int, mesh: jax.sharding.Mesh) -> tuple[bool, str]:
    """(intact, one line about checkpoint `step`)."""
    try:
        _, record = ckpt.read_record(step)
        ckpt.restore(_like(record), mesh, step, record=record)
    except CheckpointDamaged as e:
        return False, f"checkpoint {step}: DAMAGED: {str(e).split(' is damaged: ', 1)[-1]}"
    except (CheckpointError, KeyError, TypeError, ValueError, zoo.ConfigError) as e:
        return False, (f"checkpoint {step}: DAMAGED: its record does not describe a model "
                       f"({type(e).__name__}: {e})")
    if not isinstance(record.get("arrays"), dict):
        return True, f"checkpoint {step}: readable (saved without digests, so not verified)"
    return True, f"checkpoint {step}: intact ({len(record['arrays'])} arrays verified)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    directory = Path(args.run) / "checkpoints"
    if not directory.is_dir():
        print(f"error: --run {args.run}: no checkpoints/ folder; is it a `python -m train` run dir?",
              file=sys.stderr)
        return EXIT_USAGE
    ckpt = Checkpointer(directory, every=1)
    try:
        steps = ckpt.all_steps()
        mesh = zoo.sharding.make_mesh({"data": 1}, jax.devices("cpu")[:1])  # host memory
        results = [check_step(ckpt, step, mesh) for step in steps]
    finally:
        ckpt.close()
    for _, line in results:
        print(line, flush=True)
    for aside in sorted(directory.glob(f"*{DAMAGED}*")):
        print(f"{aside.name}: set aside by an earlier --resume (delete it when you no longer need it)")
    intact = sum(ok for ok, _ in results)
    print(f"{intact} of {len(results)} checkpoints intact in {directory}")
    return EXIT_DONE if intact == len(results) else EXIT_DAMAGED
