"""ALBERT (`albert`): BERT's post-norm layer with two ways to fewer parameters.

- Factorised embeddings: token, type and position tables and the embedding LayerNorm are
  `embedding_size` (E) wide, and `embedding_hidden_mapping_in` projects them to the hidden
  size (zoo: `Config.embed_dim`, the stack's `embed_proj`). The MLM head's dense maps the
  hidden state back to E, where the tied decoder reads the E-wide token table.
- Cross-layer sharing: `num_hidden_groups` parameter sets, layer i running group
  int(i / (num_hidden_layers / num_hidden_groups)) (zoo: `Config.shared_layers`, whose
  stacked `layers` hold one set per group, HF's `albert_layer_groups.{i}`). zoo takes
  groups that divide the depth, and `inner_group_num` 1 (one layer per group).

Task heads as BERT's: the sequence classifier reads the pooler, the token classifier every
position, both after `classifier_dropout_prob`.
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, Unsupported, activation, dropout_of, expect, head_is_tied,
                           hf_activation, positive, require, special_ids, write_special_ids)
from zoo.hf.heads import Recipe, encoder_heads
from zoo.hf.keymap import Rule, rule

_NAME = "albert"
_EMBED = "albert.embeddings."
_LAYER = "albert.encoder.albert_layer_groups.{i}.albert_layers.0."
_L = "encoder/layers/"


def _rules() -> list[Rule]:
    out = [rule(_EMBED + "word_embeddings.weight", "embed/tokens"),
           rule(_EMBED + "token_type_embeddings.weight", "embed/types"),
           rule(_EMBED + "position_embeddings.weight", "encoder/positions"),
           rule(_EMBED + "LayerNorm.weight", "encoder/embed_norm/scale"),
           rule(_EMBED + "LayerNorm.bias", "encoder/embed_norm/bias"),
           rule("albert.encoder.embedding_hidden_mapping_in.weight", "encoder/embed_proj/kernel", "linear"),
           rule("albert.encoder.embedding_hidden_mapping_in.bias", "encoder/embed_proj/bias"),
           rule("albert.pooler.weight", "pooler/kernel", "linear"),
           rule("albert.pooler.bias", "pooler/bias"),
           rule("predictions.dense.weight", "mlm/dense/kernel", "linear"),
           rule("predictions.dense.bias", "mlm/dense/bias"),
           rule("predictions.LayerNorm.weight", "mlm/norm/scale"),
           rule("predictions.LayerNorm.bias", "mlm/norm/bias"),
           rule("predictions.bias", "head/bias"),
           rule("predictions.decoder.weight", "head/kernel", "linear")]
    for hf, zoo in (("query", "q"), ("key", "k"), ("value", "v")):
        out += [rule(f"{_LAYER}attention.{hf}.weight", _L + f"attn/{zoo}", "linear"),
                rule(f"{_LAYER}attention.{hf}.bias", _L + f"attn/{zoo}_bias", "flat")]
    return out + [
        rule(_LAYER + "attention.dense.weight", _L + "attn/o", "linear_out"),
        rule(_LAYER + "attention.dense.bias", _L + "attn/o_bias"),
        rule(_LAYER + "attention.LayerNorm.weight", _L + "attn_norm/scale"),
        rule(_LAYER + "attention.LayerNorm.bias", _L + "attn_norm/bias"),
        rule(_LAYER + "ffn.weight", _L + "mlp/wi", "linear"),
        rule(_LAYER + "ffn.bias", _L + "mlp/bi"),
        rule(_LAYER + "ffn_output.weight", _L + "mlp/wo", "linear_out"),
        rule(_LAYER + "ffn_output.bias", _L + "mlp/bo"),
        rule(_LAYER + "full_layer_layer_norm.weight", _L + "mlp_norm/scale"),
        rule(_LAYER + "full_layer_layer_norm.bias", _L + "mlp_norm/bias"),
    ]


def _read(d: dict, weights: Any) -> Config:
    expect(d, _NAME, "inner_group_num", (1,), 1)
    expect(d, _NAME, "position_embedding_type", ("absolute",), "absolute")
    layers = positive(d, _NAME, "num_hidden_layers")
    groups = d.get("num_hidden_groups", 1)
    require(isinstance(groups, int) and 0 < groups <= layers and layers % groups == 0, _NAME,
            "num_hidden_groups", f"zoo shares blocks of equal size: expected a divisor of "
            f"num_hidden_layers={layers}, got {groups!r}")
    vocab = positive(d, _NAME, "vocab_size")
    has_mlm = weights.has("predictions.dense.weight")
    tied = True
    if has_mlm:
        tied = head_is_tied(d, weights, _NAME, "predictions.decoder.weight",
                            _EMBED + "word_embeddings.weight", default=True)
    return Config(
        family="encoder", vocab_size=vocab, d_model=positive(d, _NAME, "hidden_size"),
        num_layers=layers, num_heads=positive(d, _NAME, "num_attention_heads"),
        d_ff=positive(d, _NAME, "intermediate_size"),
        activation=activation(d.get("hidden_act", "gelu_new"), _NAME, "hidden_act"),
        norm="layernorm", norm_eps=float(d.get("layer_norm_eps", 1e-12)), norm_position="post",
        embed_norm=True, final_norm=False, positions="learned",
        max_len=positive(d, _NAME, "max_position_embeddings"), type_vocab_size=d.get("type_vocab_size", 2),
        tie_embeddings=tied, logits_bias=has_mlm, mlm_transform=has_mlm,
        pooler=weights.has("albert.pooler.weight"), dropout=dropout_of(d, "hidden_dropout_prob"),
        embed_dim=positive(d, _NAME, "embedding_size"),
        shared_layers=0 if groups == layers else groups, **special_ids(d, vocab))


def _write(cfg: Config) -> dict:
    if cfg.embed_dim is None:
        raise Unsupported("save_hf: an albert checkpoint has factorised embeddings, but Config.embed_dim "
                          "is None (embed_dim=d_model projects without narrowing)")
    if cfg.mlm_transform != cfg.logits_bias:
        raise Unsupported(f"save_hf: an albert MLM head has both the transform and the logits bias "
                          f"(Config.mlm_transform={cfg.mlm_transform}, logits_bias={cfg.logits_bias})")
    if not cfg.type_vocab_size:
        raise Unsupported("save_hf: albert embeds token types; Config.type_vocab_size must be >= 1, got 0")
    return {
        "architectures": ["AlbertForMaskedLM" if cfg.mlm_transform else "AlbertModel"],
        "vocab_size": cfg.vocab_size, "embedding_size": cfg.embed_dim, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_hidden_groups": cfg.shared_layers or cfg.num_layers,
        "inner_group_num": 1, "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.d_ff,
        "hidden_act": hf_activation(cfg), "layer_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        **write_special_ids(cfg),
    }


ALBERT = ModelType(
    _NAME, "encoder", _read, _write, _rules(), prefix="albert.",
    # The decoder's bias is predictions.bias; the SOP classifier belongs to pre-training.
    ignore=(r"position_ids$", r"token_type_ids$", r"^predictions\.decoder\.bias$", r"^sop_classifier\."),
    heads=encoder_heads("Albert", Recipe(pool="pooled"), dropout=("classifier_dropout_prob", "hidden_dropout_prob")))
