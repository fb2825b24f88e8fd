"""What every model type shares: the `ModelType` record, activation names, and helpers that
read a Hugging Face config strictly (anything zoo cannot reproduce is a ValueError)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from zoo.config import ACTIVATIONS, Config
from zoo.hf.keymap import Rule


class ModelType(NamedTuple):
    """One Hugging Face `model_type`.

    read_config(hf_config, weights) -> Config: `weights` answers `has(key)` (and `get(key)`
    where a tie must be checked on the values).
    write_config(cfg) -> the Hugging Face config dict (without model_type).
    rules: the key map (see zoo.hf.keymap). prefix: the base-model prefix that checkpoints of a
    bare base model lack. ignore: regexes of stored keys that carry nothing zoo needs (buffers,
    copies of tied weights).
    """

    name: str
    family: str
    read_config: Callable[[dict, Any], Config]
    write_config: Callable[[Config], dict]
    rules: list[Rule]
    prefix: str = ""
    ignore: tuple[str, ...] = ()


class Unsupported(ValueError):
    """A checkpoint or config that zoo cannot reproduce exactly."""


def require(ok: bool, model_type: str, field: str, message: str) -> None:
    if not ok:
        raise Unsupported(f"load_hf: {model_type} config field {field!r}: {message}")


def expect(d: dict, model_type: str, field: str, allowed: tuple, default: Any = None) -> None:
    """Refuses a field whose value selects behaviour zoo does not have."""
    value = d.get(field, default)
    require(value in allowed, model_type, field,
            f"value {value!r} is not supported by zoo (supported: {list(allowed)})")


# Hugging Face activation name -> zoo elementwise name.
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "relu": "relu", "silu": "silu", "swish": "silu"}
_GATED = {base: name for name, (base, gated) in ACTIVATIONS.items() if gated}


def activation(name: Any, model_type: str, field: str, gated: bool = False) -> str:
    """A Hugging Face activation name as a zoo `Config.activation` (gated: the GLU form)."""
    require(name in _HF_ACTIVATIONS, model_type, field,
            f"activation {name!r} is not supported by zoo (supported: {sorted(_HF_ACTIVATIONS)})")
    base = _HF_ACTIVATIONS[name]
    return _GATED[base] if gated else base


def hf_activation(cfg: Config) -> str:
    """zoo activation -> the Hugging Face name of its elementwise function."""
    base = ACTIVATIONS[cfg.activation][0]
    return {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}[base]


def token_id(value: Any, vocab_size: int) -> int | None:
    """A special-token id as zoo keeps it: the first of a list; None when outside the vocabulary
    (special ids only steer generation and padding, never the logits)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) and 0 <= value < vocab_size else None


def special_ids(d: dict, vocab_size: int, pad_fallback: str | None = None) -> dict[str, Any]:
    """pad/bos/eos (and decoder start) ids as Config fields."""
    pad = token_id(d.get("pad_token_id"), vocab_size)
    if pad is None and pad_fallback:
        pad = token_id(d.get(pad_fallback), vocab_size)
    return dict(pad_id=0 if pad is None else pad, bos_id=token_id(d.get("bos_token_id"), vocab_size),
                eos_id=token_id(d.get("eos_token_id"), vocab_size))


def write_special_ids(cfg: Config) -> dict[str, Any]:
    return {"pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id}


def head_is_tied(d: dict, weights: Any, model_type: str, head_key: str, embed_key: str,
                 default: bool) -> bool:
    """Whether the output projection is the token embedding.

    Follows what transformers does: a head stored with other values than the embeddings is
    used as stored even when the config asks for tying; a missing head is tied.
    """
    tie = d.get("tie_word_embeddings", default)
    if not weights.has(head_key):
        require(bool(tie), model_type, "tie_word_embeddings",
                f"false, but the checkpoint has no {head_key!r} to use as the untied head")
        return True
    if not tie:
        return False
    import numpy as np

    return bool(np.array_equal(weights.get(head_key), weights.get(embed_key)))


def positive(d: dict, model_type: str, field: str) -> int:
    value = d.get(field)
    require(isinstance(value, int) and value > 0, model_type, field, f"expected a positive int, got {value!r}")
    return value


def dropout_of(d: dict, *names: str) -> float:
    """The residual dropout rate (zoo has one rate for the whole model)."""
    for name in names:
        value = d.get(name)
        if isinstance(value, (int, float)) and 0.0 <= value < 1.0:
            return float(value)
    return 0.0
