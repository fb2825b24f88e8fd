"""Task heads on an encoder or decoder body: sequence classification, token classification
and extractive question answering, in and out of Hugging Face `*For...` checkpoints.

    cfg, params = zoo.load_hf(path)                  # the body
    head = zoo.heads.load_hf(path, cfg)              # the task head stored there
    out = zoo.encoder.forward(params, cfg, tokens, mask=mask)     # or zoo.decoder.forward
    logits = zoo.heads.apply(head, cfg, out, mask=mask)
    #   sequence: [B, num_labels]; token: [B, T, num_labels]; qa: [B, T, 2] (start, end)
    zoo.save_hf(cfg, params, out_dir, head=head)     # transformers reloads the same *For... class
    head = zoo.heads.init(cfg, key, num_labels=3, kind="sequence")    # "token", "qa" too

A `Head` is a pytree whose leaves are its parameters; its kind, label names, problem type and
`Recipe` are static (aux data), so `jax.jit(zoo.heads.apply, static_argnums=1)` takes a head
as an ordinary argument, and `jax.grad` / optax see only the parameters.

How each Hugging Face class reads the body, as zoo's `Recipe`:
- BERT, ALBERT sequence: the body's pooler output (`Output.pooled`) -> dropout -> classifier.
- RoBERTa sequence: the first token -> dense -> tanh -> dropout -> out_proj.
- decoders (Llama, Mistral, Qwen, Gemma) sequence: the last non-pad token -> score (no bias),
  found by the pad id as transformers does (see `apply`).
- token classification: dropout -> linear on every position; QA: a linear [D, 2] on every
  position, no dropout. (Dropout runs only when `apply` gets a key; zoo drops once, before
  the output projection.)

Adding a model type's heads (zoo/hf/heads.py has the pieces): give its `ModelType` a
`heads=` tuple of `zoo.hf.heads.HeadFormat`s, one per transformers class, e.g.

    heads=encoder_heads("Bert", Recipe(pool="pooled"))           # zoo/hf/bert.py
    heads=decoder_heads("Llama")                                 # zoo/hf/llama.py
    heads=(HeadFormat("DistilBertForSequenceClassification", "sequence",
                      Recipe(pool="first", act="relu"),
                      {"dense": "pre_classifier", "out": "classifier"}, dropout=("seq_classif_dropout",)),
           ...)

A format names the HF module of each head part ("out", "dense", "norm"; ".weight"/".bias"
are appended), the recipe, where the class keeps the body when not at the type's prefix
(`base`), the config fields holding its dropout rate, whether its QA output has a row per
label (`qa_by_labels`, BERT-shaped classes) and optional hooks that read recipe fields from /
write them to the config (ModernBERT's `classifier_pooling`). tests/test_heads.py checks each
(type, kind) transformers has a class for against it: add the type's body to its `_BODIES`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.encoder import pool as mean_pool
from zoo.nn.backend import resolve
from zoo.nn.checks import check_mask, check_same_shape
from zoo.nn.mlp import activation, dense, dense_spec
from zoo.nn.norms import apply_norm, norm_spec
from zoo.nn.output import Output
from zoo.nn.param import Spec, init_std, materialize
from zoo.nn.transformer import dropout as drop

KINDS = ("sequence", "token", "qa")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# What a sequence head classifies: the body's pooler output (BERT), the first token (RoBERTa,
# [CLS]), the mean over real tokens, or the last non-pad token (decoders).
POOLS = ("pooled", "first", "mean", "last")
_ACTIVATIONS = ("tanh", "relu", "gelu", "gelu_tanh", "silu")


class Recipe(NamedTuple):
    """How a head reads the body: the parts of one Hugging Face class.

    pool: for sequence heads, one of POOLS. act: a dense [D, D] with this activation before
    the output projection (None: none); dense_bias: whether that dense has a bias; norm: the
    body's norm (cfg.norm) after it (ModernBERT's prediction head); bias: whether the output
    projection has one (decoders' sequence `score` has none).
    """

    pool: str = "first"
    act: str | None = None
    dense_bias: bool = True
    norm: bool = False
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class Head:
    """A task head: params (leaves) and what they mean (static).

    params: {"out": {"kernel": [D, L], "bias"?: [L]}, "dense"?: {"kernel": [D, D], "bias"?},
    "norm"?: {...}}; kind: one of KINDS; labels: the name of each label in id order (HF
    `id2label`; a qa head keeps them too, as transformers' config does, but always has 2
    outputs, start and end); problem_type: one of PROBLEM_TYPES (the loss
    transformers trains it with); recipe: `Recipe`; dropout: the rate before the output
    projection; pad_id: the pad token id a "last"-pooling head skips (None: the checkpoint has
    none, so, as transformers, it scores the last position of a single row).
    """

    params: dict
    kind: str = "sequence"
    labels: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str = "single_label_classification"
    recipe: Recipe = Recipe()
    dropout: float = 0.0
    pad_id: int | None = None

    def __post_init__(self) -> None:
        check(self.kind, len(self.labels), self.problem_type, self.recipe, "Head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Head: dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def outputs(self) -> int:
        """The output projection's width: num_labels, or 2 (start, end) for qa."""
        return outputs(self.kind, self.num_labels)


def outputs(kind: str, num_labels: int) -> int:
    return 2 if kind == "qa" else num_labels


jax.tree_util.register_dataclass(Head, data_fields=["params"],
                                 meta_fields=["kind", "labels", "problem_type", "recipe", "dropout", "pad_id"])


def check(kind: str, num_labels: int, problem_type: str, recipe: Recipe, where: str) -> None:
    """ValueError naming what zoo does not support: kind, label count, problem type, recipe."""
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if num_labels < 1:
        raise ValueError(f"{where}: num_labels must be >= 1, got {num_labels}")
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"{where}: problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")
    if recipe.pool not in POOLS:
        raise ValueError(f"{where}: recipe.pool must be one of {POOLS}, got {recipe.pool!r}")
    if recipe.act is not None and recipe.act not in _ACTIVATIONS:
        raise ValueError(f"{where}: recipe.act must be None or one of {_ACTIVATIONS}, got {recipe.act!r}")
    if recipe.norm and recipe.act is None:
        raise ValueError(f"{where}: recipe.norm follows the dense, which recipe.act=None leaves out")


