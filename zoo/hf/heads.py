"""Task heads in Hugging Face checkpoints: one `HeadFormat` per transformers `*For...` class,
declared by each model type (`ModelType.heads`), and the one piece of code that finds, reads
and writes them. `zoo.load_hf` / `zoo.save_hf` call it for the body's side of a head
checkpoint, `zoo.heads.load_hf` for the head itself. How to add a type: zoo/heads.py.
"""

from __future__ import annotations

import json
import os
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np

from zoo.config import Config
from zoo.heads import KINDS, Head, Recipe, check, default_problem_type, outputs, spec
from zoo.hf.files import open_weights
from zoo.hf.keymap import Rule, flatten, read_params, rule, unflatten, write_params

# transformers' default when a config names no classifier dropout (BertConfig's
# hidden_dropout_prob, GenericForTokenClassification's fallback).
_DEFAULT_DROPOUT = 0.1


class HeadFormat(NamedTuple):
    """One transformers class with a task head, e.g. BertForSequenceClassification.

    arch: the class name (config.json `architectures`); kind: one of zoo.heads.KINDS; recipe:
    how it reads the body; modules: head part ("out", "dense", "norm") -> the HF module name
    (".weight" / ".bias" appended); base: the prefix under which this class stores the body
    when it is not the model type's (LlamaForQuestionAnswering: "transformer."); dropout: the
    config fields holding the classifier dropout rate, the first one set wins (() = none);
    read(config) -> recipe fields the config chooses; write(head) -> the config fields that
    choose them (both None when the recipe is fixed); qa_by_labels: a QA class whose
    qa_outputs has num_labels rows (BERT's), so it holds only 2 labels.
    """

    arch: str
    kind: str
    recipe: Recipe
    modules: dict[str, str]
    base: str | None = None
    dropout: tuple[str, ...] = ()
    read: Callable[[dict], dict] | None = None
    write: Callable[[Head], dict] | None = None
    qa_by_labels: bool = False

    @property
    def out_key(self) -> str:
        return self.modules["out"] + ".weight"

    def rules(self) -> list[Rule]:
        """The key map of the head's params (rules whose leaf a head lacks are skipped)."""
        out = []
        for part, module in self.modules.items():
            weight = "scale" if part == "norm" else "kernel"
            out += [rule(f"{module}.weight", f"{part}/{weight}", "copy" if part == "norm" else "linear"),
                    rule(f"{module}.bias", f"{part}/bias")]
        return out


_ENCODER_DROPOUT = ("classifier_dropout", "hidden_dropout_prob")


def encoder_heads(arch: str, recipe: Recipe, modules: dict[str, str] | None = None,
                  dropout: tuple[str, ...] = _ENCODER_DROPOUT) -> tuple[HeadFormat, ...]:
    """BERT-shaped classes: `{arch}ForSequenceClassification` (recipe, modules, default
    {"out": "classifier"}), `{arch}ForTokenClassification` (dropout + classifier on every
    token) and `{arch}ForQuestionAnswering` (qa_outputs, no dropout)."""
    return (HeadFormat(f"{arch}ForSequenceClassification", "sequence", recipe,
                       modules or {"out": "classifier"}, dropout=dropout),
            HeadFormat(f"{arch}ForTokenClassification", "token", Recipe(), {"out": "classifier"},
                       dropout=dropout),
            HeadFormat(f"{arch}ForQuestionAnswering", "qa", Recipe(), {"out": "qa_outputs"}, qa_by_labels=True))


def decoder_heads(arch: str, kinds: tuple[str, ...] = KINDS, qa_base: str | None = "transformer.") -> tuple[HeadFormat, ...]:
    """transformers' generic decoder classes: `{arch}ForSequenceClassification` (score without
    bias on the last non-pad token), `{arch}ForTokenClassification` (dropout + score) and
    `{arch}ForQuestionAnswering` (qa_outputs; Llama and Qwen keep its body under
    "transformer.", Mistral under "model.": qa_base None). kinds: the classes the type has."""
    formats = {
        "sequence": HeadFormat(f"{arch}ForSequenceClassification", "sequence",
                               Recipe(pool="last", bias=False), {"out": "score"}),
        "token": HeadFormat(f"{arch}ForTokenClassification", "token", Recipe(), {"out": "score"},
                            dropout=("classifier_dropout", "hidden_dropout")),
        "qa": HeadFormat(f"{arch}ForQuestionAnswering", "qa", Recipe(), {"out": "qa_outputs"}, base=qa_base),
    }
    return tuple(formats[k] for k in kinds)


# --- choosing a format ----------------------------------------------------------------------------
def _of_kind(model_type: Any, kind: str) -> HeadFormat | None:
    return next((f for f in model_type.heads if f.kind == kind), None)


def _classes(model_type: Any) -> str:
    return ", ".join(f.arch for f in model_type.heads) or "none"


