"""`python -m train finetune`: a pretrained checkpoint (or a preset from scratch) trained on
labelled data through the same step, checkpoints, resume, meshes and metrics as pretraining;
`python -m train export` (train/export.py): the run's best model for transformers.

    python -m train finetune --from PATH --task classify --data train.tsv --eval-data dev.tsv \\
        --run-dir runs/sst2 --steps 300 --batch-size 32 --seq-len 64 --lr 1e-4
    python -m train export --run runs/sst2 --out hf_dir

--from: a Hugging Face directory (its body, and its sequence head when it has one; else a new
head with --num-labels or the labels found in --data) or a zoo run dir (a fine-tuning run:
its best checkpoint, head included; a pretraining run: its latest body). --model PRESET
with --tokenizer starts from scratch. The checkpoint's tokenizer is copied into the run dir
(`tokenizer/`) and out again by export. The task head trains as one more objective of the
one step (train/step.py: `TrainState.task`). Each evaluation (every --eval-every steps and
at the end) adds the task's metrics to that step's metrics.jsonl row; the best state by the
task's metric (`BEST_METRIC`) is kept in `best/` and named in run.json (`best`), and export
writes it.

Tasks: `classify` (a label per text or text pair; `eval_loss`, `eval_accuracy` and, for two
labels, `eval_f1` of label 1) and `tag` (a tag per word of CoNLL-style data, scored on each
word's first sub-word; `eval_f1`, `eval_precision`, `eval_recall` over entities as `seqeval`
counts them, and the token-level `eval_accuracy`). `sft` trains a decoder on conversations or
prompt/completion pairs (train/chat.py) with the loss on what the model should write; its
metric is `eval_loss` (lowest kept) over those tokens. `qa` reads SQuAD v1.1/v2.0 JSON into
overlapping windows (train/qa.py) and reports `eval_exact_match` and `eval_f1` as the SQuAD
script scores the answers read back. `seq2seq` trains an encoder-decoder on source -> target
pairs (train/seq2seq.py); each evaluation generates the eval targets with `zoo.generate` and
adds sacreBLEU's `eval_bleu` and `eval_chrf` (best/ keeps the best BLEU). `asr` trains a
feature encoder-decoder (Whisper: Config.num_mel_bins) on a JSONL manifest of audio files and
transcripts (train/asr.py), the encoder reading log-mel features (`zoo.audio.log_mel`,
optionally masked by SpecAugment, --spec-augment); each evaluation transcribes the eval audio
with `zoo.generate` from the tokenizer's forced prefix (`decoder_prompt`) and adds the word
error rate `eval_wer` (jiwer; best/ keeps the lowest).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

import zoo
from train import hosts, lora
from train.checkpoint import Checkpointer, CheckpointError, check_record, quiet_libraries
from train.cli import _HelpFormatter, parse_value
from train.export import head_config, restore_run
from train.loop import Compiled, RunError, evaluate as evaluate_loss, in_run_dir, train_loop
from train.chat import Dialogues, chat_format, encode_dialogues, read_dialogues
from train.asr import Utterances, encode_utterances, read_manifest, wer
from train.objectives import asr as asr_batch, classify, seq2seq, sft
from train.qa import Questions, Windows, answers, read_squad, squad_metrics, windows
from train.seq2seq import Pairs, bleu_chrf, encode_pairs, read_pairs
from train.optim import TASK_HEAD, Hparams, lora_targets
from train.parallel import build_mesh, check_fit, make_runner, process_rows, rules_from
from train.parallel import PARALLEL
from train.report import MetricsLog, Progress, Reporter, peak_flops, plot_losses, read_metrics, summary, train_flops
from train.rundir import EXIT_DONE, EXIT_USAGE, RunStop, read_json, write_atomic
from train.settings import (MAPPING, POSITIVE, POSITIVE_INT, Check, add_flags, check_fields, declared, keys,
                            one_of, setting)
from train.step import abstract_state, batch_shardings, static_task, task_logits
from train.tasks import (DataError, Examples, Tagged, TextEncoder, label_ids, label_names, load_encoder,
                         read_examples, read_tagged, tag_ids)

TASKS = ("classify", "tag", "qa", "seq2seq", "sft", "asr")
HEAD_KIND = {"classify": "sequence", "tag": "token", "qa": "qa"}  # seq2seq and sft train the body's own LM head
BEST_METRIC = {"classify": "eval_accuracy", "tag": "eval_f1", "qa": "eval_f1", "seq2seq": "eval_bleu",
               "sft": "eval_loss", "asr": "eval_wer"}  # what best/ keeps
# the families a task trains; the others: encoders and decoders (a head)
FAMILIES = {"seq2seq": ("encdec",), "sft": ("decoder",), "asr": ("encdec",)}
LOWER_IS_BETTER = {"eval_loss", "eval_wer"}
SPEC_AUGMENT = Check(lambda v: isinstance(v, list) and len(v) in (0, 4)
                     and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v),
                     "four non-negative integers FREQ_MASKS FREQ_WIDTH TIME_MASKS TIME_WIDTH (or none)")
# Fine-tuning defaults over Hparams': BERT's recipe (a small peak rate, AdamW b2 0.999, decay 0.01).
FINETUNE_HPARAMS = {"learning_rate": 5e-5, "total_steps": 300, "weight_decay": 0.01, "b2": 0.999}


@dataclasses.dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; each field is a flag (train/settings.py)."""

    init_from: str | None = setting(None, "a Hugging Face directory or a zoo run dir to start from",
                                    aliases=("from",))
    model: str | None = setting(None, "zoo preset to train from scratch instead of --from (with --tokenizer)")
    task: str = setting("classify", f"the task: {', '.join(TASKS)}", one_of(TASKS))
    data: list = setting(factory=list, help="the training file (classify: TSV, CSV or JSONL; tag: CoNLL; "
                                           "qa: SQuAD JSON; sft: JSONL; seq2seq: TSV/JSONL or two parallel files; "
                                           "asr: a JSONL manifest of audio and text)")
    eval_data: list = setting(factory=list, help="the evaluation file(s), as --data (default: every 50th "
                                                 "training example)")
    tokenizer: str | None = setting(None, "a tokenizer directory or SentencePiece .model (default: the "
                                    "--from checkpoint's)")
    num_labels: int | None = setting(None, "labels of a new head (default: the head's, or those in --data)",
                                     POSITIVE_INT)
    overrides: dict = setting(factory=dict, check=MAPPING, help="model Config fields (KEY=VALUE, e.g. dropout=0.1)")
    batch_size: int = setting(32, "global batch, in examples", POSITIVE_INT)
    seq_len: int = setting(128, "tokens per example (longer ones are cut; qa: per window)", POSITIVE_INT)
    doc_stride: int | None = setting(None, "qa: tokens shared by consecutive windows of a long context "
                                     "(default: seq_len // 3)", POSITIVE_INT)
    num_beams: int = setting(1, "seq2seq, asr: beams of the evaluation's generation (1: greedy)", POSITIVE_INT)
    spec_augment: list = setting(factory=list, check=SPEC_AUGMENT, flag={"type": int},
                                 help="asr: SpecAugment on the training features, FREQ_MASKS FREQ_WIDTH TIME_MASKS "
                                      "TIME_WIDTH (e.g. 2 27 2 100, LibriSpeech's LD policy; default: off)")
    teacher: str | None = setting(None, "classify: distil from this fine-tuned model (a run dir or a Hugging "
                                  "Face directory with a sequence head, same labels and tokenizer); see "
                                  "--distill-alpha, --distill-temperature")
    hparams: Hparams = setting(factory=lambda: Hparams(**FINETUNE_HPARAMS), help="train.Hparams")
    seed: int = setting(0, "seed of the new head, dropout and data order")
    checkpoint_every: int = setting(100, "save a checkpoint every N steps (and at the end)", POSITIVE_INT)
    keep: int = setting(2, "keep the latest K checkpoints (the best one is kept apart)", POSITIVE_INT)
    eval_every: int | None = setting(None, "evaluate every N steps (default: 5 evaluations per run)",
                                     POSITIVE_INT)
    log_every: int | None = setting(None, "a metrics row every N steps (default: 1 up to 1000 steps)",
                                    POSITIVE_INT)
    run_dir: str = setting("runs/finetune", "where the run's files go")
    resume: bool = setting(False, "continue the latest checkpoint in --run-dir with its saved settings")
    mesh: str = setting("data=-1", "device mesh, AXIS=SIZE,... (as for pretraining)")
    parallel: str = setting("jit", "jit (the mesh-sharded step) or pmap", one_of(PARALLEL))
    rules: dict = setting(factory=dict, check=MAPPING, help="logical axis -> mesh axes")
    peak_flops: float | None = setting(None, "peak FLOP/s per device, for MFU", POSITIVE)

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.init_from is None) == (self.model is None):
            raise ValueError("finetune: give exactly one of --from PATH (a checkpoint) and --model PRESET "
                             f"(from scratch), got --from {self.init_from!r} and --model {self.model!r}")
        if self.model is not None:
            if self.model not in zoo.presets.names():
                raise ValueError(f"--model: expected one of {zoo.presets.names()}, got {self.model!r}")
            if self.tokenizer is None:
                raise ValueError(f"--model {self.model}: a model from scratch needs --tokenizer")
        if self.spec_augment and self.task != "asr":
            raise ValueError(f"--spec-augment: masks audio features, for --task asr (got --task {self.task})")
        if self.hparams.label_smoothing and self.task in HEAD_KIND:
            raise ValueError(f"--label-smoothing: smooths the vocabulary cross entropy (seq2seq, sft, asr); "
                             f"--task {self.task} trains a head, which is not smoothed")
        if isinstance(self.eval_data, str):  # run.json of a run before eval_data took two files
            self.eval_data = [self.eval_data]
        files = (1, 2) if self.task == "seq2seq" else (1,)
        for flag, given in (("--data", self.data), ("--eval-data", self.eval_data)):
            if len(given) not in files and (given or flag == "--data"):
                want = "one file or two parallel files" if self.task == "seq2seq" else "one file"
                raise ValueError(f"{flag}: --task {self.task} reads {want}, got {len(given)}: {given}")

    # what train.loop.train_loop reads
    steps = property(lambda self: self.hparams.total_steps)
    log_interval = property(lambda self: self.log_every or max(1, self.steps // 1000))
    eval_interval = property(lambda self: self.eval_every or max(1, self.steps // 5))
    eval_batches = 0  # the whole eval set is evaluated

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the command line ------------------------------------------------------------------------

RUN_KEYS, HPARAM_KEYS = keys(FinetuneConfig), keys(Hparams)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train finetune", formatter_class=_HelpFormatter,
                                description=__doc__.split("\n\n")[0],
                                epilog="KEY=VALUE sets any run or optimizer field (steps=50) or model "
                                       "Config field (dropout=0.1).")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    add_flags(p.add_argument_group("fine-tuning"), FinetuneConfig, declared(FinetuneConfig))
    add_flags(p.add_argument_group("optimizer and step (train.Hparams)"), Hparams,
              {**declared(Hparams), **FINETUNE_HPARAMS})
    return p


def resolve(argv: Sequence[str]) -> FinetuneConfig:
    """FinetuneConfig from a command line; with --resume the run dir's run.json is the lowest
    layer, then flags, then KEY=VALUE pairs."""
    args = parser().parse_intermixed_args(list(argv))
    for name in ("data", "eval_data"):  # `--data a.tsv steps=5`: nargs="+" swallowed the KEY=VALUE after it
        files = getattr(args, name)
        if files:
            extra = [d for d in files if re.fullmatch(r"[A-Za-z_][\w.]*=.*", d) and not Path(d).exists()]
            setattr(args, name, [d for d in files if d not in extra])
            args.pairs = [*args.pairs, *extra]
    layer = {k: v for k, v in vars(args).items() if k != "pairs" and v is not None}
    for item in args.pairs:
        if "=" not in item:
            raise ValueError(f"finetune: {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        layer[key.strip()] = parse_value(value.strip())
    settings = {**declared(FinetuneConfig), "hparams": dict(FINETUNE_HPARAMS)}
    run_json = Path(layer.get("run_dir", FinetuneConfig.run_dir)) / "run.json"
    layers = [layer]
    if layer.get("resume") and not run_json.is_file() and "init_from" not in layer and "model" not in layer:
        raise FileNotFoundError(f"--resume: no run.json in {run_json.parent}; is it a fine-tuning run dir?")
    if layer.get("resume") and run_json.is_file():
        saved = read_json(run_json)
        for k in ("resume", "best", "head"):
            saved.pop(k, None)
        layers.insert(0, saved)
    for one in layers:
        for key, value in one.items():
            _set(settings, key, value)
    return FinetuneConfig(**{**settings, "hparams": Hparams(**settings["hparams"])})


def _set(settings: dict[str, Any], key: str, value: Any) -> None:
    if key == "hparams" and isinstance(value, dict):
        settings["hparams"].update(value)
    elif key == "overrides" and isinstance(value, dict):
        settings["overrides"].update(value)
    elif key in RUN_KEYS:
        settings[RUN_KEYS[key]] = value
    elif key in HPARAM_KEYS:
        settings["hparams"][HPARAM_KEYS[key]] = value
    elif key in {f.name for f in dataclasses.fields(zoo.Config)}:
        settings["overrides"][key] = value
    else:
        raise ValueError(f"finetune: unknown setting {key!r}; run fields are {sorted(RUN_KEYS)}, optimizer "
                         f"fields {sorted(HPARAM_KEYS)}, or a model Config field")


# --- the model and the task ------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    """What a run starts from: the body's Config and params (None: random), a head (or None),
    and the tokenizer."""

    cfg: zoo.Config
    params: dict | None
    head: zoo.heads.Head | None
    encoder: TextEncoder


def load_source(fc: FinetuneConfig) -> Source:
    """The checkpoint --from names (or --model from scratch), with its tokenizer."""
    if fc.model is not None:
        enc = load_encoder(fc.tokenizer)
        ids = {"vocab_size": enc.vocab_size, "pad_id": enc.pad_id}
        if enc.eos_id is not None:
            ids["eos_id"] = enc.eos_id
        cfg = zoo.preset(fc.model, **{**fc.overrides, **ids})
        return Source(cfg, None, None, enc)
    path = Path(fc.init_from)
    if (path / "run.json").is_file():  # Config overrides as for a Hugging Face directory (num_layers: a student)
        src = _from_run(path, fc)
        cfg, params = first_layers(src.cfg.replace(**fc.overrides), src.params, src.cfg)
        return dataclasses.replace(src, cfg=cfg, params=params)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--from {path}: expected a Hugging Face directory (config.json) or a zoo "
                                f"run dir (run.json)")
    cfg, params = zoo.load_hf(path)
    try:
        head = zoo.heads.load_hf(path, cfg)
    except ValueError as e:
        if "holds no task head" not in str(e):
            raise
        head = None
    if fc.overrides:
        cfg, params = first_layers(cfg.replace(**fc.overrides), params, cfg)
    return Source(cfg, params, head, load_encoder(fc.tokenizer or path, cfg.pad_id))


def first_layers(cfg: zoo.Config, params: dict, old: zoo.Config) -> tuple[zoo.Config, dict]:
    """A checkpoint's params for `cfg`, a copy of `old` with fewer `num_layers`: its first
    layers (a shallower student initialised from the teacher's bottom). Other configs pass."""
    if cfg.num_layers >= old.num_layers:
        return cfg, params
    stack = params.get(cfg.family, {}).get("layers") if cfg.family in ("encoder", "decoder") else None
    if stack is None or set(params[cfg.family]) - {"layers", "final_norm", "embed_norm", "positions"}:
        raise ValueError(f"num_layers={cfg.num_layers}: a checkpoint's first layers are taken from one plain "
                         f"stack of {cfg.family} layers; this {old.family} model's layers are laid out otherwise")
    body = {**params[cfg.family], "layers": jax.tree.map(lambda x: x[:cfg.num_layers], stack)}
    return cfg, {**params, cfg.family: body}


def _from_run(path: Path, fc: FinetuneConfig) -> Source:
    """A zoo run dir: a fine-tuning run's best (else latest) state, head included, or a
    pretraining run's latest params."""
    run = read_json(path / "run.json")
    cfg = zoo.Config.from_json((path / "config.json").read_text())
    if "head" not in run:  # a pretraining run
        from train.sample import restore_params

        params, _ = restore_params(path / "checkpoints", cfg)
        return Source(cfg, params, None, load_encoder(fc.tokenizer or path / "tokenizer.model", cfg.pad_id))
    state = restore_run(path)
    head = state.head
    params = {k: v for k, v in lora.merged(state.params, state.hp.lora_alpha).items() if k != TASK_HEAD}
    return Source(cfg, params, head, load_encoder(fc.tokenizer or path / "tokenizer", cfg.pad_id))


def task_head(fc: FinetuneConfig, src: Source, names: tuple[str, ...], path: str) -> zoo.heads.Head:
    """The head to train: the checkpoint's (its labels), else a new one with --num-labels or
    the label `names` found in the train set (`path`). ValueError when --task does not fit
    the model."""
    kind = HEAD_KIND[fc.task]
    if src.cfg.family not in ("encoder", "decoder"):
        raise ValueError(f"--task {fc.task}: an {src.cfg.family} model has no {kind} classification head "
                         f"(encoders and decoders do)")
    if src.head is not None:
        if src.head.kind != kind:
            raise ValueError(f"--task {fc.task}: {fc.init_from} holds a {src.head.kind} head, not a {kind} one")
        if src.head.problem_type != "single_label_classification":  # the loss is the softmax cross entropy
            raise ValueError(f"--task {fc.task}: the head in {fc.init_from} is for {src.head.problem_type}; "
                             f"fine-tuning trains single_label_classification heads so far")
        if fc.num_labels is not None and fc.num_labels != src.head.num_labels:
            raise ValueError(f"--num-labels {fc.num_labels}: the head in {fc.init_from} has "
                             f"{src.head.num_labels} ({list(src.head.labels)})")
        return src.head
    key = jax.random.fold_in(jax.random.key(fc.seed), 1)
    if kind == "qa":  # two outputs, the answer's start and end
        return zoo.heads.init(src.cfg, key, 2, "qa")
    if fc.num_labels is not None:
        if fc.num_labels < len(names):
            raise ValueError(f"--num-labels {fc.num_labels}: {path} has {len(names)} labels {list(names)}")
        if len(names) < fc.num_labels:
            names = tuple(f"LABEL_{i}" for i in range(fc.num_labels)) if names[0].startswith("LABEL_") \
                else names + tuple(f"LABEL_{i}" for i in range(len(names), fc.num_labels))
    elif len(names) < 2:
        raise ValueError(f"--task {fc.task}: {path} has one label ({names[0]!r}), so the number of "
                         f"labels cannot be inferred; pass --num-labels N")
    return zoo.heads.init(src.cfg, key, len(names), kind, labels=names,
                          problem_type="single_label_classification")


# --- data ------------------------------------------------------------------------------------

@dataclasses.dataclass
class ClassifyData:
    """Encoded rows and the train order: the interface train.loop.train_loop reads
    (next_batch, position, set_position, eval_batches, train_rows, epoch_steps). Each epoch
    visits the examples in a permutation seeded by (seed, epoch); the remainder is dropped."""

    train: dict[str, np.ndarray]  # tokens/mask [N, T] (asr: features [N, M, F]), and labels [N] / [N, T],
    # loss_mask [N, T] or target/target_mask [N, T]
    eval: dict[str, np.ndarray]
    batch_size: int
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        n = len(next(iter(self.train.values())))
        if n < self.batch_size:
            raise ValueError(f"--batch-size {self.batch_size}: the train set has only {n} examples")
        self.train_rows = np.arange(n)

    position = property(lambda self: {"epoch": self.epoch, "index": self.index})
    epoch_steps = property(lambda self: len(self.train_rows) // self.batch_size)

    def set_position(self, position: dict[str, int]) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])

    def _local(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        per = self.batch_size // self.process_count
        return {k: v[self.process_index * per:(self.process_index + 1) * per] for k, v in rows.items()}

    def next_batch(self) -> dict[str, np.ndarray]:
        if self.index + self.batch_size > len(self.train_rows):
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.train_rows)
        ids = order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        rows = {k: v[ids] for k, v in self.train.items()}
        return self._local({**rows, "weights": np.ones(len(ids), np.float32)})

    def eval_batches(self, count: int = 0) -> list[dict[str, np.ndarray]]:
        """Every eval example once, in order; the last batch is padded with weight-0 rows."""
        n, b = len(next(iter(self.eval.values()))), self.batch_size
        out = []
        for start in range(0, n, b):
            ids = np.arange(start, start + b)
            rows = {k: v[np.minimum(ids, n - 1)] for k, v in self.eval.items()}
            out.append(self._local({**rows, "weights": (ids < n).astype(np.float32)}))
        return out


Data = Examples | Tagged | Dialogues | Questions | Pairs | Utterances


def read_data(task: str, paths: Sequence[str]) -> Data:
    """The examples of the --data / --eval-data file(s) for `task`."""
    if task == "seq2seq":
        return read_pairs(paths)
    if task == "asr":
        return read_manifest(paths[0])
    return {"tag": read_tagged, "sft": read_dialogues, "qa": read_squad}.get(task, read_examples)(paths[0])


def found_labels(data: Data) -> tuple[str, ...]:
    """The label names of a train set, in id order (tags sorted; none for sft)."""
    if isinstance(data, (Dialogues, Questions, Pairs, Utterances)):
        return ()
    if isinstance(data, Tagged):
        return tuple(sorted({t for tags in data.tags for t in tags}))
    return label_names(data)


def subset(data: Data, ids: Sequence[int]) -> Data:
    """The examples `ids` of `data` (each per-example list indexed)."""
    lists = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    return dataclasses.replace(data, **{k: [v[i] for i in ids] for k, v in lists.items() if isinstance(v, list)})


class Teacher:
    """A fine-tuned classifier whose logits a student learns from: rows -> [B, num_labels]."""

    def __init__(self, src: Source, token_types: bool):
        self.params = {**src.params, TASK_HEAD: src.head.params}
        task, cfg = static_task(src.head), src.cfg
        self.fn = jax.jit(lambda params, rows: task_logits(params, cfg, classify(None, rows, token_types=token_types),
                                                            task)[0])

    def __call__(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        fields = ("tokens", "mask", "token_types", "labels", "weights")
        return np.asarray(self.fn(self.params, {k: rows[k] for k in fields})).astype(np.float32)


def load_teacher(fc: FinetuneConfig, student: Source, head: zoo.heads.Head) -> Teacher:
    """--teacher: a fine-tuned sequence classifier with the student's labels and tokenizer."""
    if fc.task != "classify":
        raise ValueError(f"--teacher: distillation is for --task classify so far, got --task {fc.task}")
    src = load_source(dataclasses.replace(fc, init_from=fc.teacher, model=None, overrides={}, tokenizer=None,
                                          teacher=None))
    if src.head is None or src.head.kind != "sequence":
        raise ValueError(f"--teacher {fc.teacher}: expected a fine-tuned sequence classifier (a head), found "
                         f"{'no head' if src.head is None else 'a ' + src.head.kind + ' head'}")
    if tuple(src.head.labels) != tuple(head.labels):
        raise ValueError(f"--teacher {fc.teacher}: its labels {list(src.head.labels)} differ from the student's "
                         f"{list(head.labels)}")
    if src.encoder.fingerprint != student.encoder.fingerprint:
        raise ValueError(f"--teacher {fc.teacher}: its tokenizer differs from the student's; the teacher reads "
                         f"the student's token rows")
    return Teacher(src, src.cfg.family == "encoder" and src.cfg.type_vocab_size > 0)


class Distilled:
    """A pipeline whose rows carry the teacher's logits (`teacher_logits`), computed as each
    batch is drawn (the same rows on resume, so the same targets)."""

    def __init__(self, base: ClassifyData, teacher: Teacher):
        self.base, self.teacher = base, teacher

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def next_batch(self) -> dict[str, np.ndarray]:
        rows = self.base.next_batch()
        return {**rows, "teacher_logits": self.teacher(rows)}

    def eval_batches(self, count: int = 0) -> list[dict[str, np.ndarray]]:
        return [{**r, "teacher_logits": self.teacher(r)} for r in self.base.eval_batches(count)]


def encode(enc: TextEncoder, data: Data, names: Sequence[str], seq_len: int, train: Data | None = None,
           eos_id: int | None = None) -> dict[str, np.ndarray]:
    """Token rows and labels: [N] for examples, [N, seq_len] for tagged sentences (each word's
    tag at its first sub-word, -1 elsewhere; words past seq_len are cut and not scored); for
    dialogues a loss_mask [N, seq_len] instead (eos_id closes a completion)."""
    if isinstance(data, Dialogues):
        return encode_dialogues(enc, chat_format(enc.source), data, seq_len, eos_id)
    if isinstance(data, Pairs):
        return encode_pairs(enc, data, seq_len)
    if isinstance(data, Tagged):
        rows, first = enc.encode_words(data.words, seq_len)
        labels = np.full(first.shape, -1, np.int32)
        for i, tags in enumerate(tag_ids(data, names, train)):
            scored = first[i] >= 0
            labels[i, scored] = np.asarray(tags, np.int32)[first[i, scored]]
        return {**rows, "labels": labels}
    rows = enc.encode(data.texts, data.pairs, seq_len)
    return {**rows, "labels": label_ids(data, names, train)}


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode() + np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]


# --- metrics ---------------------------------------------------------------------------------

def classification_metrics(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """eval_loss (mean cross entropy), its eval_perplexity, eval_accuracy and, for two labels,
    eval_f1 of label 1, over the rows of weight 1. logits [N, L], labels [N], weights [N]."""
    keep = weights > 0
    logits, labels = logits[keep].astype(np.float64), labels[keep]
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    pred = logits.argmax(-1)
    out = {"eval_loss": float(np.mean(lse - logits[np.arange(len(labels)), labels])),
           "eval_accuracy": float(np.mean(pred == labels))}
    out["eval_perplexity"] = float(np.exp(out["eval_loss"]))  # what the run's summary prints
    if logits.shape[1] == 2:
        tp = np.sum((pred == 1) & (labels == 1))
        denom = np.sum(pred == 1) + np.sum(labels == 1)
        out["eval_f1"] = float(2 * tp / denom) if denom else 0.0
    return out


def tagging_metrics(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                    names: Sequence[str]) -> dict[str, float]:
    """eval_f1, eval_precision, eval_recall over entities (`seqeval`'s default, CoNLL-eval
    counting, micro-averaged), the token-level eval_accuracy and eval_loss, on the scored
    tokens (labels >= 0) of the rows of weight 1. logits [N, T, L], labels [N, T], weights [N]."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    keep = weights > 0
    logits, labels = logits[keep].astype(np.float64), labels[keep]
    scored = labels >= 0
    pred = logits.argmax(-1)
    flat, target = logits[scored], labels[scored]
    lse = np.log(np.sum(np.exp(flat - flat.max(-1, keepdims=True)), -1)) + flat.max(-1)
    true_tags = [[names[t] for t in row[m]] for row, m in zip(labels, scored)]
    pred_tags = [[names[t] for t in row[m]] for row, m in zip(pred, scored)]
    out = {"eval_loss": float(np.mean(lse - flat[np.arange(len(target)), target])),
           "eval_accuracy": float(np.mean(pred[scored] == target)),
           "eval_f1": float(f1_score(true_tags, pred_tags, zero_division=0)),
           "eval_precision": float(precision_score(true_tags, pred_tags, zero_division=0)),
           "eval_recall": float(recall_score(true_tags, pred_tags, zero_division=0))}
    out["eval_perplexity"] = float(np.exp(out["eval_loss"]))
    return out


def qa_metrics(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, w: Windows,
               data: Questions) -> dict[str, float]:
    """eval_exact_match and eval_f1 of the answers read back from every window's logits
    [N, T, 2] (train/qa.py; a question may go unanswered when the data has unanswerable
    ones), and eval_loss: the start and end cross entropy of labels [N, 2]. weights [N]."""
    keep = weights > 0
    logits, labels = logits[keep].astype(np.float64), labels[keep]
    by_pos = np.swapaxes(logits, 1, 2)  # [N, 2, T]
    lse = np.log(np.sum(np.exp(by_pos - by_pos.max(-1, keepdims=True)), -1)) + by_pos.max(-1)
    picked = np.take_along_axis(by_pos, labels[..., None], -1)[..., 0]
    unanswerable = any(not a for a in data.answers)
    out = squad_metrics(answers(logits, w, data, allow_empty=unanswerable), data)
    out["eval_loss"] = float(np.mean(lse - picked))
    out["eval_perplexity"] = float(np.exp(out["eval_loss"]))
    return out


def translation_metrics(s: Setup, params: Any, eval_rows: list[dict], objective: Any,
                        num_beams: int) -> dict[str, float]:
    """eval_bleu and eval_chrf of the eval sources' translations by `zoo.generate` (greedy, or
    num_beams), up to the target length, against the eval targets; for asr, eval_wer of the
    eval audio's transcripts, generated after the decoder prompt."""
    texts = []
    features = s.cfg.num_mel_bins is not None  # a feature encoder reads every frame: no prompt mask
    for rows in eval_rows:
        batch = objective(None, rows)
        with zoo.sharding.use(s.mesh, s.rules):
            out = zoo.generate(params, s.cfg, batch["inputs"], batch["targets"].shape[1],
                               prompt_mask=None if features else batch["inputs"] != s.cfg.pad_id,
                               num_beams=num_beams, decoder_prompt=s.decoder_prompt)
        keep = _gather(rows["weights"]) > 0
        texts += [s.source.encoder.decode(_until_stop(row, s.cfg.eos_id)) for row in _gather(out)[keep]]
    if isinstance(s.references, Utterances):
        return {"eval_wer": wer(s.references.texts, texts)}
    return bleu_chrf(texts, s.references.targets)


def _until_stop(ids: np.ndarray, eos_id: int | None) -> np.ndarray:
    stop = np.flatnonzero(ids == eos_id) if eos_id is not None else []
    return ids[:stop[0]] if len(stop) else ids


def trainable_count(state: Any, hp: Hparams) -> int:
    """Parameters the optimizer updates: all, or with LoRA the adapters and the head."""
    params = state.params if not hp.lora_rank else {k: v for k, v in state.params.items()
                                                    if k in (lora.LORA, TASK_HEAD)}
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


# --- the run ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """What train.loop.train_loop reads of a run (cfg, pipeline, rows_sharding, record), and
    the task's parts."""

    cfg: zoo.Config
    hp: Hparams
    task: zoo.heads.Head | None  # static part; None: sft (no head)
    source: Source
    head: zoo.heads.Head | None
    pipeline: ClassifyData
    mesh: Any
    rules: Any
    rows_sharding: dict
    rows_like: dict  # ShapeDtypeStructs of a global batch of rows
    record: dict[str, Any]
    eval_count: int
    qa: tuple[Windows, Questions] | None = None  # the eval windows and questions, to read answers back
    references: Pairs | Utterances | None = None  # seq2seq / asr: the eval pairs / utterances, whose targets
    # (transcripts) generation is scored against
    decoder_prompt: np.ndarray | None = None  # asr: int32 [P], what generation starts from


def setup(fc: FinetuneConfig) -> Setup:
    """Every check before anything is written or compiled: the model, the head, the data
    and its labels, the mesh."""
    mesh, rules = build_mesh(fc.mesh), rules_from(fc.rules)
    check_fit(fc.batch_size, mesh, rules, fc.parallel, fc.hparams.accum_steps)
    if fc.task == "tag":
        try:
            import seqeval  # noqa: F401  (the entity F1 of every evaluation)
        except ImportError:
            raise ValueError("--task tag scores entities with seqeval: pip install seqeval") from None
    train = read_data(fc.task, fc.data)
    src = load_source(fc)
    cfg = src.cfg
    if cfg.positions in ("learned", "sinusoidal") and fc.seq_len > cfg.max_len:
        raise ValueError(f"--seq-len {fc.seq_len} exceeds the model's max_len {cfg.max_len}")
    if src.encoder.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {src.encoder.vocab_size} ids, the model {cfg.vocab_size}")
    if fc.task in FAMILIES and cfg.family not in FAMILIES[fc.task]:
        what = {"sft": "decoders (next-token prediction)", "seq2seq": "encoder-decoders (source -> target)",
                "asr": "feature encoder-decoders (speech -> transcript: Whisper)"}
        raise ValueError(f"--task {fc.task} trains {what[fc.task]}; this is an {cfg.family} model")
    if fc.task == "seq2seq" and cfg.num_mel_bins is not None:
        raise ValueError("--task seq2seq reads source tokens; this model's encoder reads audio features "
                         "(num_mel_bins): use --task asr")
    head = None if fc.task in FAMILIES else task_head(fc, src, found_labels(train), train.path)
    if fc.hparams.lora_rank:
        lora.check_targets(zoo.axes(cfg), lora_targets(fc.hparams))
    teacher = load_teacher(fc, src, head) if fc.teacher else None
    names = () if head is None else head.labels
    if fc.eval_data:
        evaluation = read_data(fc.task, fc.eval_data)
        eval_of = train
    else:  # every 50th training example is held out
        held = set(range(49, len(train), 50)) or {0}
        evaluation = subset(train, sorted(held))
        train = subset(train, [i for i in range(len(train)) if i not in held] or sorted(held))
        eval_of = None
    if isinstance(train, Examples) and (evaluation.pairs is None) != (train.pairs is None):
        raise DataError(f"{evaluation.path}: expected {'text pairs' if train.pairs else 'single texts'} as in "
                        f"{train.path}")
    qa, prompt = None, None
    if isinstance(train, Utterances):
        train_rows, prompt = encode_utterances(src.encoder, train, cfg, fc.seq_len)
        eval_rows, _ = encode_utterances(src.encoder, evaluation, cfg, fc.seq_len)
    elif isinstance(train, Questions):
        stride = fc.doc_stride or fc.seq_len // 3
        train_rows = windows(src.encoder, train, fc.seq_len, stride).rows
        qa = (windows(src.encoder, evaluation, fc.seq_len, stride), evaluation)
        eval_rows = qa[0].rows
    else:
        train_rows = encode(src.encoder, train, names, fc.seq_len, eos_id=cfg.eos_id)
        eval_rows = encode(src.encoder, evaluation, names, fc.seq_len, eval_of, eos_id=cfg.eos_id)
    rows_like = {k: jax.ShapeDtypeStruct((fc.batch_size, *v.shape[1:]), v.dtype) for k, v in train_rows.items()}
    rows_like["weights"] = jax.ShapeDtypeStruct((fc.batch_size,), np.float32)
    rows_sharding = batch_shardings(rows_like, mesh, rules)
    first = next(iter(train_rows))  # tokens, or an asr run's features
    part, parts = process_rows(rows_sharding[first], rows_like[first].shape)
    pipeline = ClassifyData(train_rows, eval_rows, fc.batch_size, fc.seed, part, parts)
    if teacher is not None:
        pipeline = Distilled(pipeline, teacher)
        rows_like["teacher_logits"] = jax.ShapeDtypeStruct((fc.batch_size, head.num_labels), np.float32)
        rows_sharding = batch_shardings(rows_like, mesh, rules)
    record = {"config": cfg.to_dict(), "objective": fc.task, "seq_len": fc.seq_len, "batch_size": fc.batch_size,
              "seed": fc.seed, "tokenizer": src.encoder.fingerprint, "data_fingerprint": fingerprint(train_rows),
              "hparams": dataclasses.asdict(fc.hparams), "head": None if head is None else head_config(static_task(head))}
    if teacher is not None:
        record["teacher"] = fc.teacher
    task = None if head is None else static_task(head)
    return Setup(cfg, fc.hparams, task, src, head, pipeline, mesh, rules, rows_sharding, rows_like, record,
                 len(evaluation), qa, evaluation if isinstance(evaluation, (Pairs, Utterances)) else None, prompt)


class Best:
    """The best evaluation so far: its state in RUN_DIR/best (one checkpoint), its step and
    metrics in run.json `best`."""

    def __init__(self, run_dir: Path, run_files: dict[str, Any], metric: str):
        self.run_dir, self.run_files, self.metric = run_dir, run_files, metric
        self.ckpt = Checkpointer(run_dir / "best", every=1, keep=1)
        self.best = run_files.get("best")

    def offer(self, step: int, metrics: dict[str, float], state: Any, record: dict[str, Any]) -> None:
        if self.best is not None:
            new, old = metrics[self.metric], self.best[self.metric]
            if (new >= old) if self.metric in LOWER_IS_BETTER else (new <= old):
                return
        self.ckpt.save(step, state, {**record, "step": step}, force=True)
        self.best = {"step": step, "metric": self.metric, **metrics, "path": f"best/{step}"}
        if hosts.is_primary():
            write_atomic(self.run_dir / "run.json", json.dumps({**self.run_files, "best": self.best}, indent=2))

    def close(self) -> None:
        self.ckpt.close()


def make_evaluate(s: Setup, runner: Any, best: Best, objective: Any, num_beams: int = 1) -> Any:
    """(state, eval_rows) -> the eval metrics; offers the state to `best`."""
    predict = jax.jit(lambda params, batch: task_logits(lora.merged(params, s.hp.lora_alpha), s.cfg, batch,
                                                        s.task)[0])

    def evaluate(state: Any, eval_rows: list[dict]) -> dict[str, float]:
        if s.task is None:  # sft, seq2seq: the held-out loss over the tokens to write
            metrics = evaluate_loss(Compiled(objective, runner), state, eval_rows, jax.random.key(0))
            if s.references is not None:
                metrics.update(translation_metrics(s, lora.merged(state.params, s.hp.lora_alpha), eval_rows,
                                                   objective, num_beams))
            best.offer(int(jax.device_get(state.step)), metrics, runner.global_state(state),
                       {**s.record, "data": s.pipeline.position})
            return metrics
        logits, labels, weights = [], [], []
        for rows in eval_rows:
            batch = objective(None, rows)
            with zoo.sharding.use(s.mesh, s.rules):
                logits.append(_gather(predict(state.params, batch)))
            labels.append(_gather(rows["labels"]))
            weights.append(_gather(rows["weights"]))
        logits, labels, weights = np.concatenate(logits), np.concatenate(labels), np.concatenate(weights)
        if s.task.kind == "qa":
            metrics = qa_metrics(logits, labels, weights, *s.qa)
        elif s.task.kind == "token":
            metrics = tagging_metrics(logits, labels, weights, s.task.labels)
        else:
            metrics = classification_metrics(logits, labels, weights)
        step = int(jax.device_get(state.step))
        best.offer(step, metrics, runner.global_state(state), {**s.record, "data": s.pipeline.position})
        return metrics

    return evaluate


def run(fc: FinetuneConfig) -> dict[str, Any]:
    """Fine-tunes as `fc` says; nothing is written to the run dir before every check passed
    (a run dir this call created is removed when it fails before run.json exists)."""
    run_dir = Path(fc.run_dir)
    return in_run_dir(run_dir, lambda: _run_locked(fc, run_dir))


def _run_locked(fc: FinetuneConfig, run_dir: Path) -> dict[str, Any]:
    primary = hosts.is_primary()
    ckpt = Checkpointer(run_dir / "checkpoints", fc.checkpoint_every, fc.keep)
    latest = ckpt.latest_step()
    if latest is not None and not fc.resume:
        raise RunError(f"{run_dir} already holds a run (checkpoints up to step {latest}): pass --resume to "
                       f"continue it, or choose another --run-dir")
    s = setup(fc)
    state, start = None, 0
    if latest is not None:
        vet = lambda record, where: check_record(record, s.record, str(where))
        state, start, record, _ = ckpt.restore_intact(abstract_state(s.cfg, s.hp, s.task), s.mesh, s.rules, vet)
        s.pipeline.set_position(record["data"])
    token_types = s.cfg.family == "encoder" and s.cfg.type_vocab_size > 0
    spans = s.task is not None and s.task.kind == "qa"
    eval_batch = None  # the objective of evaluations, when it differs from training's
    if fc.task == "seq2seq":
        make_batch = functools.partial(seq2seq, start_id=s.cfg.decoder_start_id)
    elif fc.task == "asr":  # SpecAugment while training only
        eval_batch = functools.partial(asr_batch, start_id=s.cfg.decoder_start_id)
        make_batch = functools.partial(eval_batch, spec_augment=tuple(fc.spec_augment))
    elif fc.task == "sft":
        make_batch = sft
    else:
        make_batch = lambda key, rows: classify(key, rows, token_types=token_types, spans=spans)
    batch_like = jax.eval_shape(make_batch, None, s.rows_like)
    runner = make_runner(s.cfg, s.hp, s.mesh, batch_like, fc.parallel, s.rules, s.task)
    objective = jax.jit(make_batch, out_shardings=runner.batch_sh)
    eval_objective = objective if eval_batch is None else jax.jit(eval_batch, out_shardings=runner.batch_sh)
    if state is None:
        params = s.source.params
        if params is not None and s.head is not None:
            params = {**params, TASK_HEAD: s.head.params}
        state = runner.init(fc.seed, params)
    old = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    run_files = {**fc.to_dict(), "head": s.record["head"]}
    if old.get("best") and start:
        run_files["best"] = old["best"]
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "run.json", json.dumps(run_files, indent=2))
        write_atomic(run_dir / "config.json", s.cfg.to_json())
        s.source.encoder.save(run_dir / "tokenizer")
        if start:
            print(f"resumed {fc.run_dir} at step {start}", flush=True)
    best = Best(run_dir, run_files, BEST_METRIC[fc.task])
    compiled = Compiled(objective, runner, make_evaluate(s, runner, best, eval_objective, fc.num_beams))
    # A task head replaces the vocabulary projection (and MLM transform): not counted then.
    flops = train_flops(s.cfg, fc.seq_len, 1, heads=s.head is None) * fc.batch_size
    peak, peak_note = peak_flops(list(s.mesh.devices.flat), fc.peak_flops)
    if primary:
        origin = fc.init_from or f"{fc.model} (from scratch)"
        labels = "" if s.head is None else f", {s.head.num_labels} labels {list(s.head.labels)}"
        print(f"fine-tuning {origin} ({s.cfg.family}, {zoo.param_count(s.cfg) / 1e6:.2f}M params) | task "
              f"{fc.task}{labels} | {len(s.pipeline.train_rows)} train "
              f"/ {s.eval_count} eval examples | batch {fc.batch_size} x {fc.seq_len}", flush=True)
        print(f"trainable {trainable_count(state, fc.hparams) / 1e6:.3f}M params"
              f"{f' (LoRA r={fc.hparams.lora_rank} on {fc.hparams.lora_targets}, and the head)' if fc.hparams.lora_rank else ''}"
              f" | optimizer state {tree_bytes(state.opt_state) / 2**20:.2f} MiB", flush=True)
    t0 = time.time()
    log = MetricsLog(run_dir, start, enabled=primary)
    reporter = Reporter(log, Progress(fc.steps, flops, peak, enabled=primary), flops, peak, fc.steps)
    try:
        try:
            state, stopped = train_loop(fc, s, compiled, ckpt, state, start, reporter)
        finally:
            log.close()
    finally:
        best.close()
        ckpt.close()
    rows = read_metrics(run_dir / "metrics.jsonl", [])
    if rows and primary:
        plot_losses(rows, run_dir / "loss.png")
        print(_closing(summary(rows, run_dir, time.time() - t0, stopped is not None, ckpt.all_steps(), peak_note),
                       run_dir, ckpt.all_steps(), best.best), flush=True)
    return {"best": best.best, "interrupted": stopped is not None, "signal": stopped}


def _closing(text: str, run_dir: Path, steps: list[int], best: dict | None) -> str:
    """The pretraining summary's losses and speed, with this run's files and commands."""
    lines = [line for line in text.splitlines() if not line.startswith(("  run dir", "  continue"))]
    if best:
        lines.append(f"  best: step {best['step']}, {best['metric']} {best[best['metric']]:.4f} (best/)")
    lines += [f"  run dir {run_dir}: checkpoints/ (steps {steps}), best/, tokenizer/, run.json, config.json, "
              f"metrics.jsonl, loss.png",
              f"  continue: python -m train finetune --resume --run-dir {run_dir} [--steps N]; "
              f"export: python -m train export --run {run_dir} --out DIR"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m train finetune ...`: exit status as `python -m train` (train/rundir.py)."""
    argv = sys.argv[2:] if argv is None else argv
    quiet_libraries()
    try:
        result = run(resolve(argv))
    except RunStop as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError, RunError, CheckpointError, zoo.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 128 + result["signal"] if result["interrupted"] else EXIT_DONE
