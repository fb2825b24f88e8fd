"""BART: post-LayerNorm encoder-decoder with learned positions (offset 2: rows 0 and 1 of each
table are never used by real tokens), an embedding norm per stack, optional sqrt(d) embedding
scale, and a final logits bias."""

from __future__ import annotations

import math
from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, Unsupported, activation, dropout_of, expect, head_is_tied,
                           hf_activation, positive, require, shared_stack_widths, special_ids, token_id,
                           write_special_ids)
from zoo.hf.keymap import Rule, rule

_OFFSET = 2  # BartLearnedPositionalEmbedding adds 2 to every position


def _attention(hf: str, zoo: str) -> list[Rule]:
    out = [rule(f"{hf}.out_proj.weight", f"{zoo}/o", "linear_out"),
           rule(f"{hf}.out_proj.bias", f"{zoo}/o_bias")]
    for x in "qkv":
        out += [rule(f"{hf}.{x}_proj.weight", f"{zoo}/{x}", "linear"),
                rule(f"{hf}.{x}_proj.bias", f"{zoo}/{x}_bias", "flat")]
    return out


def _norm(hf: str, zoo: str) -> list[Rule]:
    return [rule(f"{hf}.weight", f"{zoo}/scale"), rule(f"{hf}.bias", f"{zoo}/bias")]


def _stack(stack: str) -> list[Rule]:
    hf, layer, zoo = f"model.{stack}", f"model.{stack}.layers.{{i}}", f"{stack}/layers"
    out = [rule(f"{hf}.embed_positions.weight", f"{stack}/positions"),
           *_norm(f"{hf}.layernorm_embedding", f"{stack}/embed_norm"),
           *_attention(f"{layer}.self_attn", f"{zoo}/attn"),
           *_norm(f"{layer}.self_attn_layer_norm", f"{zoo}/attn_norm"),
           rule(f"{layer}.fc1.weight", f"{zoo}/mlp/wi", "linear"), rule(f"{layer}.fc1.bias", f"{zoo}/mlp/bi"),
           rule(f"{layer}.fc2.weight", f"{zoo}/mlp/wo", "linear_out"),
           rule(f"{layer}.fc2.bias", f"{zoo}/mlp/bo"),
           *_norm(f"{layer}.final_layer_norm", f"{zoo}/mlp_norm")]
    if stack == "decoder":
        out += [*_attention(f"{layer}.encoder_attn", f"{zoo}/cross"),
                *_norm(f"{layer}.encoder_attn_layer_norm", f"{zoo}/cross_norm")]
    return out


RULES = [rule("model.shared.weight", "embed/tokens"), *_stack("encoder"), *_stack("decoder"),
         rule("final_logits_bias", "head/bias", "row"), rule("lm_head.weight", "head/kernel", "linear")]


def read_config(d: dict, weights: Any) -> Config:
    name = "bart"
    # Fields of BART's relatives (mBART, old fairseq ports) that change the architecture.
    expect(d, name, "normalize_before", (False,), False)
    expect(d, name, "add_final_layer_norm", (False,), False)
    expect(d, name, "normalize_embedding", (True,), True)
    expect(d, name, "static_position_embeddings", (False,), False)
    expect(d, name, "add_bias_logits", (False,), False)
    expect(d, name, "extra_pos_embeddings", (_OFFSET,), _OFFSET)
    heads, ffn = shared_stack_widths(d, name)
    vocab, width = positive(d, name, "vocab_size"), positive(d, name, "d_model")
    layers, decoder_layers = positive(d, name, "encoder_layers"), positive(d, name, "decoder_layers")
    ids = special_ids(d, vocab)
    start = token_id(d.get("decoder_start_token_id"), vocab)
    return Config(
        family="encdec", vocab_size=vocab, d_model=width, num_layers=layers,
        num_decoder_layers=None if decoder_layers == layers else decoder_layers, num_heads=heads, d_ff=ffn,
        activation=activation(d.get("activation_function", "gelu"), name, "activation_function"),
        norm="layernorm", norm_eps=1e-5, norm_position="post", embed_norm=True, final_norm=False,
        positions="learned", max_len=positive(d, name, "max_position_embeddings"), position_offset=_OFFSET,
        embed_scale=math.sqrt(width) if d.get("scale_embedding") else 1.0,
        tie_embeddings=head_is_tied(d, weights, name, "lm_head.weight", "model.shared.weight", True),
        logits_bias=weights.has("final_logits_bias"), dropout=dropout_of(d, "dropout"),
        decoder_start_id=start, **ids)


def write_config(cfg: Config) -> dict:
    if cfg.norm_eps != 1e-5:
        raise Unsupported(f"save_hf: bart's LayerNorms use eps 1e-5, got Config.norm_eps={cfg.norm_eps}")
    return {
        "architectures": ["BartForConditionalGeneration"], "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "encoder_layers": cfg.num_layers, "decoder_layers": cfg.decoder_layers,
        "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff, "activation_function": hf_activation(cfg),
        "max_position_embeddings": cfg.max_len, "scale_embedding": cfg.embed_scale != 1.0,
        "tie_word_embeddings": cfg.tie_embeddings, "dropout": cfg.dropout, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "is_encoder_decoder": True,
        "decoder_start_token_id": cfg.decoder_start_id, "forced_eos_token_id": cfg.eos_id,
        **write_special_ids(cfg),
    }


BART = ModelType("bart", "encdec", read_config, write_config, RULES, prefix="model.",
                 ignore=(r"(^|\.)(encoder|decoder)\.embed_tokens\.weight$",))
