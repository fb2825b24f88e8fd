"""Whisper: a pre-LayerNorm encoder-decoder whose encoder reads log-mel features through a
convolutional stem (`zoo.nn.stem`, `Config.num_mel_bins`), with sinusoidal encoder positions
over max_source_positions, learned decoder positions over max_target_positions, no key bias
(`Config.attn_key_bias=False`) and a head tied to the decoder's token embeddings.

The encoder's position table is not a zoo parameter: Whisper freezes it at the sinusoids that
`zoo.nn.positions.sinusoidal_table` computes (the same formula), so zoo computes it, load_hf
checks a checkpoint's stored table equals it (`ModelType.fixed`) and save_hf writes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.config import Config
from zoo.hf.common import (ModelType, Unsupported, activation, dropout_of, expect, head_is_tied,
                           hf_activation, positive, require, shared_stack_widths, special_ids, token_id,
                           write_special_ids)
from zoo.hf.keymap import Rule, rule
from zoo.nn.positions import sinusoidal_table

NAME = "whisper"
_ENCODER_POSITIONS = "model.encoder.embed_positions.weight"
_EPS = 1e-5  # torch.nn.LayerNorm's default, which Whisper's norms keep


def _attention(hf: str, zoo: str) -> list[Rule]:
    return [rule(f"{hf}.q_proj.weight", f"{zoo}/q", "linear"), rule(f"{hf}.q_proj.bias", f"{zoo}/q_bias", "flat"),
            rule(f"{hf}.k_proj.weight", f"{zoo}/k", "linear"),  # k_proj has no bias
            rule(f"{hf}.v_proj.weight", f"{zoo}/v", "linear"), rule(f"{hf}.v_proj.bias", f"{zoo}/v_bias", "flat"),
            rule(f"{hf}.out_proj.weight", f"{zoo}/o", "linear_out"), rule(f"{hf}.out_proj.bias", f"{zoo}/o_bias")]


def _norm(hf: str, zoo: str) -> list[Rule]:
    return [rule(f"{hf}.weight", f"{zoo}/scale"), rule(f"{hf}.bias", f"{zoo}/bias")]


def _stack(stack: str) -> list[Rule]:
    hf, layer, zoo = f"model.{stack}", f"model.{stack}.layers.{{i}}", f"{stack}/layers"
    out = [*_attention(f"{layer}.self_attn", f"{zoo}/attn"),
           *_norm(f"{layer}.self_attn_layer_norm", f"{zoo}/attn_norm"),
           rule(f"{layer}.fc1.weight", f"{zoo}/mlp/wi", "linear"), rule(f"{layer}.fc1.bias", f"{zoo}/mlp/bi"),
           rule(f"{layer}.fc2.weight", f"{zoo}/mlp/wo", "linear_out"), rule(f"{layer}.fc2.bias", f"{zoo}/mlp/bo"),
           *_norm(f"{layer}.final_layer_norm", f"{zoo}/mlp_norm"),
           *_norm(f"{hf}.layer_norm", f"{stack}/final_norm")]
    if stack == "encoder":
        for conv in ("conv1", "conv2"):
            out += [rule(f"{hf}.{conv}.weight", f"encoder/stem/{conv}/kernel", "conv1d"),
                    rule(f"{hf}.{conv}.bias", f"encoder/stem/{conv}/bias")]
    else:
        out += [rule(f"{hf}.embed_positions.weight", "decoder/positions"),
                *_attention(f"{layer}.encoder_attn", f"{zoo}/cross"),
                *_norm(f"{layer}.encoder_attn_layer_norm", f"{zoo}/cross_norm")]
    return out


RULES = [rule("model.decoder.embed_tokens.weight", "embed/tokens"), *_stack("encoder"), *_stack("decoder"),
         rule("proj_out.weight", "head/kernel", "linear")]


def fixed(cfg: Config) -> dict[str, np.ndarray]:
    """The encoder's sinusoidal position table [max_source_positions, d_model]."""
    return {_ENCODER_POSITIONS: sinusoidal_table(cfg.encoder_stack.max_len, cfg.d_model)}


def read_config(d: dict, weights: Any) -> Config:
    expect(d, NAME, "use_weighted_layer_sum", (False,), False)  # the audio classifier's pooling
    heads, ffn = shared_stack_widths(d, NAME)
    vocab, width = positive(d, NAME, "vocab_size"), positive(d, NAME, "d_model")
    require(width % 2 == 0, NAME, "d_model", f"the sinusoidal encoder positions need an even width, got {width}")
    layers, decoder_layers = positive(d, NAME, "encoder_layers"), positive(d, NAME, "decoder_layers")
    # scale_embedding is read by WhisperConfig but never applied by transformers' Whisper (its
    # embed_scale is unused): the embeddings enter unscaled whatever it says.
    return Config(
        family="encdec", vocab_size=vocab, d_model=width, num_layers=layers,
        num_decoder_layers=None if decoder_layers == layers else decoder_layers, num_heads=heads, d_ff=ffn,
        activation=activation(d.get("activation_function", "gelu"), NAME, "activation_function"),
        norm="layernorm", norm_eps=_EPS, norm_position="pre", final_norm=True, attn_key_bias=False,
        positions="learned", max_len=positive(d, NAME, "max_target_positions"),
        encoder_positions="sinusoidal", encoder_max_len=positive(d, NAME, "max_source_positions"),
        num_mel_bins=positive(d, NAME, "num_mel_bins"),
        tie_embeddings=head_is_tied(d, weights, NAME, "proj_out.weight", "model.decoder.embed_tokens.weight", True),
        dropout=dropout_of(d, "dropout"), decoder_start_id=token_id(d.get("decoder_start_token_id"), vocab),
        **special_ids(d, vocab))


def write_config(cfg: Config) -> dict:
    if cfg.norm_eps != _EPS:
        raise Unsupported(f"save_hf: whisper's LayerNorms use eps {_EPS}, got Config.norm_eps={cfg.norm_eps}")
    return {
        "architectures": ["WhisperForConditionalGeneration"], "vocab_size": cfg.vocab_size,
        "num_mel_bins": cfg.num_mel_bins, "d_model": cfg.d_model, "encoder_layers": cfg.num_layers,
        "decoder_layers": cfg.decoder_layers, "encoder_attention_heads": cfg.num_heads,
        "decoder_attention_heads": cfg.num_heads, "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
        "activation_function": hf_activation(cfg), "max_source_positions": cfg.encoder_stack.max_len,
        "max_target_positions": cfg.max_len, "scale_embedding": False,
        "tie_word_embeddings": cfg.tie_embeddings, "dropout": cfg.dropout, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "is_encoder_decoder": True, "decoder_start_token_id": cfg.decoder_start_id,
        # Generation-time token lists (timestamps, blanks) are not part of the model zoo holds.
        "suppress_tokens": [], "begin_suppress_tokens": [],
        **write_special_ids(cfg),
    }


WHISPER = ModelType(NAME, "encdec", read_config, write_config, RULES, prefix="model.", fixed=fixed)