def default_problem_type(num_labels: int) -> str:
    """transformers' choice for integer labels when the config names none."""
    return "regression" if num_labels == 1 else "single_label_classification"


def spec(cfg: Config, num_outputs: int, recipe: Recipe) -> Spec:
    """The head's parameter declarations (one `Param` per tensor); num_outputs: `Head.outputs`."""
    std = init_std(cfg, "dense", cfg.d_model)
    out: Spec = {}
    if recipe.act is not None:
        out["dense"] = dense_spec(cfg.d_model, cfg.d_model, ("embed", "mlp"), recipe.dense_bias, std)
    if recipe.norm:
        out["norm"] = norm_spec(cfg)
    out["out"] = dense_spec(cfg.d_model, num_outputs, ("embed", None), recipe.bias, std)
    return out


def default_recipe(cfg: Config, kind: str) -> Recipe:
    """The recipe of a body no Hugging Face type reproduces: BERT's with a pooler, RoBERTa's
    without, the last token of a decoder; qa heads have no bias-free variant."""
    if kind != "sequence":
        return Recipe()
    if cfg.family == "decoder":
        return Recipe(pool="last", bias=False)
    return Recipe(pool="pooled") if cfg.pooler else Recipe(pool="first", act="tanh")


def init(cfg: Config, key: jax.Array, num_labels: int = 2, kind: str = "sequence", *,
         labels: tuple[str, ...] | None = None, problem_type: str | None = None,
         dropout: float | None = None, model_type: str | None = None) -> Head:
    """A random head of `kind` with `num_labels` outputs (qa: always 2, start and end; its
    num_labels only sizes the config's id2label, as in transformers' generic QA classes).

    labels: label names in id order (default "LABEL_i", as transformers); problem_type:
    default "regression" for one label, else "single_label_classification"; dropout: default
    cfg.dropout where the Hugging Face class has a classifier dropout, else 0. model_type: the
    Hugging Face type whose class the head copies; default the one `zoo.save_hf` would write
    for cfg (or, when none reproduces cfg or its class reads a pooler cfg lacks, `default_recipe`).
    """
    from zoo.hf.heads import format_for

    labels = tuple(labels) if labels is not None else tuple(f"LABEL_{i}" for i in range(num_labels))
    if len(labels) != num_labels:
        raise ValueError(f"heads.init: labels has {len(labels)} names, num_labels={num_labels}")
    problem_type = problem_type or default_problem_type(num_labels)
    fmt = format_for(cfg, kind, model_type) if kind in KINDS else None
    if fmt is not None and kind == "sequence" and fmt.recipe.pool == "pooled" and not cfg.pooler:
        if model_type is not None:
            raise ValueError(f"heads.init: a {fmt.arch} reads the body's pooler, and cfg.pooler is False")
        fmt = None  # BERT-shaped without a pooler: RoBERTa's own dense + tanh
    recipe = fmt.recipe if fmt is not None else default_recipe(cfg, kind)
    check(kind, num_labels, problem_type, recipe, "heads.init")
    if dropout is None:
        dropout = cfg.dropout if fmt is None or fmt.dropout else 0.0
    params = materialize(spec(cfg, outputs(kind, num_labels), recipe), key, jnp.dtype(cfg.param_dtype))
    return Head(params, kind, labels, problem_type, recipe, float(dropout),
                cfg.pad_id if recipe.pool == "last" else None)


