"""`python -m train`: flags, config files and key=value overrides -> a `RunConfig`.

Precedence, lowest first: the main job's defaults, the model, model fields and tokenizer of
the run --init-from names, the run dir's saved run config (with --resume), a --config file
(JSON or YAML), flags, key=value overrides. A key names a
RunConfig field (`batch_size=8`), an `Hparams` field (`warmup_steps=50`, `b2=0.99`, or a
short name: `lr`, `warmup`, `steps`) or a model Config field (`d_model=256`, or
`model.d_model=256`). Each setting is declared once, with its help and check, as a field of
`RunConfig` or `Hparams` (train/settings.py); the flags are made from those fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import textwrap
from pathlib import Path
from typing import Any, Sequence

import zoo
from train.objectives import DEFAULT_OBJECTIVE, FAMILY_OF, check_objective
from train.optim import Hparams
from train.parallel import PARALLEL, parse_mesh
from train.rundir import read_json
from train.settings import MAPPING, POSITIVE, POSITIVE_INT, add_flags, check_fields, declared, keys, one_of, setting

# The main job (no arguments): a small Llama-style decoder on the standard library, trained
# for a few minutes on a CPU: a higher peak rate and a shorter schedule than Hparams' defaults.
MAIN_MODEL_OVERRIDES = {"d_model": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
                        "d_ff": 512, "max_len": 256}
MAIN_HPARAMS = {"learning_rate": 2e-3, "total_steps": 300}
SEQ_LEN = 128  # the default tokens per row, where the model's max_len allows
# Commands besides training (train/__main__.py dispatches them), for --help.
SUBCOMMANDS = {"sample": "python -m train sample --run DIR --prompt TEXT: text from a trained run",
               "check": "python -m train check --run DIR: verifies every checkpoint of a run",
               "finetune": "python -m train finetune --from PATH --task classify --data FILE: fine-tuning",
               "export": "python -m train export --run DIR --out DIR: a fine-tuned run for transformers"}

_OBJECTIVES = ", ".join(f"{name} ({family})" for name, family in FAMILY_OF.items())


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs. `model` is a zoo preset name; `overrides` replace fields of
    its Config (vocab_size and the special ids always come from the tokenizer); `hparams`
    holds the optimizer and step settings. `objective` and `seq_len` resolve to the model's
    defaults when the RunConfig is made, and every usage error surfaces then."""

    model: str = setting("tiny-decoder", f"zoo preset: {', '.join(zoo.presets.names())} (default: "
                         "tiny-decoder in the main job's shape)", one_of(zoo.presets.names()))
    overrides: dict = setting(factory=lambda: dict(MAIN_MODEL_OVERRIDES), check=MAPPING,
                              help="model Config fields over the preset's")
    objective: str | None = setting(None, f"pretraining objective: {_OBJECTIVES} (default: the "
                                    f"family's: {', '.join(DEFAULT_OBJECTIVE.values())})")
    batch_size: int = setting(16, "global batch, in rows", POSITIVE_INT)
    seq_len: int | None = setting(None, f"tokens per row, the encoder's for encdec (default: "
                                  f"{SEQ_LEN}, or the model's max_len if smaller)", POSITIVE_INT)
    hparams: Hparams = setting(factory=lambda: Hparams(**MAIN_HPARAMS), help="train.Hparams")
    seed: int = setting(0, "seed of init, dropout, data order and masking")
    data: list = setting(factory=list, help="text files, globs or directories (default: the "
                         "Python standard library)")
    tokenizer: str | None = setting(None, "a SentencePiece .model (default: one trained on the "
                                    "corpus and saved in the run dir)")
    vocab_size: int = setting(2048, "pieces of a trained tokenizer", POSITIVE_INT)
    checkpoint_every: int = setting(100, "save a checkpoint every N steps (and at the end and on "
                                    "SIGTERM/SIGINT)", POSITIVE_INT)
    keep: int = setting(3, "keep the latest K checkpoints", POSITIVE_INT)
    eval_every: int | None = setting(None, "evaluate on held-out rows every N steps (default: 5 "
                                     "evaluations per run)", POSITIVE_INT)
    eval_batches: int = setting(4, "held-out batches per evaluation", POSITIVE_INT)
    log_every: int | None = setting(None, "a metrics row every N steps (default: 1 up to 1000 steps, "
                                    "then steps // 1000)", POSITIVE_INT)
    run_dir: str = setting("runs/main", "where the run's files go")
    resume: bool = setting(False, "continue the latest checkpoint in --run-dir, with its saved "
                           "settings under the ones given")
    init_from: str | None = setting(None, "start a new run from the params of a `python -m train` run "
                                    "dir's latest checkpoint, with its model and tokenizer under the "
                                    "settings given (model fields that keep the params' shapes, such as "
                                    "max_len=4096 rope_scaling=yarn) and a fresh optimizer at step 0",
                                    aliases=("from",))
    mesh: str = setting("data=-1", "device mesh, AXIS=SIZE,... over axes data, fsdp, tensor, expert, "
                        "context (splits each row's sequence); -1 takes the rest (default: every "
                        "device on data)")
    parallel: str = setting("jit", "jit (the mesh-sharded step) or pmap (data parallel jax.pmap)",
                            one_of(PARALLEL))
    rules: dict = setting(factory=dict, check=MAPPING,
                          help="logical axis -> mesh axes, over zoo.sharding.DEFAULT_RULES")
    peak_flops: float | None = setting(None, "peak FLOP/s per device, for MFU (default: a table by "
                                       "device kind)", POSITIVE)

    def __post_init__(self) -> None:
        check_fields(self)
        base = self.base_config()
        self.objective = self.objective or DEFAULT_OBJECTIVE[base.family]
        check_objective(self.objective, base.family)
        self.seq_len = self.seq_len or min(SEQ_LEN, base.max_len)
        if base.positions in ("learned", "sinusoidal") and self.seq_len > base.max_len:
            raise ValueError(f"--seq-len {self.seq_len} exceeds the model's max_len {base.max_len} "
                             f"(raise it with max_len=...)")
        context = parse_mesh(self.mesh).get("context", 1)  # -1: checked on the mesh (make_runner)
        if context > 1 and self.seq_len % context:
            raise ValueError(f"--mesh context={context} does not divide --seq-len {self.seq_len}: "
                             f"each row's sequence splits evenly over it; choose a multiple of {context}")

    def base_config(self) -> zoo.Config:
        """The preset with the overrides (before the tokenizer sets vocab_size and ids)."""
        return zoo.preset(self.model, **self.overrides)

    @property
    def steps(self) -> int:
        return self.hparams.total_steps

    @property
    def log_interval(self) -> int:
        return self.log_every or max(1, self.steps // 1000)

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 5)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RUN_KEYS = keys(RunConfig)
HPARAM_KEYS = keys(Hparams)
MODEL_FIELDS = {f.name for f in dataclasses.fields(zoo.Config)}
# How this process joins a multi-process job (train/hosts.py): not run settings, never saved.
LAUNCH_FLAGS = {"coordinator": ("HOST:PORT of process 0's coordinator, or 'auto' on a cluster "
                                "(default: $JAX_COORDINATOR_ADDRESS)", str),
                "num_processes": ("processes in the job (default: $JAX_NUM_PROCESSES)", int),
                "process_id": ("this process's index, 0 .. N-1 (default: $JAX_PROCESS_ID)", int),
                "local_devices": ("CPU devices per process (tests and demos on one machine)", int)}


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help text at spaces only, so names such as bert-large-uncased stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train", formatter_class=_HelpFormatter,
        description="Pretrain a zoo model with its objective. No arguments: the main job "
                    "(a small decoder on the Python standard library, CLM, a few minutes on CPU).",
        epilog="Extra KEY=VALUE arguments set any run or optimizer field (steps=50, b2=0.99) or "
               "model Config field (d_model=256, dtype=bfloat16, dropout=0.1). Other commands (each "
               "with its own --help): " + "; ".join(SUBCOMMANDS.values()) + ".")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="a run, optimizer or model Config field and its value (JSON or a string)")
    p.add_argument("--config", help="JSON or YAML file of settings: the keys KEY=VALUE takes, and "
                                    "`overrides:` / `hparams:` mappings")
    add_flags(p.add_argument_group("run"), RunConfig, declared(RunConfig))
    add_flags(p.add_argument_group("optimizer and step (train.Hparams)"), Hparams,
              {**declared(Hparams), **MAIN_HPARAMS})
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


