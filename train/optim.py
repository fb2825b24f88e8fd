"""Optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and weight
decay only on matrices (never on norms, biases or other vectors)."""

from __future__ import annotations

import dataclasses

import jax
import optax

import zoo
from zoo.nn.transformer import remat_policy


@dataclasses.dataclass(frozen=True)
class Hparams:
    """Everything the step needs besides the model Config; hashable (static under jit).

    accum_steps: micro-batches per step (the batch is split k ways and scanned);
    z_loss: weight of mean(logsumexp(logits)^2); aux_weight: weight of the MoE balance loss;
    remat: what the backward pass recomputes instead of storing: "none" (False), "full"
    (True), "dots" or "minimal" (`zoo.nn.transformer.REMAT_POLICIES`);
    loss_chunk: > 0 computes the output head and loss that many sequence positions at a
    time (it must divide the target length), so the [B, T, V] logits are never stored."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    z_loss: float = 0.0
    aux_weight: float = 0.01
    accum_steps: int = 1
    remat: bool | str = False
    loss_chunk: int = 0

    def __post_init__(self) -> None:
        remat_policy(self.remat)  # raises on an unknown policy
        checks = {
            "learning_rate": self.learning_rate > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "total_steps": self.total_steps >= 1,
            "end_lr_ratio": 0.0 <= self.end_lr_ratio <= 1.0,
            "weight_decay": self.weight_decay >= 0,
            "b1": 0.0 <= self.b1 < 1.0,
            "b2": 0.0 <= self.b2 < 1.0,
            "clip_norm": self.clip_norm >= 0,
            "z_loss": self.z_loss >= 0,
            "aux_weight": self.aux_weight >= 0,
            "accum_steps": isinstance(self.accum_steps, int) and self.accum_steps >= 1,
            "loss_chunk": isinstance(self.loss_chunk, int) and self.loss_chunk >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"Hparams: invalid {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}")


def schedule(hp: Hparams) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then cosine down to end_lr_ratio * lr at
    total_steps. Warmup is capped at total_steps - 1 so a short run still decays."""
    warmup = min(hp.warmup_steps, max(hp.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=hp.learning_rate, warmup_steps=warmup,
        decay_steps=max(hp.total_steps, warmup + 1), end_value=hp.learning_rate * hp.end_lr_ratio)


_NO_DECAY_NAMES = ("bias", "bi", "bo", "bg", "scale")


def decay_mask(cfg: zoo.Config) -> dict:
    """True for parameters that get weight decay: matrices, embeddings and expert weights
    (two or more dims besides the stacked `layers` axis). Norms (the `norm` logical axis)
    and biases (leaf names `bias`, `*_bias`, `bi`, `bo`, `bg`; attention biases are
    [heads, head_dim] but still biases) are excluded."""

    def decays(path: tuple, axes: tuple) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in _NO_DECAY_NAMES or name.endswith("_bias") or "norm" in axes:
            return False
        return len([a for a in axes if a != "layers"]) >= 2

    return jax.tree_util.tree_map_with_path(decays, zoo.axes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(cfg: zoo.Config, hp: Hparams) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule, decay on matrices only)."""
    parts = [optax.clip_by_global_norm(hp.clip_norm)] if hp.clip_norm > 0 else []
    parts.append(optax.adamw(schedule(hp), b1=hp.b1, b2=hp.b2, eps=hp.eps,
                             weight_decay=hp.weight_decay, mask=decay_mask(cfg)))
    return optax.chain(*parts)
