"""Optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and weight
decay only on matrices (never on norms, biases or other vectors)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

import zoo
from train.settings import (DECAY_RATE, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT,
                            Check, check_fields, setting)
from train import lora
from train.lora import LORA
from zoo.nn.param import logical_axes
from zoo.nn.transformer import REMAT_POLICIES

REMAT_CHOICES = ("none", *REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class Hparams:
    """Everything the step needs besides the model Config; hashable (static under jit).
    Each field's help says what it does; `python -m train` makes a flag of each field
    (train/settings.py) and the checks below run when one is made."""

    learning_rate: float = setting(3e-4, "peak learning rate (linear warmup from 0, then cosine "
                                   "decay to end_lr_ratio of it)", POSITIVE, aliases=("lr",))
    # None resolves once, in __post_init__, so a run extended with more steps keeps its warmup.
    warmup_steps: int | None = setting(None, "steps of linear warmup (default: min(100, "
                                       "total_steps // 10))", NON_NEGATIVE_INT, aliases=("warmup",))
    total_steps: int = setting(1000, "optimizer steps: the run's length and the schedule's",
                               POSITIVE_INT, aliases=("steps",))
    end_lr_ratio: float = setting(0.1, "final learning rate, as a fraction of the peak", FRACTION)
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices and embeddings only "
                                  "(never norms or biases)", NON_NEGATIVE)
    b1: float = setting(0.9, "AdamW decay rate of the gradient's first moment", DECAY_RATE)
    b2: float = setting(0.95, "AdamW decay rate of the gradient's second moment", DECAY_RATE)
    eps: float = setting(1e-8, "AdamW epsilon, added to the second moment's square root", NON_NEGATIVE)
    clip_norm: float = setting(1.0, "clip the gradient to this global norm (0: no clipping)",
                               NON_NEGATIVE)
    z_loss: float = setting(0.0, "weight of the z-loss, mean(logsumexp(logits)^2)", NON_NEGATIVE)
    label_smoothing: float = setting(0.0, "train the vocabulary cross entropy against (1 - s) * onehot + s / "
                                     "vocab_size (the logged loss stays the plain cross entropy; task heads "
                                     "are not smoothed)", DECAY_RATE)
    aux_weight: float = setting(0.01, "weight of the MoE load-balancing loss", NON_NEGATIVE)
    score_bias_rate: float = setting(0.0, "DeepSeek-V3's aux-loss-free balancing: after each step "
                                     "every MoE layer's selection bias (Config.router_score_bias) "
                                     "moves by this rate times sign(mean load - expert load), "
                                     "outside the gradient (train/balance.py); 0: it stays",
                                     NON_NEGATIVE)
    accum_steps: int = setting(1, "micro-batches per step: the batch is split k ways and "
                               "scanned, which gives the update of one big batch", POSITIVE_INT)
    remat: bool | str = setting(
        False, "what the backward pass recomputes instead of storing: none (the default), full "
        "(the flag alone; keeps only each layer's input; True), dots (keeps matmul outputs) or "
        "minimal (keeps weight-matmul outputs); zoo.nn.transformer.REMAT_POLICIES",
        Check(lambda v: isinstance(v, bool) or v in REMAT_CHOICES, f"one of {REMAT_CHOICES} or a bool"),
        flag={"nargs": "?", "const": "full", "choices": REMAT_CHOICES, "metavar": "POLICY"})
    loss_chunk: int = setting(0, "compute the output head and the loss this many target "
                              "positions at a time (it must divide the target length), so the "
                              "[B, T, V] logits are never stored; 0: all at once", NON_NEGATIVE_INT)
    lora_rank: int = setting(0, "train low-rank adapters of this rank (and a task head) instead of "
                             "the weights, which stay frozen (train/lora.py); 0: train everything",
                             NON_NEGATIVE_INT)
    lora_alpha: float = setting(16.0, "LoRA scale numerator: an adapter adds alpha / rank * A @ B", POSITIVE)
    distill_alpha: float = setting(0.5, "with a teacher (finetune --teacher): the loss is alpha * T^2 * "
                                   "KL(teacher || student) + (1 - alpha) * cross entropy", FRACTION)
    distill_temperature: float = setting(2.0, "with a teacher: the temperature T both softmaxes are taken at",
                                         POSITIVE)
    lora_targets: str = setting("q,k,v,o", "comma-separated weight names LoRA adapts (attention q,k,v,o; "
                                "MLP wi,wg,wo)", Check(lambda v: isinstance(v, str) and all(v.split(",")),
                                                       "comma-separated names"))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.warmup_steps is None:  # frozen: set the derived default once
            object.__setattr__(self, "warmup_steps", min(100, self.total_steps // 10))


def schedule(hp: Hparams) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then cosine down to end_lr_ratio * lr at
    total_steps. Warmup is capped at total_steps - 1 so a short run still decays."""
    warmup = min(hp.warmup_steps, max(hp.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=hp.learning_rate, warmup_steps=warmup,
        decay_steps=max(hp.total_steps, warmup + 1), end_value=hp.learning_rate * hp.end_lr_ratio)


_NO_DECAY_NAMES = ("bias", "bi", "bo", "bg", "scale")
TASK_HEAD = "task_head"  # the params key of a fine-tuned task head (train/step.py)


def param_axes(cfg: zoo.Config, task: Any = None, hp: Hparams | None = None) -> dict:
    """The logical axes of a state's params: the model's (`zoo.axes`) and, with `task` (a
    `zoo.heads.Head` whose params are left out, static), its head's under TASK_HEAD; with
    hp.lora_rank, the adapters' under LORA."""
    axes = zoo.axes(cfg)
    if hp is not None and hp.lora_rank:
        axes = {**axes, LORA: lora.adapter_axes(axes, lora_targets(hp))}
    if task is not None:
        head_spec = zoo.heads.spec(cfg, task.outputs, task.recipe)
        axes = {**axes, TASK_HEAD: logical_axes(head_spec)}
    return axes


def lora_targets(hp: Hparams) -> tuple[str, ...]:
    return tuple(n.strip() for n in hp.lora_targets.split(","))


def decay_mask(cfg: zoo.Config, task: Any = None, hp: Hparams | None = None) -> dict:
    """True for parameters that get weight decay: matrices, embeddings and expert weights
    (two or more dims besides the stacked `layers` axis). Norms (the `norm` logical axis)
    and biases (leaf names `bias`, `*_bias`, `bi`, `bo`, `bg`; attention biases are
    [heads, head_dim] but still biases) are excluded."""

    def decays(path: tuple, axes: tuple) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in _NO_DECAY_NAMES or name.endswith("_bias") or "norm" in axes:
            return False
        return len([a for a in axes if a != "layers"]) >= 2

    return jax.tree_util.tree_map_with_path(decays, param_axes(cfg, task, hp),
                                            is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(cfg: zoo.Config, hp: Hparams, task: Any = None) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule, decay on matrices only); `task`: a fine-tuning
    task head's static part (its matrices decay too). With hp.lora_rank only the adapters and
    the head are updated and hold moments; the frozen weights get no state at all."""
    parts = [optax.clip_by_global_norm(hp.clip_norm)] if hp.clip_norm > 0 else []
    if not hp.lora_rank:
        parts.append(optax.adamw(schedule(hp), b1=hp.b1, b2=hp.b2, eps=hp.eps,
                                 weight_decay=hp.weight_decay, mask=decay_mask(cfg, task, hp)))
        return optax.chain(*parts)
    # the trainable subtree: adapters and head matrices decay, the head's vectors do not
    matrices = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)
    parts.append(optax.adamw(schedule(hp), b1=hp.b1, b2=hp.b2, eps=hp.eps, weight_decay=hp.weight_decay,
                             mask=matrices))
    return optax.multi_transform({"train": optax.chain(*parts), "frozen": optax.set_to_zero()},
                                 lora.trainable(param_axes(cfg, task, hp), TASK_HEAD))
