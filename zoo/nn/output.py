"""What every family's `forward` returns."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class Output(NamedTuple):
    """logits: [B, T, V]; hidden: [B, T, D] (last hidden state, after the final norm).

    aux_loss: MoE load-balancing loss (0 for dense models), to be weighted by the caller.
    pooled: [B, D] encoder pooler output, when the model has a pooler.
    encoder_hidden: [B, S, D] encoder output of encdec models.
    cache: decoding cache, when one was passed in.
    """

    logits: jax.Array
    hidden: jax.Array
    aux_loss: jax.Array | float = 0.0
    pooled: jax.Array | None = None
    encoder_hidden: jax.Array | None = None
    cache: Any = None