def _set(base: dict[str, Any], key: str, value: Any, source: str) -> None:
    """One setting into `base`: a run field, an Hparams field (or short name) or a model
    Config field; a `hparams.` or `model.` prefix says which of the last two."""
    scope, name = key.split(".", 1) if key.startswith(("hparams.", "model.")) else ("", key)
    if not scope and name in RUN_KEYS:
        base[RUN_KEYS[name]] = value
    elif scope in ("", "hparams") and name in HPARAM_KEYS:
        base["hparams"][HPARAM_KEYS[name]] = value
    elif scope in ("", "model") and name in MODEL_FIELDS:
        base["overrides"][name] = value
    else:
        raise ValueError(f"{source}: unknown setting {key!r}; run fields are {sorted(RUN_KEYS)}, "
                         f"optimizer fields {sorted(HPARAM_KEYS)}, model fields {sorted(MODEL_FIELDS)}")


def _merge(base: dict[str, Any], layer: dict[str, Any], source: str) -> None:
    """Applies one layer of settings onto base (see `_set`); `overrides` and `hparams` may
    also come as mappings."""
    if "model" in layer:  # first: the main job's shape applies only to its own model
        base["model"], base["overrides"] = layer["model"], {}
    for key, value in layer.items():
        if key in ("overrides", "hparams"):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {key!r} must be a mapping of fields, got {value!r}")
            for name, v in value.items():
                _set(base, f"{'model' if key == 'overrides' else 'hparams'}.{name}", v, source)
        elif key != "model":
            _set(base, key, value, source)


