"""Gemma 2 (`gemma2`) and Gemma 3 text (`gemma3_text`, Gemma3ForCausalLM): Llama's tensors with
a norm on each side of every sub-layer, (1 + w) RMSNorms, sqrt(d_model)-scaled embeddings, a
query scale of query_pre_attn_scalar**-0.5 and sliding-window layers mixed with global ones
by `layer_types`.

Gemma 2 alternates local and global layers and soft-caps attention scores and final logits.
Gemma 3 adds RMS-normalised queries and keys (q_norm/k_norm) and gives local layers their own
RoPE base; transformers 5 never applies its attn_logit_softcapping (the attention call does
not pass it), so zoo reads that field as transformers computes: not at all.
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, Unsupported, activation, expect, layer_pattern, positive,
                           read_layer_kinds, read_rope, require, write_layer_types, write_rope)
from zoo.hf.heads import decoder_heads
from zoo.hf.keymap import Rule, rule
from zoo.hf.llama import decoder_rules, read_decoder, write_decoder

_L = "model.layers.{i}."
_LAYER = "decoder/layers/"
# Gemma's four norms per layer: HF name -> zoo layer part.
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
          "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"}


def _rules(qk_norm: bool) -> list[Rule]:
    """Llama's projections, embeddings, final norm and head; Gemma's own per-layer norms."""
    norms = tuple(f"{_L}{hf}.weight" for hf in _NORMS)
    out = [r for r in decoder_rules() if r.hf not in norms]
    out += [rule(f"{_L}{hf}.weight", f"{_LAYER}{zoo}/scale") for hf, zoo in _NORMS.items()]
    if qk_norm:
        out += [rule(f"{_L}self_attn.{x}_norm.weight", f"{_LAYER}attn/{x}_norm/scale") for x in "qk"]
    return out


# --- layer kinds ------------------------------------------------------------------------------
def _layer_kinds(d: dict, name: str, num_layers: int) -> list[str]:
    """zoo kinds of every layer, from `layer_types` or, in configs written before it existed,
    as transformers fills it in: every period-th layer global, the period 2 for Gemma 2 and
    Gemma 3's `sliding_window_pattern` (default 6)."""
    period = d.get("sliding_window_pattern", 6) if name == "gemma3_text" else 2
    require(isinstance(period, int) and period > 0, name, "sliding_window_pattern",
            f"expected a positive int, got {period!r}")
    default = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(num_layers)]
    return read_layer_kinds(d, name, num_layers, default)


def _window(d: dict, name: str, kinds: list[str]) -> int | None:
    if "local" not in kinds:
        return None  # the window of a model without local layers is never used
    return positive(d, name, "sliding_window")


# --- RoPE -------------------------------------------------------------------------------------
_PER_KIND = ("full_attention", "sliding_attention")


def _per_kind(d: dict) -> dict | None:
    """transformers 5's per-layer-type rope_parameters (Gemma 3), else None."""
    params = d.get("rope_parameters")
    return params if isinstance(params, dict) and params and set(params) <= set(_PER_KIND) else None


def _rope(d: dict, name: str, local: bool) -> dict[str, Any]:
    """RoPE Config fields. Gemma 2: one rotation for every layer. Gemma 3: the global layers'
    (with its scaling, as transformers reads it: `rope_parameters.full_attention` updated by a
    4.x `rope_scaling`, theta default 1e6) and the local layers' unscaled base
    (`rope_parameters.sliding_attention` or 4.x `rope_local_base_freq`, default 1e4)."""
    if name == "gemma2":
        require(_per_kind(d) is None, name, "rope_parameters",
                "Gemma2 has one rotation for all layers, got one per layer type")
        out = read_rope(d, name)
    else:
        nested = _per_kind(d)
        require(nested is not None or not d.get("rope_parameters"), name, "rope_parameters",
                f"expected entries per layer type {list(_PER_KIND)}, got {d.get('rope_parameters')!r}")
        full = dict((nested or {}).get("full_attention") or {})
        full.update(d.get("rope_scaling") or {})
        sliding = dict((nested or {}).get("sliding_attention") or {})
        kind = sliding.get("rope_type", sliding.get("type", "default"))
        require(kind == "default", name, "rope_parameters.sliding_attention.rope_type",
                f"value {kind!r} is not supported by zoo (local layers use unscaled RoPE)")
        out = read_rope(d, name, full, default_theta=1e6)
        theta = float(sliding.get("rope_theta", d.get("rope_local_base_freq", 1e4)))
        if local and (theta != out["rope_theta"] or "rope_scaling" in out):
            out["local_rope_theta"] = theta
    # Gemma's rotary embedding always rotates whole heads (transformers ignores the field).
    require(out.pop("rope_fraction") == 1.0, name, "partial_rotary_factor",
            f"{name} rotates whole heads, got {d.get('partial_rotary_factor')}")
    return out


