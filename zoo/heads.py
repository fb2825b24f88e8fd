"""Task heads for the encoder: sequence and token classification.

Heads have their own parameter trees so a user can put any number on one encoder:

    head = zoo.heads.init(cfg, key, num_labels=2, kind="sequence")
    out = zoo.encoder.forward(params, cfg, tokens, mask=mask)
    logits = zoo.heads.apply(head, cfg, out)            # [B, num_labels]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.mlp import dense, dense_spec
from zoo.nn.output import Output
from zoo.nn.param import Spec, init_std, materialize

KINDS = ("sequence", "token")


def spec(cfg: Config, num_labels: int, kind: str = "sequence") -> Spec:
    """Sequence heads on a model without a pooler get their own dense+tanh on the first
    token (RoBERTa style); with a pooler they read `Output.pooled` (BERT style)."""
    if kind not in KINDS:
        raise ValueError(f"heads: kind must be one of {KINDS}, got {kind!r}")
    if num_labels < 1:
        raise ValueError(f"heads: num_labels must be >= 1, got {num_labels}")
    std = init_std(cfg, "dense", cfg.d_model)
    out = {"out": dense_spec(cfg.d_model, num_labels, ("embed", None), std=std)}
    if kind == "sequence" and not cfg.pooler:
        out["dense"] = dense_spec(cfg.d_model, cfg.d_model, ("embed", "mlp"), std=std)
    return out


def init(cfg: Config, key: jax.Array, num_labels: int, kind: str = "sequence") -> dict[str, Any]:
    """Random head params: {"out": {kernel [D, L], bias [L]}, "dense"?: {...}}."""
    return materialize(spec(cfg, num_labels, kind), key, jnp.dtype(cfg.param_dtype))


def apply(head: dict, cfg: Config, out: Output, kind: str = "sequence") -> jax.Array:
    """Sequence: [B, num_labels] from the first token; token: [B, T, num_labels]."""
    if kind == "token":
        return dense(out.hidden, head["out"])
    if "dense" in head:
        pooled = jnp.tanh(dense(out.hidden[:, 0], head["dense"]))
    elif out.pooled is not None:
        pooled = out.pooled
    else:
        raise ValueError("heads.apply: this sequence head needs Output.pooled (cfg.pooler=True)")
    return dense(pooled, head["out"])