def format_for(cfg: Config, kind: str, model_type: str | None) -> HeadFormat | None:
    """The format of `kind` of the type save_hf writes for cfg (`model_type`, or the first that
    reproduces cfg); None when no type reproduces cfg or the type has no such class."""
    from zoo.hf import Unsupported, _choose

    try:
        chosen = _choose(cfg, model_type)[0]
    except Unsupported:
        if model_type is not None:
            raise
        return None
    fmt = _of_kind(chosen, kind)
    if fmt is None and model_type is not None:
        raise ValueError(f"heads.init: transformers has no {kind} head for {model_type} "
                         f"(it has: {_classes(chosen)})")
    return fmt


def find(d: dict, model_type: Any, weights: Any, where: str) -> HeadFormat | None:
    """The head class of a checkpoint: the one config.json `architectures` names, else the one
    whose output weight is stored; None for a checkpoint without a head. Two heads, or a
    stored weight several classes share that `architectures` does not settle, are ValueErrors."""
    named = [f for f in model_type.heads if f.arch in (d.get("architectures") or [])]
    stored = [f for f in model_type.heads if weights.has(f.out_key)]
    keys = sorted({f.out_key for f in stored})
    if len(named) > 1 or len(keys) > 1:
        found = [f.arch for f in named] if len(named) > 1 else [repr(k) for k in keys]
        raise ValueError(f"load_hf: {where} holds two task heads ({', '.join(found)}); zoo loads one")
    if named:
        if not weights.has(named[0].out_key):
            raise ValueError(f"load_hf: {where}: config.json names {named[0].arch}, but the checkpoint "
                             f"lacks its weight {named[0].out_key!r}")
        return named[0]
    if len(stored) > 1:
        raise ValueError(f"load_hf: {where}: {keys[0]!r} is the head of {' or '.join(f.arch for f in stored)}; "
                         f"config.json 'architectures' must name one")
    return stored[0] if stored else None


# --- the body of a head checkpoint ---------------------------------------------------------------
def body_config(d: dict, model_type: Any, weights: Any) -> dict:
    """A head class stores no LM head: the body then reads as tied (its vocabulary logits are
    a stand-in; the task head is what the checkpoint carries)."""
    lm = [r.hf for r in model_type.rules if r.zoo == ("head/kernel",)]
    if lm and not weights.has(lm[0]):
        return {**d, "tie_word_embeddings": True}
    return d


def stored_keys(fmt: HeadFormat | None, weights: Any) -> set[str]:
    """The head's keys in the checkpoint (the body's loader leaves them to zoo.heads.load_hf)."""
    if fmt is None:
        return set()
    return {r.hf for r in fmt.rules() if weights.has(r.hf)}


# --- reading a head -------------------------------------------------------------------------------
def _labels(d: dict, where: str) -> tuple[str, ...]:
    id2label = d.get("id2label")
    if id2label is None:
        return tuple(f"LABEL_{i}" for i in range(int(d.get("num_labels", 2))))
    try:
        ids = sorted(int(i) for i in id2label)
    except (TypeError, ValueError):
        ids = None
    if not id2label or ids != list(range(len(id2label))):
        raise ValueError(f"heads.load_hf: {where}: config field 'id2label' must number labels 0..n-1, "
                         f"got keys {sorted(id2label, key=str)}")
    return tuple(str(id2label.get(str(i), id2label.get(i))) for i in ids)


def _dropout(d: dict, fmt: HeadFormat) -> float:
    for field in fmt.dropout:
        if d.get(field) is not None:
            return float(d[field])
    return _DEFAULT_DROPOUT if fmt.dropout else 0.0


def _pad_id(d: dict, where: str) -> int | None:
    pad = d.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
        raise ValueError(f"heads.load_hf: {where}: config field 'pad_token_id' must be an int or null, got {pad!r}")
    return pad


def load(path: str | os.PathLike, cfg: Config) -> Head:
    """zoo.heads.load_hf: the head stored in a Hugging Face directory, for the body cfg."""
    from zoo.hf import _model_type

    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"heads.load_hf: no config.json in {str(directory)!r}")
    d = json.loads(config_file.read_text())
    model_type, where = _model_type(d), str(directory)
    with open_weights(directory) as weights:
        fmt = find(d, model_type, weights, where)
        if fmt is None:
            looked = ", ".join(f"{f.arch} ({f.out_key})" for f in model_type.heads) or "none (zoo has no heads for it)"
            raise ValueError(f"heads.load_hf: {where} holds no task head; looked for {model_type.name} "
                             f"classes {looked}")
        labels = _labels(d, where)
        recipe = fmt.recipe._replace(**fmt.read(d)) if fmt.read else fmt.recipe
        problem_type = d.get("problem_type") or default_problem_type(len(labels))
        check(fmt.kind, len(labels), problem_type, recipe, f"heads.load_hf: {where} ({fmt.arch})")
        _check_pooler(fmt, recipe, cfg, "heads.load_hf")
        shapes = {p: s.shape for p, s in flatten(spec(cfg, outputs(fmt.kind, len(labels)), recipe)).items()}

        def get(key: str) -> np.ndarray:
            if not weights.has(key):
                raise ValueError(f"heads.load_hf: {where} lacks weight {key!r}, which its {fmt.arch} needs")
            return weights.get(key)

        try:
            buffers, _ = read_params(get, fmt.rules(), cfg, shapes, np.dtype(jax.numpy.dtype(cfg.param_dtype)))
        except ValueError as e:
            raise ValueError(f"heads.load_hf: {where} ({fmt.arch}, {len(labels)} labels in id2label): {e}") from None
    params = unflatten({p: jax.device_put(b) for p, b in buffers.items()})
    return Head(params, fmt.kind, labels, problem_type, recipe, _dropout(d, fmt),
                _pad_id(d, where) if recipe.pool == "last" else None)


