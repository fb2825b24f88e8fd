"""The family-generic entry: `init`, `axes`, `param_count`, and `apply` over a typed
`Inputs` record, for any `Config`. Training (train/step.py) and the decoding loops
(zoo/decoding.py) call these and never branch on the family for the common path."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from zoo import decoder, encdec, encoder
from zoo.config import Config
from zoo.nn import param as P
from zoo.nn.embeddings import vocab_logits

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


def param_count(cfg: Config, active: bool = False) -> int:
    """Number of parameters, without allocating them. active: the parameters one token
    uses, with each mixture-of-experts layer counting only its `experts_per_token` routed
    experts (embeddings, attention and routers whole); the same as the total for a dense
    model."""
    return P.count(spec(cfg), (cfg.experts_per_token, cfg.num_experts) if active and cfg.moe else None)


def forward(params: dict, cfg: Config, *args: Any, **kwargs: Any):
    """The family's own forward (`zoo.<family>.forward`), with its own arguments: a
    shorthand for interactive use. Code that serves every family calls `apply`."""
    return _FAMILIES[cfg.family].forward(params, cfg, *args, **kwargs)


class Inputs(NamedTuple):
    """What a model reads, for any family; every array is [B, T] (source: [B, S]).

    tokens: int ids the stack reads: the encoder's (encoder), the sequence (decoder), the
    decoder inputs, shifted right (encdec). mask: bool, True on real tokens. positions: int
    (default: 0.. over real tokens, or after the cache). segment_ids: int, packed rows
    attend within their segment (encoder, decoder). prefix_mask: bool, a bidirectional
    prefix (decoder). token_types: int BERT segments (encoder). source, source_mask: the
    encoder's tokens and mask (encdec; a feature encoder's source is float
    [B, num_mel_bins, frames], without mask: `zoo.encdec.encode`).
    """

    tokens: jax.Array
    mask: jax.Array | None = None
    positions: jax.Array | None = None
    segment_ids: jax.Array | None = None
    prefix_mask: jax.Array | None = None
    token_types: jax.Array | None = None
    source: jax.Array | None = None
    source_mask: jax.Array | None = None


# The Inputs fields each family reads (besides tokens and mask).
_READS = {"encoder": ("positions", "segment_ids", "token_types"),
          "decoder": ("positions", "segment_ids", "prefix_mask"),
          "encdec": ("source", "source_mask")}


def apply(params: dict, cfg: Config, inputs: Inputs, *, key: jax.Array | None = None,
          remat: bool | str = False, cache: Any = None):
    """Any family's forward on `inputs` -> `zoo.Output` (logits [B, T, V], hidden [B, T, D],
    aux_loss, pooled / encoder_hidden / cache where the family has them).

    key: dropout RNG (None: none); remat: see `zoo.nn.transformer.REMAT_POLICIES`; cache: a
    `zoo.init_cache` cache (decoder, encdec) that tokens continue. An Inputs field the
    family does not read is a ValueError naming it, never silently dropped."""
    if not isinstance(inputs, Inputs):
        raise TypeError(f"zoo.apply: inputs must be a zoo.Inputs, got {type(inputs).__name__}")
    given = [name for name in Inputs._fields[2:]
             if getattr(inputs, name) is not None and name not in _READS[cfg.family]]
    if given:
        raise ValueError(f"zoo.apply: a {cfg.family} model does not read Inputs field(s) {given}")
    if cache is not None and cfg.family == "encoder":
        raise ValueError("zoo.apply: an encoder model has no cache")
    if cfg.family == "encdec":
        return encdec.forward(params, cfg, inputs.source, inputs.tokens, src_mask=inputs.source_mask,
                              tgt_mask=inputs.mask, key=key, remat=remat, cache=cache)
    extra = {name: getattr(inputs, name) for name in _READS[cfg.family]}
    if cfg.family == "decoder":
        extra["cache"] = cache
    return _FAMILIES[cfg.family].forward(params, cfg, inputs.tokens, mask=inputs.mask, key=key,
                                         remat=remat, **extra)


def cached_hidden(params: dict, cfg: Config, tokens: jax.Array, cache: Any,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Any]:
    """A chunk tokens [B, T] (mask [B, T]) over a decoder or encdec cache (encdec: primed
    with `zoo.encdec.prime_cache`) -> (hidden [B, T, D], MoE loss, cache): what decoding
    steps call, without the vocabulary projection."""
    if cfg.family == "decoder":
        return decoder.cached_hidden(params, cfg, tokens, cache, mask=mask)
    if cfg.family == "encdec":
        return encdec.cached_hidden(params, cfg, tokens, cache, tgt_mask=mask)
    raise ValueError(f"cached_hidden: an {cfg.family} model has no cache")


def logits(params: dict, cfg: Config, hidden: jax.Array) -> jax.Array:
    """The model's output head on hidden [B, T, D] -> logits [B, T, V] (the MLM head of an
    encoder, the vocabulary projection otherwise). params may hold just the head's
    subtrees ("embed", "head", "mlm")."""
    from zoo.nn.backend import resolve

    cfg = resolve(cfg)
    if cfg.family == "encoder":
        return encoder.mlm_logits(params, hidden, cfg)
    return vocab_logits(params, hidden, cfg)