def _write_gemma3_rope(cfg: Config) -> dict[str, Any]:
    full = write_rope(cfg)["rope_parameters"]
    local = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta
    # A scaled global RoPE that local layers share has no place in this format: the export's
    # read-back check refuses it (local_rope_theta would load as set).
    return {"rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": local}},
            "rope_theta": cfg.rope_theta, "rope_local_base_freq": local,
            "rope_scaling": dict(full) if cfg.rope_scaling else None}


# --- config -----------------------------------------------------------------------------------
def _attn_scale(d: dict, name: str, head_dim: int) -> float | None:
    scalar = d.get("query_pre_attn_scalar", 256)
    require(isinstance(scalar, (int, float)) and scalar > 0, name, "query_pre_attn_scalar",
            f"expected a positive number, got {scalar!r}")
    return None if scalar == head_dim else float(scalar) ** -0.5


def _query_pre_attn_scalar(cfg: Config, name: str) -> int:
    """transformers types the field as int: the inverse square of the scale, when whole."""
    if cfg.attn_scale is None:
        return cfg.head_size
    scalar = round(cfg.attn_scale ** -2)
    if float(scalar) ** -0.5 != cfg.attn_scale:
        raise Unsupported(f"save_hf: {name} scales queries by query_pre_attn_scalar**-0.5 with a whole "
                          f"query_pre_attn_scalar, Config.attn_scale={cfg.attn_scale!r}")
    return scalar


def _softcap(d: dict, name: str, field: str) -> float | None:
    value = d.get(field)
    require(value is None or (isinstance(value, (int, float)) and value > 0), name, field,
            f"expected null or a positive number, got {value!r}")
    return None if value is None else float(value)


def _read(d: dict, weights: Any, name: str) -> Config:
    gemma3 = name == "gemma3_text"
    expect(d, name, "use_bidirectional_attention", (False, None), False)
    layers, width = positive(d, name, "num_hidden_layers"), positive(d, name, "hidden_size")
    head_dim = d.get("head_dim") or width // positive(d, name, "num_attention_heads")
    kinds = _layer_kinds(d, name, layers)
    # transformers runs hidden_activation (Gemma 2 configs also carry a hidden_act it ignores)
    # and ties the head unless told otherwise.
    act = d.get("hidden_activation", "gelu_pytorch_tanh")
    llama_view = {**d, "hidden_act": act, "tie_word_embeddings": d.get("tie_word_embeddings", True)}
    return read_decoder(
        llama_view, weights, name, rope=_rope(d, name, "local" in kinds),
        activation=activation(act, name, "hidden_activation", gated=True),
        # embed_scale as transformers computes it: hidden_size**0.5
        norm_position="sandwich", norm_offset=1.0, embed_scale=width ** 0.5,
        attn_bias=bool(d.get("attention_bias", False)),
        sliding_window=_window(d, name, kinds), layer_pattern=layer_pattern(kinds),
        attn_scale=_attn_scale(d, name, head_dim),
        qk_norm=gemma3, attn_softcap=None if gemma3 else _softcap(d, name, "attn_logit_softcapping"),
        final_softcap=_softcap(d, name, "final_logit_softcapping"))


def _write(cfg: Config, name: str) -> dict:
    if cfg.embed_scale != cfg.d_model ** 0.5:
        raise Unsupported(f"save_hf: {name} scales embeddings by sqrt(d_model)={cfg.d_model ** 0.5}, "
                          f"Config.embed_scale={cfg.embed_scale}")
    gemma3 = name == "gemma3_text"
    out = write_decoder(cfg, name)
    act = "gelu_pytorch_tanh" if out["hidden_act"] == "gelu_new" else out["hidden_act"]  # one tanh GELU
    out.update(architectures=["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
               hidden_act=act, hidden_activation=act, layer_types=write_layer_types(cfg),
               sliding_window=cfg.sliding_window, query_pre_attn_scalar=_query_pre_attn_scalar(cfg, name),
               attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
               attention_bias=cfg.attn_bias, use_bidirectional_attention=False)
    if gemma3:
        out.update(_write_gemma3_rope(cfg))
    return out


def _model_type(name: str) -> ModelType:
    # transformers has Gemma2ForSequence/TokenClassification and Gemma3TextForSequenceClassification.
    heads = decoder_heads("Gemma3Text", ("sequence",)) if name == "gemma3_text" else \
        decoder_heads("Gemma2", ("sequence", "token"))
    return ModelType(name, "decoder", lambda d, w: _read(d, w, name), lambda cfg: _write(cfg, name),
                     _rules(qk_norm=name == "gemma3_text"), prefix="model.", ignore=(r"rotary_emb\.",),
                     heads=heads)


GEMMA2 = _model_type("gemma2")
GEMMA3_TEXT = _model_type("gemma3_text")