def _check_pooler(fmt: HeadFormat, recipe: Recipe, cfg: Config, where: str) -> None:
    if fmt.kind == "sequence" and recipe.pool == "pooled" and not cfg.pooler:
        raise ValueError(f"{where}: a {fmt.arch} reads the body's pooler, and cfg.pooler is False")


# --- writing a head -------------------------------------------------------------------------------
def write(head: Head, cfg: Config, model_type: Any, hf: dict,
          body: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """save_hf's part: fills the head's config fields into `hf` (architectures, id2label,
    problem_type, ...) and returns the tensors to write: the body's, under the class's
    prefix, then the head's. Raises ValueError for a head the class cannot hold."""
    if not isinstance(head, Head):
        raise TypeError(f"save_hf: head must be a zoo.heads.Head, got {type(head).__name__}")
    fmt = _of_kind(model_type, head.kind)
    if fmt is None:
        raise ValueError(f"save_hf: transformers has no {head.kind} head for {model_type.name} "
                         f"(it has: {_classes(model_type)})")
    config = fmt.write(head) if fmt.write else {}
    recipe = fmt.recipe._replace(**fmt.read(config)) if fmt.read else fmt.recipe
    if recipe != head.recipe:
        raise ValueError(f"save_hf: a {fmt.arch} computes {recipe}, the head {head.recipe} "
                         f"(zoo.heads.init(cfg, key, ..., model_type={model_type.name!r}) makes its head)")
    _check_pooler(fmt, recipe, cfg, "save_hf")
    if fmt.qa_by_labels and head.num_labels != 2:
        raise ValueError(f"save_hf: a {fmt.arch} has one qa_outputs row per label, so it holds 2 labels "
                         f"(start, end); the head has {head.num_labels}")
    if head.dropout and not fmt.dropout:
        raise ValueError(f"save_hf: a {fmt.arch} has no classifier dropout, head.dropout={head.dropout}")
    _check_params(head, cfg)
    if recipe.pool == "last":
        if head.pad_id is not None and head.pad_id != cfg.pad_id:
            raise ValueError(f"save_hf: the checkpoint has one pad_token_id; head.pad_id={head.pad_id}, "
                             f"cfg.pad_id={cfg.pad_id}")
        config["pad_token_id"] = head.pad_id
    if fmt.dropout:
        field = fmt.dropout[0]
        if field in hf and hf[field] != head.dropout:  # DistilBertForTokenClassification: the body's
            raise ValueError(f"save_hf: a {fmt.arch} drops out by the body's {field!r} "
                             f"({hf[field]}, Config.dropout); the head has dropout={head.dropout}")
        config[field] = head.dropout
    hf.update(architectures=[fmt.arch], id2label={str(i): name for i, name in enumerate(head.labels)},
              label2id={name: i for i, name in enumerate(head.labels)}, problem_type=head.problem_type,
              **config)
    flat = {p: np.asarray(jax.device_get(a)) for p, a in flatten(head.params).items()}
    # A class whose head takes the LM head's names (ModernBERT's head.*) holds no LM head:
    # the body is written without it.
    lm = {r.hf for r in model_type.rules if r.zoo[0].split("/")[0] in ("mlm", "head")}
    if lm & {r.hf for r in fmt.rules()}:
        body = ((key, a) for key, a in body if key not in lm)
    return chain(_rebase(body, model_type.prefix, fmt.base), write_params(flat, fmt.rules(), cfg))


def _check_params(head: Head, cfg: Config) -> None:
    want = {p: s.shape for p, s in flatten(spec(cfg, head.outputs, head.recipe)).items()}
    got = {p: tuple(a.shape) for p, a in flatten(head.params).items()}
    if got != want:
        raise ValueError(f"save_hf: head.params do not match its recipe and {head.outputs} outputs: "
                         f"got {got}, expected {want}")


def _rebase(tensors: Iterator[tuple[str, np.ndarray]], prefix: str,
            base: str | None) -> Iterator[tuple[str, np.ndarray]]:
    for key, array in tensors:
        if base is not None and key.startswith(prefix):
            key = base + key[len(prefix):]
        yield key, array
