"""`python -m train`: flags, config files and key=value overrides -> a `RunConfig`.

Precedence, lowest first: the main job's defaults, the run dir's saved run config (with
--resume), a --config file (JSON or YAML), flags, key=value overrides. A key=value names a
RunConfig field (`steps=50`) or a model Config field (`d_model=256`, or `model.d_model=256`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

import zoo
from zoo.nn.transformer import remat_policy

# The main job (no arguments): a small Llama-style decoder on the standard library.
MAIN_MODEL_OVERRIDES = {"d_model": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
                        "d_ff": 512, "max_len": 256}


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs. `model` is a zoo preset name; `overrides` replace fields of
    its Config (vocab_size and the special ids always come from the tokenizer)."""

    model: str = "tiny-decoder"
    overrides: dict = dataclasses.field(default_factory=lambda: dict(MAIN_MODEL_OVERRIDES))
    objective: str | None = None  # None: the family's (clm, mlm, span_corruption)
    steps: int = 300
    batch_size: int = 16  # global, in rows
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int | None = None  # None: min(100, steps // 10)
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    z_loss: float = 0.0
    aux_weight: float = 0.01
    accum_steps: int = 1
    remat: bool | str = False  # none, full (True), dots, minimal
    loss_chunk: int = 0  # > 0: output head and loss this many positions at a time
    seed: int = 0
    data: list = dataclasses.field(default_factory=list)  # empty: the standard library
    tokenizer: str | None = None  # a SentencePiece .model; None: train one
    vocab_size: int = 2048  # for a trained tokenizer
    checkpoint_every: int = 100
    keep: int = 3
    eval_every: int | None = None  # None: 5 evaluations per run
    eval_batches: int = 4
    log_every: int | None = None  # None: 1 up to 1000 steps, then steps // 1000
    run_dir: str = "runs/main"
    resume: bool = False
    mesh: str = "data=-1"  # AXIS=SIZE,...; -1 takes the rest (default: every device on data)
    parallel: str = "jit"  # "jit": the mesh-sharded step; "pmap": data parallel jax.pmap
    rules: dict = dataclasses.field(default_factory=dict)  # logical axis -> mesh axes, over the defaults
    peak_flops: float | None = None  # per device; None: a table by device kind

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "accum_steps", "checkpoint_every", "keep",
                    "eval_batches", "vocab_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr: expected a positive learning rate, got {self.lr!r}")
        if not isinstance(self.loss_chunk, int) or isinstance(self.loss_chunk, bool) or self.loss_chunk < 0:
            raise ValueError(f"--loss-chunk: expected a non-negative integer, got {self.loss_chunk!r}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"accum_steps={self.accum_steps} must divide --batch-size {self.batch_size}")
        try:
            remat_policy(self.remat)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
        if self.parallel not in ("jit", "pmap"):
            raise ValueError(f"--parallel: expected 'jit' or 'pmap', got {self.parallel!r}")
        if not isinstance(self.rules, dict):
            raise ValueError(f"rules: expected a mapping of logical axis -> mesh axes, got {self.rules!r}")
        if self.model not in zoo.presets.names():
            raise ValueError(f"--model: unknown preset {self.model!r}; expected one of {zoo.presets.names()}")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, self.steps // 10)

    @property
    def log_interval(self) -> int:
        return self.log_every or max(1, self.steps // 1000)

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 5)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
MODEL_FIELDS = {f.name for f in dataclasses.fields(zoo.Config)}
_FLAGS = ("model", "objective", "steps", "batch_size", "seq_len", "lr", "seed", "data", "tokenizer",
          "vocab_size", "checkpoint_every", "keep", "eval_every", "log_every", "run_dir", "mesh",
          "accum_steps", "loss_chunk", "peak_flops", "parallel")
_TYPES = {"steps": int, "batch_size": int, "seq_len": int, "lr": float, "seed": int,
          "vocab_size": int, "checkpoint_every": int, "keep": int, "eval_every": int,
          "log_every": int, "accum_steps": int, "loss_chunk": int, "peak_flops": float}
_HELP = {"mesh": "device mesh, e.g. data=2,fsdp=2,tensor=2 (axes data, fsdp, tensor, expert; "
                 "-1 takes the rest; default: every device on data)",
         "parallel": "jit (default: the mesh-sharded step) or pmap (data parallel jax.pmap)",
         "loss_chunk": "compute the output head and loss this many target positions at a time "
                       "(must divide the target length; 0, the default: all at once)"}
# How this process joins a multi-process job (train/hosts.py): not run settings, never saved.
LAUNCH_FLAGS = {"coordinator": ("HOST:PORT of process 0's coordinator, or 'auto' on a cluster "
                                "(default: $JAX_COORDINATOR_ADDRESS)", str),
                "num_processes": ("processes in the job (default: $JAX_NUM_PROCESSES)", int),
                "process_id": ("this process's index, 0 .. N-1 (default: $JAX_PROCESS_ID)", int),
                "local_devices": ("CPU devices per process (tests and demos on one machine)", int)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Pretrain a zoo model with its objective. No arguments: the main job "
                    "(a small decoder on the Python standard library, CLM, a few minutes on CPU).",
        epilog="Extra KEY=VALUE arguments override run fields (steps=50) or model Config "
               "fields (d_model=256, dtype=bfloat16, dropout=0.1).")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--config", help="JSON or YAML file of run fields (and `overrides:` model fields)")
    for name in _FLAGS:
        flag = "--" + name.replace("_", "-")
        if name == "data":
            p.add_argument(flag, nargs="+", default=None, help="text files, globs or directories")
        else:
            p.add_argument(flag, type=_TYPES.get(name, str), default=None, help=_HELP.get(name))
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the latest checkpoint in --run-dir")
    p.add_argument("--remat", nargs="?", const="full", default=None,
                   choices=("none", "full", "dots", "minimal"),
                   help="recompute activations in the backward pass: full (the flag alone), "
                        "dots (keep only matmul outputs), minimal (keep weight matmuls)")
    hosts = p.add_argument_group("multi-process")
    for name, (help_text, kind) in LAUNCH_FLAGS.items():
        hosts.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    return p


def launch_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The multi-process flags of a command line (train.hosts.launch_from reads them)."""
    args = parser().parse_intermixed_args(list(argv))
    return {name: getattr(args, name) for name in LAUNCH_FLAGS}


def parse_value(text: str) -> Any:
    """A key=value value: JSON (numbers, true/false/null, lists, objects) or a plain string."""
    aliases = {"True": True, "False": False, "None": None}
    if text in aliases:
        return aliases[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_file(path: str | Path) -> dict[str, Any]:
    """A config file: JSON, or YAML when PyYAML is installed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no file {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config: {path} is YAML but PyYAML is not installed") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of run fields")
    return data


def _merge(base: dict[str, Any], layer: dict[str, Any], source: str) -> None:
    """Applies one layer of settings onto base; model Config fields go to overrides."""
    if "model" in layer:  # first: the main job's shape applies only to its own model
        base["model"], base["overrides"] = layer["model"], {}
    for key, value in layer.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if key == "model":
            continue
        if key == "overrides":
            if not isinstance(value, dict):
                raise ValueError(f"{source}: 'overrides' must be a mapping of model fields")
            for k in value:
                if k not in MODEL_FIELDS:
                    raise ValueError(f"{source}: unknown model field {k!r}")
            base["overrides"].update(value)
        elif key in RUN_FIELDS:
            base[key] = value
        elif name in MODEL_FIELDS:
            base["overrides"][name] = value
        else:
            raise ValueError(f"{source}: unknown setting {key!r}; run fields are "
                             f"{sorted(RUN_FIELDS)}, model fields {sorted(MODEL_FIELDS)}")


def resolve(argv: Sequence[str]) -> RunConfig:
    """RunConfig from command-line arguments (see the module docstring for precedence)."""
    args = parser().parse_intermixed_args(list(argv))
    if args.data:  # `--data a.txt steps=5`: nargs="+" swallowed the KEY=VALUE after it
        extra = [d for d in args.data if re.fullmatch(r"[A-Za-z_][\w.]*=.*", d) and not Path(d).exists()]
        args.data = [d for d in args.data if d not in extra]
        args.overrides = [*args.overrides, *extra]
    settings = RunConfig().to_dict()
    skip = ("overrides", "config", *LAUNCH_FLAGS)
    flags = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    run_dir = Path(flags.get("run_dir", settings["run_dir"]))
    if flags.get("resume") and (run_dir / "run.json").is_file():
        saved = json.loads((run_dir / "run.json").read_text())
        saved.pop("resume", None)
        _merge(settings, saved, f"{run_dir / 'run.json'}")
    if args.config:
        _merge(settings, load_file(args.config), f"--config {args.config}")
    _merge(settings, flags, "flags")
    pairs = {}
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        pairs[key.strip()] = parse_value(value.strip())
    _merge(settings, pairs, "overrides")
    if isinstance(settings["data"], str):
        settings["data"] = [settings["data"]]
    return RunConfig(**settings)