def _build(layers: list[tuple[dict[str, Any], str]]) -> RunConfig:
    """The main job's settings with `layers` ((settings, source) pairs) applied in order.
    `hparams` stays a mapping of the fields given until the end, so a warmup that defaults
    from the steps follows the steps finally chosen."""
    settings = {**declared(RunConfig), "hparams": dict(MAIN_HPARAMS)}
    for layer, source in _source_layer(layers) + layers:
        _merge(settings, layer, source)
    if isinstance(settings["data"], str):
        settings["data"] = [settings["data"]]
    return RunConfig(**{**settings, "hparams": Hparams(**settings["hparams"])})


def _source_layer(layers: list[tuple[dict[str, Any], str]]) -> list[tuple[dict[str, Any], str]]:
    """With --init-from DIR (in any layer, the last one given wins): DIR's model, model fields
    and tokenizer as the lowest layer, so the new run builds the model DIR trained unless a
    setting changes it. Without it, or without DIR/run.json (as --resume, settings read no
    file that is not there; the run refuses to start: train.loop.setup): no layer."""
    init = None
    for layer, _ in layers:
        init = next((v for k, v in layer.items() if RUN_KEYS.get(k) == "init_from"), init)
    run_json = Path(init) / "run.json" if init is not None else None
    if run_json is None or not run_json.is_file():
        return []
    saved = read_json(run_json)
    if "task" in saved or "model" not in saved:
        raise ValueError(f"--init-from {init}: a fine-tuning run dir; pretraining starts from a "
                         f"`python -m train` run dir (`python -m train finetune --from` takes this one)")
    layer = {"model": saved["model"], "overrides": saved.get("overrides", {}),
             "tokenizer": str(Path(init) / "tokenizer.model")}
    return [(layer, str(run_json))]


def run_config(**settings: Any) -> RunConfig:
    """A RunConfig from settings named as a config file names them, over the main job's:
    `run_config(model="tiny-encoder", steps=50, lr=1e-3, d_model=64)`."""
    return _build([(settings, "run_config")])


def resolve(argv: Sequence[str]) -> RunConfig:
    """RunConfig from command-line arguments (see the module docstring for precedence).

    With --resume the run dir's run.json is the lowest layer; one written before the
    optimizer settings moved into `hparams` (flat `lr`, `warmup`, `steps`) reads the same,
    since those are the fields' short names."""
    args = parser().parse_intermixed_args(list(argv))
    if args.data:  # `--data a.txt steps=5`: nargs="+" swallowed the KEY=VALUE after it
        extra = [d for d in args.data if re.fullmatch(r"[A-Za-z_][\w.]*=.*", d) and not Path(d).exists()]
        args.data = [d for d in args.data if d not in extra]
        args.overrides = [*args.overrides, *extra]
    skip = ("overrides", "config", *LAUNCH_FLAGS)
    flags = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    pairs = {}
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        pairs[key.strip()] = parse_value(value.strip())
    layers = [(load_file(args.config), f"--config {args.config}")] if args.config else []
    layers += [(flags, "flags"), (pairs, "overrides")]
    given = {RUN_KEYS.get(k, k): v for layer, _ in layers for k, v in layer.items()}
    run_json = Path(given.get("run_dir", RunConfig.run_dir)) / "run.json"
    if given.get("resume") and run_json.is_file():
        saved = read_json(run_json)  # rundir.Damaged names the file and line
        saved.pop("resume", None)
        layers.insert(0, (saved, str(run_json)))
    return _build(layers)
