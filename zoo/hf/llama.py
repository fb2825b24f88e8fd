"""Llama, Mistral and Mixtral: pre-RMSNorm decoders with RoPE and a SwiGLU MLP.

Mistral adds a sliding window; Mixtral replaces the MLP by top-k routed experts (stored per
expert as w1 = gate, w3 = up, w2 = down). RoPE scaling: any of zoo.hf.common.ROPE_TYPES.
The other Llama-shaped types (zoo.hf.qwen, zoo.hf.phi3) build on read_decoder, write_decoder
and decoder_rules.
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, activation, dropout_of, expect, head_is_tied, hf_activation,
                           positive, read_rope, require, special_ids, write_rope,
                           write_special_ids)
from zoo.hf.heads import decoder_heads
from zoo.hf.keymap import Rule, rule

_L = "model.layers.{i}."
_LAYER = "decoder/layers/"


def decoder_rules(moe: bool = False, fused: bool = False) -> list[Rule]:
    """The Llama key map (shared by the Llama-shaped types). moe: Mixtral's experts; fused:
    Phi-3's qkv_proj (q | k | v) and gate_up_proj (gate | up), each stacked on the torch
    output axis."""
    out = [
        rule("model.embed_tokens.weight", "embed/tokens"),
        rule(_L + "input_layernorm.weight", _LAYER + "attn_norm/scale"),
        rule(_L + "post_attention_layernorm.weight", _LAYER + "mlp_norm/scale"),
        rule(_L + "self_attn.o_proj.weight", _LAYER + "attn/o", "linear_out"),
        rule(_L + "self_attn.o_proj.bias", _LAYER + "attn/o_bias"),
        rule("model.norm.weight", "decoder/final_norm/scale"),
        rule("lm_head.weight", "head/kernel", "linear"),
    ]
    if fused:
        return out + [
            rule(_L + "self_attn.qkv_proj.weight", tuple(f"{_LAYER}attn/{x}" for x in "qkv"), "linear"),
            rule(_L + "mlp.gate_up_proj.weight", (_LAYER + "mlp/wg", _LAYER + "mlp/wi"), "linear"),
            rule(_L + "mlp.down_proj.weight", _LAYER + "mlp/wo", "linear_out")]
    for x in "qkv":
        out += [rule(f"{_L}self_attn.{x}_proj.weight", f"{_LAYER}attn/{x}", "linear"),
                rule(f"{_L}self_attn.{x}_proj.bias", f"{_LAYER}attn/{x}_bias", "flat")]
    if moe:
        expert = _L + "block_sparse_moe.experts.{e}."
        out += [rule(_L + "block_sparse_moe.gate.weight", _LAYER + "moe/router", "linear"),
                rule(expert + "w1.weight", _LAYER + "moe/wg", "linear"),
                rule(expert + "w3.weight", _LAYER + "moe/wi", "linear"),
                rule(expert + "w2.weight", _LAYER + "moe/wo", "linear_out")]
    else:
        for hf, w, b in (("gate_proj", "wg", "bg"), ("up_proj", "wi", "bi"), ("down_proj", "wo", "bo")):
            kind = "linear_out" if w == "wo" else "linear"
            out += [rule(f"{_L}mlp.{hf}.weight", f"{_LAYER}mlp/{w}", kind),
                    rule(f"{_L}mlp.{hf}.bias", f"{_LAYER}mlp/{b}")]
    return out


def _rope(d: dict, name: str) -> dict[str, Any]:
    fields = read_rope(d, name)
    # The Llama attention rotates whole heads (transformers ignores partial_rotary_factor here).
    require(fields.pop("rope_fraction") == 1.0, name, "partial_rotary_factor",
            f"{name} rotates whole heads, got {d.get('partial_rotary_factor')}")
    return fields


def read_decoder(d: dict, weights: Any, name: str, rope: dict[str, Any] | None = None,
                 **fields: Any) -> Config:
    """The Config of a Llama-shaped Hugging Face config `d`: sizes, gated MLP, RMSNorm, RoPE
    (default: whole heads, `_rope`), head tying and special ids. `fields`: the type's own
    Config fields (biases, window, layer pattern, experts, ...), which win over these."""
    vocab = positive(d, name, "vocab_size")
    width, heads = positive(d, name, "hidden_size"), positive(d, name, "num_attention_heads")
    head_dim = d.get("head_dim") or width // heads
    base = dict(
        family="decoder", vocab_size=vocab, d_model=width, num_layers=positive(d, name, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=None if head_dim * heads == width else head_dim,
        d_ff=positive(d, name, "intermediate_size"),
        activation=activation(d.get("hidden_act", "silu"), name, "hidden_act", gated=True),
        norm="rmsnorm", norm_bias=False, norm_eps=float(d.get("rms_norm_eps", 1e-6)), positions="rope",
        max_len=positive(d, name, "max_position_embeddings"), **(_rope(d, name) if rope is None else rope),
        tie_embeddings=head_is_tied(d, weights, name, "lm_head.weight", "model.embed_tokens.weight", False),
        attn_bias=False, mlp_bias=False, dropout=dropout_of(d, "attention_dropout"), **special_ids(d, vocab))
    return Config(**{**base, **fields})


def _read(d: dict, weights: Any, name: str) -> Config:
    expect(d, name, "pretraining_tp", (1, None), 1)
    layer_types = d.get("layer_types")
    require(not layer_types or len(set(layer_types)) == 1, name, "layer_types",
            "zoo runs one attention kind in every layer")
    extra: dict[str, Any] = {}
    if name == "llama":
        extra.update(attn_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)))
    else:
        extra.update(sliding_window=d.get("sliding_window"))
    if name == "mixtral":
        extra.update(num_experts=positive(d, name, "num_local_experts"),
                     experts_per_token=positive(d, name, "num_experts_per_tok"))
    return read_decoder(d, weights, name, **extra)


def write_decoder(cfg: Config, name: str) -> dict:
    """The Hugging Face config entries every Llama-shaped type shares (inverse of read_decoder)."""
    return {
        "architectures": [f"{name.capitalize()}ForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size, "intermediate_size": cfg.d_ff, "hidden_act": hf_activation(cfg),
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_len, **write_rope(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout,
        **write_special_ids(cfg),
    }


def _write(cfg: Config, name: str) -> dict:
    out = write_decoder(cfg, name)
    if name == "llama":
        out.update(attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    else:
        out["sliding_window"] = cfg.sliding_window
    if name == "mixtral":
        out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                   router_jitter_noise=0.0)
    return out


def _model_type(name: str, moe: bool = False) -> ModelType:
    # LlamaForQuestionAnswering keeps its body under "transformer.", Mistral's and Mixtral's under "model.".
    heads = decoder_heads(name.capitalize(), qa_base="transformer." if name == "llama" else None)
    return ModelType(name, "decoder", lambda d, w: _read(d, w, name), lambda cfg: _write(cfg, name),
                     decoder_rules(moe), prefix="model.", ignore=(r"rotary_emb\.inv_freq$",), heads=heads)


LLAMA = _model_type("llama")
MISTRAL = _model_type("mistral")
MIXTRAL = _model_type("mixtral", moe=True)