def load_hf(path: str | os.PathLike, cfg: Config) -> Head:
    """The task head of a Hugging Face `*ForSequenceClassification`, `*ForTokenClassification`
    or `*ForQuestionAnswering` directory, for the body `cfg` (`zoo.load_hf(path)[0]`).

    Raises ValueError when the directory holds no head (naming the classes looked for), two
    heads, or one zoo does not support (its num_labels, problem_type or pooling)."""
    from zoo.hf.heads import load

    return load(path, cfg)


# --- apply ---------------------------------------------------------------------------------------
def apply(head: Head, cfg: Config, out: Output, *, mask: jax.Array | None = None,
          tokens: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
    """Logits of `head` on a body's Output (hidden [B, T, D]).

    Returns sequence: [B, num_labels]; token: [B, T, num_labels]; qa: [B, T, 2] (start, end).
    mask: bool [B, T], True on real tokens: "mean" pooling averages over them and "last"
    pooling scores the rightmost one. tokens: int [B, T]: "last" pooling then finds it by
    `head.pad_id`, exactly as transformers' `*ForSequenceClassification` does (a real token
    equal to the pad id counts as padding there). A head without a pad id scores the last
    position and, as transformers, refuses batches of more than one row.
    key: dropout RNG (None: no dropout).
    """
    cfg = resolve(cfg)
    hidden = out.hidden
    _check_inputs(head, hidden, mask, tokens)
    x = _pool(head, out, mask, tokens) if head.kind == "sequence" else hidden
    p = head.params
    if "dense" in p:
        x = _activation(head.recipe.act)(dense(x, p["dense"], cfg.matmul))
        if "norm" in p:
            x = apply_norm(p["norm"], x, cfg)
    x = drop(x, head.dropout, key)
    return dense(x, p["out"], cfg.matmul)


def _activation(name: str | None):
    return jnp.tanh if name == "tanh" else activation(name)


def _check_inputs(head: Head, hidden: jax.Array, mask: jax.Array | None, tokens: jax.Array | None) -> None:
    if not isinstance(head, Head):
        raise TypeError(f"heads.apply: head must be a zoo.heads.Head, got {type(head).__name__}")
    like = jax.ShapeDtypeStruct(hidden.shape[:2], jnp.int32)  # [B, T] of the body's output
    check_mask("mask", mask, "out.hidden[:, :, 0]", like)
    check_same_shape("tokens", tokens, "out.hidden[:, :, 0]", like)
    kernel = head.params["out"]["kernel"]
    if tuple(kernel.shape) != (hidden.shape[-1], head.outputs):
        raise ValueError(f"heads.apply: head.params['out']['kernel'] has shape {tuple(kernel.shape)}, "
                         f"expected (d_model={hidden.shape[-1]}, {head.outputs} outputs of this {head.kind} head)")


def _pool(head: Head, out: Output, mask: jax.Array | None, tokens: jax.Array | None) -> jax.Array:
    """hidden [B, T, D] -> [B, D] by head.recipe.pool."""
    hidden = out.hidden
    pool = head.recipe.pool
    if pool == "pooled":
        if out.pooled is None:
            raise ValueError("heads.apply: this sequence head reads Output.pooled, which the body has "
                             "not (cfg.pooler=False)")
        return out.pooled
    if pool == "first":
        return hidden[:, 0]
    if pool == "mean":
        return mean_pool(hidden, mask, "mean").astype(hidden.dtype)
    return hidden[jnp.arange(hidden.shape[0]), last_index(head.pad_id, hidden.shape[:2], mask, tokens)]


def last_index(pad_id: int | None, shape: tuple[int, int], mask: jax.Array | None,
               tokens: jax.Array | None) -> jax.Array | int:
    """int [B]: the rightmost real position of each row, as transformers' sequence
    classifiers pick it (left or right padding); a row without one gives 0. pad_id None: the
    last position, for one row only (transformers raises for more)."""
    batch, length = shape
    if pad_id is None:
        if batch != 1:
            raise ValueError(f"heads.apply: this head has no pad_id (its checkpoint names no pad_token_id), "
                             f"so, as transformers, it classifies one row at a time; got {batch} rows. "
                             f"Set one: dataclasses.replace(head, pad_id=...)")
        return length - 1
    if tokens is not None:
        real = tokens != pad_id
    elif mask is not None:
        real = mask
    else:
        return length - 1
    return jnp.argmax(jnp.arange(length) * real.astype(jnp.int32), axis=-1)
