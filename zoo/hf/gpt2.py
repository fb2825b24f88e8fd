"""GPT-2: pre-norm decoder with learned positions. Its Conv1D weights are stored [in, out]
and q, k, v share one fused `c_attn` tensor (split along its last axis)."""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, activation, dropout_of, expect, head_is_tied, hf_activation,
                           positive, special_ids, write_special_ids)
from zoo.hf.keymap import rule

_L = "transformer.h.{i}."
_ATTN = "decoder/layers/attn/"
_MLP = "decoder/layers/mlp/"

RULES = [
    rule("transformer.wte.weight", "embed/tokens"),
    rule("transformer.wpe.weight", "decoder/positions"),
    rule(_L + "ln_1.weight", "decoder/layers/attn_norm/scale"),
    rule(_L + "ln_1.bias", "decoder/layers/attn_norm/bias"),
    rule(_L + "attn.c_attn.weight", (_ATTN + "q", _ATTN + "k", _ATTN + "v"), "conv"),
    rule(_L + "attn.c_attn.bias", (_ATTN + "q_bias", _ATTN + "k_bias", _ATTN + "v_bias"), "flat"),
    rule(_L + "attn.c_proj.weight", _ATTN + "o", "conv_out"),
    rule(_L + "attn.c_proj.bias", _ATTN + "o_bias"),
    rule(_L + "ln_2.weight", "decoder/layers/mlp_norm/scale"),
    rule(_L + "ln_2.bias", "decoder/layers/mlp_norm/bias"),
    rule(_L + "mlp.c_fc.weight", _MLP + "wi", "conv"),
    rule(_L + "mlp.c_fc.bias", _MLP + "bi"),
    rule(_L + "mlp.c_proj.weight", _MLP + "wo", "conv_out"),
    rule(_L + "mlp.c_proj.bias", _MLP + "bo"),
    rule("transformer.ln_f.weight", "decoder/final_norm/scale"),
    rule("transformer.ln_f.bias", "decoder/final_norm/bias"),
    rule("lm_head.weight", "head/kernel", "linear"),
]


def read_config(d: dict, weights: Any) -> Config:
    name = "gpt2"
    expect(d, name, "scale_attn_weights", (True,), True)
    expect(d, name, "scale_attn_by_inverse_layer_idx", (False,), False)
    expect(d, name, "add_cross_attention", (False,), False)
    vocab = positive(d, name, "vocab_size")
    width = positive(d, name, "n_embd")
    return Config(
        family="decoder", vocab_size=vocab, d_model=width, num_layers=positive(d, name, "n_layer"),
        num_heads=positive(d, name, "n_head"), d_ff=d.get("n_inner") or 4 * width,
        activation=activation(d.get("activation_function", "gelu_new"), name, "activation_function"),
        norm="layernorm", norm_eps=float(d.get("layer_norm_epsilon", 1e-5)), positions="learned",
        max_len=positive(d, name, "n_positions"),
        tie_embeddings=head_is_tied(d, weights, name, "lm_head.weight", "transformer.wte.weight", True),
        dropout=dropout_of(d, "resid_pdrop"), initializer="gpt2",
        **special_ids(d, vocab, pad_fallback="eos_token_id"))


def write_config(cfg: Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
        "activation_function": hf_activation(cfg), "layer_norm_epsilon": cfg.norm_eps,
        "n_positions": cfg.max_len, "tie_word_embeddings": cfg.tie_embeddings,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        **write_special_ids(cfg),
    }


GPT2 = ModelType("gpt2", "decoder", read_config, write_config, RULES, prefix="transformer.",
                 ignore=(r"\.attn\.bias$", r"\.attn\.masked_bias$"))
