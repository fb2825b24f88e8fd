"""T5 (v1.0: ReLU MLP, tied head scaled by d_model**-0.5) and T5 v1.1 / Flan-T5 (gated-GELU,
untied head, no scaling): pre-RMSNorm encoder-decoder with relative position buckets, no
attention scaling and no biases. The relative-bias table lives in block 0 of each stack.
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, Unsupported, activation, dropout_of, expect, head_is_tied,
                           hf_activation, positive, require, special_ids, token_id,
                           write_special_ids)
from zoo.hf.keymap import Rule, rule


def _attention(hf: str, zoo: str) -> list[Rule]:
    return [rule(f"{hf}.q.weight", f"{zoo}/q", "linear"), rule(f"{hf}.k.weight", f"{zoo}/k", "linear"),
            rule(f"{hf}.v.weight", f"{zoo}/v", "linear"), rule(f"{hf}.o.weight", f"{zoo}/o", "linear_out")]


def _mlp(hf: str, zoo: str) -> list[Rule]:
    def gated(c: Config) -> bool:
        return c.gated

    # Gated: act(x wi_0) * (x wi_1), so wi_0 is zoo's gate wg.
    return [rule(f"{hf}.wi.weight", f"{zoo}/wi", "linear", when=lambda c: not c.gated),
            rule(f"{hf}.wi_0.weight", f"{zoo}/wg", "linear", when=gated),
            rule(f"{hf}.wi_1.weight", f"{zoo}/wi", "linear", when=gated),
            rule(f"{hf}.wo.weight", f"{zoo}/wo", "linear_out")]


def _stack(stack: str) -> list[Rule]:
    block, layers = f"{stack}.block.{{i}}.layer", f"{stack}/layers"
    mlp_index = 2 if stack == "decoder" else 1
    out = [rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}/rel_bias"),
           rule(f"{block}.0.layer_norm.weight", f"{layers}/attn_norm/scale"),
           *_attention(f"{block}.0.SelfAttention", f"{layers}/attn"),
           rule(f"{block}.{mlp_index}.layer_norm.weight", f"{layers}/mlp_norm/scale"),
           *_mlp(f"{block}.{mlp_index}.DenseReluDense", f"{layers}/mlp"),
           rule(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale")]
    if stack == "decoder":
        out += [rule(f"{block}.1.layer_norm.weight", f"{layers}/cross_norm/scale"),
                *_attention(f"{block}.1.EncDecAttention", f"{layers}/cross")]
    return out


RULES = [rule("shared.weight", "embed/tokens"), *_stack("encoder"), *_stack("decoder"),
         rule("lm_head.weight", "head/kernel", "linear")]


def _activation(proj: Any) -> str:
    parts = str(proj).split("-")
    require(len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated"), "t5", "feed_forward_proj",
            f"expected 'act' or 'gated-act', got {proj!r}")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # as transformers reads it
    return activation(act, "t5", "feed_forward_proj", gated=len(parts) == 2)


def read_config(d: dict, weights: Any) -> Config:
    name = "t5"
    expect(d, name, "is_decoder", (False,), False)
    vocab = positive(d, name, "vocab_size")
    width = positive(d, name, "d_model")
    # transformers 5 writes scale_decoder_outputs; older configs mean it by tie_word_embeddings.
    scale = d.get("scale_decoder_outputs", d.get("tie_word_embeddings", True) is not False)
    tied = head_is_tied(d, weights, name, "lm_head.weight", "shared.weight", True)
    if scale and not tied:
        raise Unsupported("load_hf: t5 config scales decoder outputs by d_model**-0.5 "
                          "(scale_decoder_outputs/tie_word_embeddings) but lm_head.weight differs from "
                          "shared.weight; zoo scales only tied heads (Config.logit_scale)")
    heads, head_dim = positive(d, name, "num_heads"), positive(d, name, "d_kv")
    layers = positive(d, name, "num_layers")
    decoder_layers = d.get("num_decoder_layers") or layers
    ids = special_ids(d, vocab)
    start = token_id(d.get("decoder_start_token_id"), vocab)
    return Config(
        family="encdec", vocab_size=vocab, d_model=width, num_layers=layers,
        num_decoder_layers=None if decoder_layers == layers else decoder_layers,
        num_heads=heads, head_dim=None if head_dim * heads == width else head_dim,
        d_ff=positive(d, name, "d_ff"), activation=_activation(d.get("feed_forward_proj", "relu")),
        norm="rmsnorm", norm_bias=False, norm_eps=float(d.get("layer_norm_epsilon", 1e-6)),
        attn_bias=False, mlp_bias=False, positions="relative", max_len=d.get("n_positions") or 512,
        relative_buckets=d.get("relative_attention_num_buckets", 32),
        relative_max_distance=d.get("relative_attention_max_distance", 128), attn_scale=1.0,
        initializer="t5", tie_embeddings=tied, logit_scale=width ** -0.5 if scale else 1.0,
        dropout=dropout_of(d, "dropout_rate"), decoder_start_id=ids["pad_id"] if start is None else start,
        **ids)


def write_config(cfg: Config) -> dict:
    scale = cfg.tie_embeddings and cfg.logit_scale != 1.0
    gated = "gated-" if cfg.gated else ""
    act = hf_activation(cfg)
    # T5's own spelling: "gated-gelu" means the tanh GELU, "gated-gelu_new" says the same.
    proj = "gated-gelu" if gated and act == "gelu_new" else gated + act
    return {
        "architectures": ["T5ForConditionalGeneration"], "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "d_kv": cfg.head_size, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": proj, "n_positions": cfg.max_len,
        "dropout_rate": cfg.dropout, "is_encoder_decoder": True,
        # transformers 5 reads scale_decoder_outputs and always ties unless lm_head differs;
        # transformers 4 reads tie_word_embeddings for both.
        "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": scale,
        "decoder_start_token_id": cfg.decoder_start_id, **write_special_ids(cfg),
    }


T5 = ModelType("t5", "encdec", read_config, write_config, RULES,
               ignore=(r"^(encoder|decoder)\.embed_tokens\.weight$",
                       r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"))
