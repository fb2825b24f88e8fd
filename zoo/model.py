"""Family dispatch: `init`, `axes` and `param_count` for any `Config`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from zoo import decoder, encdec, encoder
from zoo.config import Config
from zoo.nn import param as P

_FAMILIES = {"encoder": encoder, "decoder": decoder, "encdec": encdec}


def spec(cfg: Config) -> P.Spec:
    """The model's parameter declarations (shapes, logical axes, initializers)."""
    return _FAMILIES[cfg.family].spec(cfg)


def init(cfg: Config, key: jax.Array) -> dict[str, Any]:
    """Random parameters: a nested dict of arrays in `cfg.param_dtype`.

    Weights are drawn as the published models of the family were: `cfg.initializer`
    "normal" (N(0, 0.02): BERT, RoBERTa, BART, Llama, Mistral, Mixtral), "gpt2" (the same,
    with the residual output projections scaled by 1/sqrt(2 * num_layers)) or "t5" (fan-in
    scaling, 1/sqrt(fan_in), token embeddings N(0, 1)); `zoo.nn.param.init_std` holds the
    rule, each `Param` declaration its std. Norm scales start at 1, biases at 0.
    Runs under `jax.jit` (with out_shardings to create them sharded) and `jax.eval_shape`."""
    if not isinstance(cfg, Config):
        raise TypeError(f"zoo.init: cfg must be a zoo.Config, got {type(cfg).__name__}")
    return P.materialize(spec(cfg), key, jnp.dtype(cfg.param_dtype))


def axes(cfg: Config) -> dict[str, Any]:
    """The params tree with each leaf a tuple of logical axis names, e.g.
    ("layers", "embed", "heads", "head_dim")."""
    return P.logical_axes(spec(cfg))


def param_count(cfg: Config) -> int:
    """Number of parameters, without allocating them."""
    return P.count(spec(cfg))


def forward(params: dict, cfg: Config, *args: Any, **kwargs: Any):
    """The family's forward (`zoo.<family>.forward`)."""
    return _FAMILIES[cfg.family].forward(params, cfg, *args, **kwargs)
