"""`python -m train export --run DIR --out DIR`: a fine-tuning run's best state (train/finetune.py)
as a Hugging Face directory, its task head included (`zoo.save_hf(..., head=)`) and LoRA
adapters merged into the weights they adapt, with the
run's tokenizer files, so that transformers loads it with AutoModelForSequenceClassification
and AutoTokenizer and gives the same predictions.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import zoo
from train import lora
from train.checkpoint import Checkpointer, CheckpointError, quiet_libraries
from train.optim import TASK_HEAD, Hparams
from train.parallel import build_mesh
from train.rundir import EXIT_DONE, EXIT_USAGE, RunStop, read_json
from train.step import abstract_state


def head_config(task: zoo.heads.Head) -> dict[str, Any]:
    """A head's static part as JSON (run.json `head`)."""
    return {"kind": task.kind, "labels": list(task.labels), "problem_type": task.problem_type,
            "recipe": task.recipe._asdict(), "dropout": task.dropout, "pad_id": task.pad_id}


def head_from_config(d: dict[str, Any]) -> zoo.heads.Head:
    return zoo.heads.Head(None, d["kind"], tuple(d["labels"]), d["problem_type"],
                          zoo.heads.Recipe(**d["recipe"]), d["dropout"], d["pad_id"])


def restore_run(run_dir: str | Path, step: int | None = None) -> Any:
    """A fine-tuning run's state on one device: its best checkpoint (or `step` of
    checkpoints/), verified against the digests saved with it."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    if "head" not in run:
        raise ValueError(f"--run {run_dir}: not a fine-tuning run (its run.json has no head)")
    cfg = zoo.Config.from_json((run_dir / "config.json").read_text())
    hp = Hparams(**run["hparams"])
    task = None if run["head"] is None else head_from_config(run["head"])  # None: sft
    where = run_dir / "best" if step is None and (run_dir / "best").is_dir() else run_dir / "checkpoints"
    ckpt = Checkpointer(where, every=1, keep=1)
    try:
        mesh = build_mesh("data=1")
        return ckpt.restore(abstract_state(cfg, hp, task), mesh, step)
    finally:
        ckpt.close()


def export(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """The run's best state (or checkpoint `step`) as a Hugging Face directory with its head
    (`zoo.save_hf(..., head=)`) and the run's tokenizer files."""
    state = restore_run(run_dir, step)
    body = {k: v for k, v in lora.merged(state.params, state.hp.lora_alpha).items() if k != TASK_HEAD}
    zoo.save_hf(state.cfg, body, out, head=state.head)
    tok = Path(run_dir) / "tokenizer"
    if tok.is_dir():
        for f in tok.iterdir():
            shutil.copyfile(f, Path(out) / f.name)
    return Path(out)


def export_parser() -> argparse.ArgumentParser:
    """`python -m train export --run DIR --out DIR [--step N]`."""
    p = argparse.ArgumentParser(prog="python -m train export",
                                description="A fine-tuning run's best model as a Hugging Face directory "
                                            "(transformers loads it with AutoModelFor...).")
    p.add_argument("--run", required=True, help="run dir of `python -m train finetune`")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--step", type=int, help="a checkpoint of checkpoints/ (default: the best)")
    return p


def export_main(argv: list[str] | None = None) -> int:
    """`python -m train export ...`: 0 done, 2 a run that cannot be exported."""
    args = export_parser().parse_args(sys.argv[2:] if argv is None else argv)
    quiet_libraries()
    try:
        out = export(args.run, args.out, args.step)
    except (ValueError, FileNotFoundError, CheckpointError, RunStop) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out}", flush=True)
    return EXIT_DONE
