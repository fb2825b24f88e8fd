"""BERT and RoBERTa: post-norm encoders with learned positions, token types and an MLM head.

RoBERTa differs in names and in its positions: Hugging Face numbers real tokens from
padding_idx + 1, zoo from 0 with `position_offset = padding_idx + 1` into the same table, so
both read the same rows for right-padded batches.
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, Unsupported, activation, dropout_of, expect, head_is_tied,
                           hf_activation, positive, special_ids, write_special_ids)
from zoo.hf.heads import Recipe, encoder_heads
from zoo.hf.keymap import Rule, rule


def _rules(base: str, mlm: dict[str, str]) -> list[Rule]:
    """base: the encoder's prefix ("bert."); mlm: the MLM head's key for each zoo leaf."""
    layer = base + "encoder.layer.{i}."
    out = [
        rule(base + "embeddings.word_embeddings.weight", "embed/tokens"),
        rule(base + "embeddings.token_type_embeddings.weight", "embed/types"),
        rule(base + "embeddings.position_embeddings.weight", "encoder/positions"),
        rule(base + "embeddings.LayerNorm.weight", "encoder/embed_norm/scale"),
        rule(base + "embeddings.LayerNorm.bias", "encoder/embed_norm/bias"),
        rule(base + "pooler.dense.weight", "pooler/kernel", "linear"),
        rule(base + "pooler.dense.bias", "pooler/bias"),
    ]
    for hf, zoo in (("query", "q"), ("key", "k"), ("value", "v")):
        out += [rule(f"{layer}attention.self.{hf}.weight", f"encoder/layers/attn/{zoo}", "linear"),
                rule(f"{layer}attention.self.{hf}.bias", f"encoder/layers/attn/{zoo}_bias", "flat")]
    out += [
        rule(layer + "attention.output.dense.weight", "encoder/layers/attn/o", "linear_out"),
        rule(layer + "attention.output.dense.bias", "encoder/layers/attn/o_bias"),
        rule(layer + "attention.output.LayerNorm.weight", "encoder/layers/attn_norm/scale"),
        rule(layer + "attention.output.LayerNorm.bias", "encoder/layers/attn_norm/bias"),
        rule(layer + "intermediate.dense.weight", "encoder/layers/mlp/wi", "linear"),
        rule(layer + "intermediate.dense.bias", "encoder/layers/mlp/bi"),
        rule(layer + "output.dense.weight", "encoder/layers/mlp/wo", "linear_out"),
        rule(layer + "output.dense.bias", "encoder/layers/mlp/bo"),
        rule(layer + "output.LayerNorm.weight", "encoder/layers/mlp_norm/scale"),
        rule(layer + "output.LayerNorm.bias", "encoder/layers/mlp_norm/bias"),
    ]
    kinds = {"mlm/dense/kernel": "linear", "head/kernel": "linear"}
    out += [rule(hf, zoo, kinds.get(zoo, "copy")) for zoo, hf in mlm.items()]
    return out


_BERT_MLM = {"mlm/dense/kernel": "cls.predictions.transform.dense.weight",
             "mlm/dense/bias": "cls.predictions.transform.dense.bias",
             "mlm/norm/scale": "cls.predictions.transform.LayerNorm.weight",
             "mlm/norm/bias": "cls.predictions.transform.LayerNorm.bias",
             "head/bias": "cls.predictions.bias",
             "head/kernel": "cls.predictions.decoder.weight"}
_ROBERTA_MLM = {"mlm/dense/kernel": "lm_head.dense.weight", "mlm/dense/bias": "lm_head.dense.bias",
                "mlm/norm/scale": "lm_head.layer_norm.weight", "mlm/norm/bias": "lm_head.layer_norm.bias",
                "head/bias": "lm_head.bias", "head/kernel": "lm_head.decoder.weight"}


def _read(d: dict, weights: Any, name: str, base: str, mlm: dict[str, str]) -> Config:
    expect(d, name, "position_embedding_type", ("absolute",), "absolute")
    expect(d, name, "is_decoder", (False,), False)
    expect(d, name, "add_cross_attention", (False,), False)
    vocab = positive(d, name, "vocab_size")
    offset = 0
    if name == "roberta":
        offset = d.get("pad_token_id", 1) + 1  # HF positions start after padding_idx
    has_mlm = weights.has(mlm["mlm/dense/kernel"])
    tied = True
    if has_mlm:
        tied = head_is_tied(d, weights, name, mlm["head/kernel"], base + "embeddings.word_embeddings.weight",
                            default=True)
    return Config(
        family="encoder", vocab_size=vocab, d_model=positive(d, name, "hidden_size"),
        num_layers=positive(d, name, "num_hidden_layers"), num_heads=positive(d, name, "num_attention_heads"),
        d_ff=positive(d, name, "intermediate_size"),
        activation=activation(d.get("hidden_act", "gelu"), name, "hidden_act"),
        norm="layernorm", norm_eps=float(d.get("layer_norm_eps", 1e-12)), norm_position="post",
        embed_norm=True, final_norm=False, positions="learned",
        max_len=positive(d, name, "max_position_embeddings") - offset, position_offset=offset,
        type_vocab_size=d.get("type_vocab_size", 2), tie_embeddings=tied,
        logits_bias=weights.has(mlm["head/bias"]), mlm_transform=has_mlm,
        pooler=weights.has(base + "pooler.dense.weight"), dropout=dropout_of(d, "hidden_dropout_prob"),
        **special_ids(d, vocab))


def _write(cfg: Config, name: str, arch: str) -> dict:
    if cfg.mlm_transform != cfg.logits_bias:
        raise Unsupported(f"save_hf: a {name} MLM head has both the transform and the logits bias "
                          f"(Config.mlm_transform={cfg.mlm_transform}, logits_bias={cfg.logits_bias})")
    if not cfg.type_vocab_size:  # transformers embeds token type 0 whatever the config says
        raise Unsupported(f"save_hf: {name} embeds token types; Config.type_vocab_size must be >= 1, got 0")
    if name == "roberta" and cfg.pad_id != cfg.position_offset - 1:
        raise Unsupported(f"save_hf: roberta numbers positions from its pad id, so Config.pad_id="
                          f"{cfg.pad_id} needs position_offset={cfg.pad_id + 1}, got {cfg.position_offset}")
    return {
        "architectures": [f"{arch}ForMaskedLM" if cfg.mlm_transform else f"{arch}Model"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.d_ff,
        "hidden_act": hf_activation(cfg), "layer_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_len + cfg.position_offset,
        "type_vocab_size": cfg.type_vocab_size, "position_embedding_type": "absolute",
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        **write_special_ids(cfg),
    }


BERT = ModelType(
    "bert", "encoder",
    lambda d, w: _read(d, w, "bert", "bert.", _BERT_MLM),
    lambda cfg: _write(cfg, "bert", "Bert"),
    _rules("bert.", _BERT_MLM), prefix="bert.",
    ignore=(r"position_ids$", r"^cls\.predictions\.decoder\.bias$", r"^cls\.seq_relationship\."),
    heads=encoder_heads("Bert", Recipe(pool="pooled")))

ROBERTA = ModelType(
    "roberta", "encoder",
    lambda d, w: _read(d, w, "roberta", "roberta.", _ROBERTA_MLM),
    lambda cfg: _write(cfg, "roberta", "Roberta"),
    _rules("roberta.", _ROBERTA_MLM), prefix="roberta.",
    ignore=(r"position_ids$", r"^lm_head\.decoder\.bias$"),
    heads=encoder_heads("Roberta", Recipe(pool="first", act="tanh"),
                        {"dense": "classifier.dense", "out": "classifier.out_proj"}))
