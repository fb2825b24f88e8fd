"""gpt-oss (`gpt_oss`, GptOssForCausalLM): a pre-RMSNorm decoder of mixture-of-experts layers
with learned attention sinks (`Config.attn_sinks`), biases on q, k, v and o, sliding-window
layers alternating with full ones (`layer_types`) and YaRN RoPE (not truncated).

The router has a bias (`router_bias`) and softmaxes its top-k logits (the same weights as
zoo's renormalised top-k of the full softmax). The experts are fused in the checkpoint, one
tensor per layer: gate_up_proj [E, D, 2F] with the gate in the even and the up projection in
the odd columns (transform "interleaved"), its bias [E, 2F], down_proj [E, F, D] and its bias
[E, D]; they run the clamped SwiGLU (`swiglu_limit`; the sigmoid gain is zoo.nn.moe.SWIGLU_ALPHA).

The published checkpoints store the experts in MXFP4 (`quantization_config`), which zoo does
not read: dequantize them first (transformers: `Mxfp4Config(dequantize=True)`, then
save_pretrained).
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, Unsupported, layer_pattern, positive, read_layer_kinds, read_rope,
                           require, write_layer_types)
from zoo.hf.keymap import Rule, rule
from zoo.hf.llama import decoder_rules, read_decoder, write_decoder
from zoo.nn.moe import SWIGLU_ALPHA

_NAME = "gpt_oss"
_L = "model.layers.{i}."
_LAYER = "decoder/layers/"
_MOE = _LAYER + "moe/"
# What GptOssConfig builds when a config carries no RoPE settings.
_DEFAULT_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                     original_max_position_embeddings=4096)
_DEFAULT_THETA = 150000.0


def _rules() -> list[Rule]:
    """Llama's embeddings, norms, attention (with biases), final norm and head; the sinks,
    the biased router and the fused experts."""
    out = [r for r in decoder_rules() if ".mlp." not in r.hf]
    return out + [
        rule(_L + "self_attn.sinks", _LAYER + "attn/sinks"),
        rule(_L + "mlp.router.weight", _MOE + "router", "linear"),
        rule(_L + "mlp.router.bias", _MOE + "router_bias"),
        rule(_L + "mlp.experts.gate_up_proj", (_MOE + "wg", _MOE + "wi"), "interleaved"),
        rule(_L + "mlp.experts.gate_up_proj_bias", (_MOE + "bg", _MOE + "bi"), "interleaved"),
        rule(_L + "mlp.experts.down_proj", _MOE + "wo"),
        rule(_L + "mlp.experts.down_proj_bias", _MOE + "bo"),
    ]


def _rope(d: dict) -> dict[str, Any]:
    """RoPE as GptOssRotaryEmbedding builds it: transformers' default YaRN when the config has
    no RoPE settings, base 150000 when it names none; whole heads."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or _DEFAULT_ROPE
    out = read_rope(d, _NAME, params, default_theta=_DEFAULT_THETA)
    require(out.pop("rope_fraction") == 1.0, _NAME, "partial_rotary_factor",
            f"gpt_oss rotates whole heads, got {d.get('partial_rotary_factor')}")
    return out


def _number(d: dict, field: str, default: float) -> float:
    value = d.get(field, default)
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, _NAME, field,
            f"expected a positive number, got {value!r}")
    return float(value)


def _read(d: dict, weights: Any) -> Config:
    quantization = d.get("quantization_config")
    require(quantization is None, _NAME, "quantization_config",
            f"quantized experts ({quantization!r}) are not supported: load the checkpoint with "
            "transformers' Mxfp4Config(dequantize=True) and save_pretrained it first")
    alpha = _number(d, "swiglu_alpha", SWIGLU_ALPHA)
    require(alpha == SWIGLU_ALPHA, _NAME, "swiglu_alpha",
            f"zoo's clamped SwiGLU has the gain {SWIGLU_ALPHA}, got {alpha}")
    layers = positive(d, _NAME, "num_hidden_layers")
    # GptOssConfig's default: sliding layers at even indices, full ones at odd.
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    kinds = read_layer_kinds(d, _NAME, layers, default)
    window = positive(d, _NAME, "sliding_window") if "local" in kinds else None
    bias = d.get("attention_bias", True)
    require(isinstance(bias, bool), _NAME, "attention_bias", f"expected a bool, got {bias!r}")
    return read_decoder(
        {**d, "tie_word_embeddings": d.get("tie_word_embeddings", False)}, weights, _NAME, rope=_rope(d),
        # The experts run the clamped SwiGLU whatever hidden_act says (GptOssExperts).
        activation="swiglu", norm_eps=float(d.get("rms_norm_eps", 1e-5)), attn_bias=bias, attn_sinks=True,
        sliding_window=window, layer_pattern=layer_pattern(kinds),
        num_experts=positive(d, _NAME, "num_local_experts"),
        experts_per_token=positive(d, _NAME, "num_experts_per_tok"),
        router_bias=True, mlp_bias=True, swiglu_limit=_number(d, "swiglu_limit", 7.0))


def _write(cfg: Config) -> dict:
    if cfg.swiglu_limit is None:
        raise Unsupported("save_hf: gpt_oss experts clamp their SwiGLU, Config.swiglu_limit=None")
    out = write_decoder(cfg, _NAME)
    out.update(architectures=["GptOssForCausalLM"], attention_bias=cfg.attn_bias,
               layer_types=write_layer_types(cfg), sliding_window=cfg.sliding_window,
               num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               swiglu_limit=cfg.swiglu_limit, swiglu_alpha=SWIGLU_ALPHA)
    return out


GPT_OSS = ModelType(_NAME, "decoder", _read, _write, _rules(), prefix="model.",
                    ignore=(r"rotary_emb\.",))
