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
    copies of tied weights). heads: its task-head classes, a `zoo.hf.heads.HeadFormat` each
    (zoo/heads.py says how to declare them). fixed(cfg) -> {key: array}: tensors the
    checkpoint stores that zoo computes from the config instead (Whisper's sinusoidal encoder
    positions): load_hf checks the stored values match them, save_hf writes them.
    """

    name: str
    family: str
    read_config: Callable[[dict, Any], Config]
    write_config: Callable[[Config], dict]
    rules: list[Rule]
    prefix: str = ""
    ignore: tuple[str, ...] = ()
    heads: tuple = ()
    fixed: Callable[[Config], dict] | None = None


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


def shared_stack_widths(d: dict, model_type: str) -> tuple[int, int]:
    """(heads, MLP width) of a BART-style config with encoder_/decoder_ fields; zoo has one
    of each for both stacks, so differing decoder values are refused."""
    heads, ffn = positive(d, model_type, "encoder_attention_heads"), positive(d, model_type, "encoder_ffn_dim")
    require(d.get("decoder_attention_heads", heads) == heads, model_type, "decoder_attention_heads",
            f"zoo uses one head count for both stacks; encoder_attention_heads={heads}")
    require(d.get("decoder_ffn_dim", ffn) == ffn, model_type, "decoder_ffn_dim",
            f"zoo uses one MLP width for both stacks; encoder_ffn_dim={ffn}")
    return heads, ffn


def dropout_of(d: dict, *names: str) -> float:
    """The residual dropout rate (zoo has one rate for the whole model)."""
    for name in names:
        value = d.get(name)
        if isinstance(value, (int, float)) and 0.0 <= value < 1.0:
            return float(value)
    return 0.0


# --- RoPE ------------------------------------------------------------------------------------------
ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
# The pre-scaling context length is read by these types only.
_ORIGINAL_LEN_TYPES = ("llama3", "yarn", "longrope")


def read_rope(d: dict, model_type: str, params: dict | None = None,
              default_theta: float = 10000.0) -> dict[str, Any]:
    """The RoPE `Config` fields (rope_theta, rope_fraction, rope_scaling and its settings) of a
    Hugging Face config `d`, read as transformers reads them.

    params: the rope dict to read; default `d`'s transformers-5 `rope_parameters`, else the 4.x
    `rope_scaling` (+ top-level `rope_theta`). Pass one entry of a per-layer-type dict (Gemma 3).
    A type zoo lacks is `Unsupported`, naming `rope_parameters.rope_type` and the value.
    """
    rope = dict(params if params is not None else d.get("rope_parameters") or d.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if model_type == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # Phi3Config reads both legacy names as longrope
    require(kind in ROPE_TYPES, model_type, "rope_parameters.rope_type",
            f"value {kind!r} is not supported by zoo (supported: {list(ROPE_TYPES)})")
    fraction = rope.get("partial_rotary_factor", d.get("partial_rotary_factor")) or 1.0
    out: dict[str, Any] = dict(rope_theta=float(rope.get("rope_theta", d.get("rope_theta", default_theta))),
                               rope_fraction=float(fraction))
    if kind == "default":
        return out
    out["rope_scaling"] = kind
    if kind in _ORIGINAL_LEN_TYPES:
        out["rope_original_max_len"] = _original_len(d, rope, model_type)
    if kind in ("linear", "dynamic", "llama3"):
        out["rope_scaling_factor"] = _number(rope, "factor", model_type, kind)
    if kind == "llama3":
        out.update(rope_low_freq_factor=_number(rope, "low_freq_factor", model_type, kind),
                   rope_high_freq_factor=_number(rope, "high_freq_factor", model_type, kind))
    elif kind == "yarn":
        out.update(_yarn(d, rope, model_type, out["rope_original_max_len"]))
    elif kind == "longrope":
        out.update(_longrope(d, rope, model_type, out["rope_original_max_len"]))
    return out


def _number(rope: dict, key: str, model_type: str, kind: str) -> float:
    value = rope.get(key)
    require(isinstance(value, (int, float)) and not isinstance(value, bool), model_type,
            f"rope_parameters.{key}", f"rope_type {kind!r} needs a number, got {value!r}")
    return float(value)


def _original_len(d: dict, rope: dict, model_type: str) -> int:
    # transformers prefers a top-level original_max_position_embeddings (Phi-3 stores it there,
    # and Phi3Config defaults it to 4096) over the one inside the rope dict.
    default = 4096 if model_type == "phi3" else rope.get("original_max_position_embeddings",
                                                         d.get("max_position_embeddings"))
    value = d.get("original_max_position_embeddings", default)
    require(isinstance(value, int) and value > 0, model_type, "original_max_position_embeddings",
            f"expected a positive int, got {value!r}")
    return value


def _yarn(d: dict, rope: dict, model_type: str, original: int) -> dict[str, Any]:
    factor = rope.get("factor")
    if factor is None:  # transformers: the ratio of the two context lengths
        factor = d["max_position_embeddings"] / original
    out: dict[str, Any] = dict(rope_scaling_factor=float(factor),
                               # transformers reads 0 / None as the paper's defaults
                               rope_beta_fast=float(rope.get("beta_fast") or 32.0),
                               rope_beta_slow=float(rope.get("beta_slow") or 1.0),
                               rope_truncate=bool(rope.get("truncate", True)))
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if rope.get(key) is not None:
            out[f"rope_{key}"] = _number(rope, key, model_type, "yarn")
    return out


def _longrope(d: dict, rope: dict, model_type: str, original: int) -> dict[str, Any]:
    from zoo.nn.positions import longrope_attention_factor

    out: dict[str, Any] = {}
    for key in ("short_factor", "long_factor"):
        value = rope.get(key)
        require(isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value),
                model_type, f"rope_parameters.{key}", f"longrope needs a list of numbers, got {value!r}")
        out[f"rope_{key}"] = tuple(float(v) for v in value)
    if rope.get("attention_factor") is not None:
        out["rope_attention_factor"] = _number(rope, "attention_factor", model_type, "longrope")
    elif rope.get("factor") is not None:
        # zoo derives the stretch from max_len / rope_original_max_len; an explicit factor
        # that says otherwise is kept as the attention factor it implies.
        factor = _number(rope, "factor", model_type, "longrope")
        if factor != d.get("max_position_embeddings", 0) / original:
            out["rope_attention_factor"] = longrope_attention_factor(factor, original)
    return out


def write_rope(cfg: Config) -> dict[str, Any]:
    """The Hugging Face config entries of cfg's RoPE: `rope_parameters` (transformers 5) and
    `rope_theta` / `rope_scaling` (4.x), from which transformers rebuilds the same rotation."""
    kind = cfg.rope_scaling
    rope: dict[str, Any] = {"rope_type": kind or "default", "rope_theta": cfg.rope_theta}
    top: dict[str, Any] = {}
    if cfg.rope_fraction != 1.0:
        rope["partial_rotary_factor"] = top["partial_rotary_factor"] = cfg.rope_fraction
    if kind in ("linear", "dynamic", "llama3", "yarn"):
        rope["factor"] = cfg.rope_scaling_factor
    if kind in _ORIGINAL_LEN_TYPES:
        # Also top-level: there it wins over the rope dict (Phi3Config defaults it to 4096).
        rope["original_max_position_embeddings"] = top["original_max_position_embeddings"] = \
            cfg.rope_original_max_len
    if kind == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    elif kind == "yarn":
        rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
        for key in ("mscale", "mscale_all_dim"):
            if getattr(cfg, f"rope_{key}") is not None:
                rope[key] = getattr(cfg, f"rope_{key}")
    elif kind == "longrope":
        rope.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor))
    if kind in ("yarn", "longrope") and cfg.rope_attention_factor is not None:
        rope["attention_factor"] = cfg.rope_attention_factor
    return {"rope_parameters": rope, "rope_theta": cfg.rope_theta,
            "rope_scaling": dict(rope) if kind else None, **top}


# --- layer kinds ----------------------------------------------------------------------------------
# Hugging Face `layer_types` entry -> zoo `Config.layer_pattern` entry.
LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}


def read_layer_kinds(d: dict, model_type: str, num_layers: int, default: list[str]) -> list[str]:
    """The zoo kind ("local" | "global") of every layer, from `layer_types`, or from `default`
    (Hugging Face entries, as transformers fills them in) for configs written before the field."""
    types = d.get("layer_types")
    types = default if types is None else types
    require(isinstance(types, list) and len(types) == num_layers, model_type, "layer_types",
            f"expected a list of num_hidden_layers={num_layers} entries, got {types!r}")
    unknown = sorted({str(t) for t in types if t not in LAYER_TYPES})
    require(not unknown, model_type, "layer_types",
            f"{unknown} not supported by zoo (supported: {list(LAYER_TYPES)})")
    return [LAYER_TYPES[t] for t in types]


def layer_pattern(kinds: list[str]) -> tuple[str, ...]:
    """The shortest prefix of `kinds` that repeats into it (`Config.layer_pattern`: layer i is
    pattern[i % len(pattern)]); () when every layer is of one kind (sliding_window then says
    which)."""
    if len(set(kinds)) <= 1:
        return ()
    period = next(p for p in range(1, len(kinds) + 1)
                  if all(k == kinds[i % p] for i, k in enumerate(kinds)))
    return tuple(kinds[:period])


def write_layer_types(cfg: Config) -> list[str]:
    """cfg's per-layer kinds as a Hugging Face `layer_types` list."""
    hf = {zoo: name for name, zoo in LAYER_TYPES.items()}
    return [hf[cfg.layer_kind(i)] for i in range(cfg.num_layers)]
