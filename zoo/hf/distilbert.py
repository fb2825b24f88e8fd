"""DistilBERT (`distilbert`): BERT's post-norm layer under other names, without token types
or pooler, its LayerNorms at eps 1e-12 (fixed in transformers' code, not in the config).

`sinusoidal_pos_embds` only chooses how transformers initialises the position table; the
table is stored in the checkpoint either way, and zoo reads it as a learned table (saved
back with the flag false: the same numbers). Training in zoo updates it like any weight.

Task heads: the sequence classifier reads the first token through `pre_classifier` and a
ReLU, each head drops out by its own config field before its output projection (the token
classifier's is the body's `dropout`).
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, Unsupported, activation, dropout_of, head_is_tied, hf_activation,
                           positive, special_ids, write_special_ids)
from zoo.hf.heads import HeadFormat, Recipe
from zoo.hf.keymap import Rule, rule

_NAME = "distilbert"
_EPS = 1e-12  # transformers' DistilBERT LayerNorms
_EMBED = "distilbert.embeddings."
_LAYER = "distilbert.transformer.layer.{i}."
_L = "encoder/layers/"


def _rules() -> list[Rule]:
    out = [rule(_EMBED + "word_embeddings.weight", "embed/tokens"),
           rule(_EMBED + "position_embeddings.weight", "encoder/positions"),
           rule(_EMBED + "LayerNorm.weight", "encoder/embed_norm/scale"),
           rule(_EMBED + "LayerNorm.bias", "encoder/embed_norm/bias"),
           rule("vocab_transform.weight", "mlm/dense/kernel", "linear"),
           rule("vocab_transform.bias", "mlm/dense/bias"),
           rule("vocab_layer_norm.weight", "mlm/norm/scale"),
           rule("vocab_layer_norm.bias", "mlm/norm/bias"),
           rule("vocab_projector.weight", "head/kernel", "linear"),
           rule("vocab_projector.bias", "head/bias")]
    for zoo in "qkv":
        out += [rule(f"{_LAYER}attention.{zoo}_lin.weight", _L + f"attn/{zoo}", "linear"),
                rule(f"{_LAYER}attention.{zoo}_lin.bias", _L + f"attn/{zoo}_bias", "flat")]
    return out + [
        rule(_LAYER + "attention.out_lin.weight", _L + "attn/o", "linear_out"),
        rule(_LAYER + "attention.out_lin.bias", _L + "attn/o_bias"),
        rule(_LAYER + "sa_layer_norm.weight", _L + "attn_norm/scale"),
        rule(_LAYER + "sa_layer_norm.bias", _L + "attn_norm/bias"),
        rule(_LAYER + "ffn.lin1.weight", _L + "mlp/wi", "linear"),
        rule(_LAYER + "ffn.lin1.bias", _L + "mlp/bi"),
        rule(_LAYER + "ffn.lin2.weight", _L + "mlp/wo", "linear_out"),
        rule(_LAYER + "ffn.lin2.bias", _L + "mlp/bo"),
        rule(_LAYER + "output_layer_norm.weight", _L + "mlp_norm/scale"),
        rule(_LAYER + "output_layer_norm.bias", _L + "mlp_norm/bias"),
    ]


def _read(d: dict, weights: Any) -> Config:
    vocab = positive(d, _NAME, "vocab_size")
    has_mlm = weights.has("vocab_transform.weight")
    tied = True
    if has_mlm:
        tied = head_is_tied(d, weights, _NAME, "vocab_projector.weight", _EMBED + "word_embeddings.weight",
                            default=True)
    return Config(
        family="encoder", vocab_size=vocab, d_model=positive(d, _NAME, "dim"),
        num_layers=positive(d, _NAME, "n_layers"), num_heads=positive(d, _NAME, "n_heads"),
        d_ff=positive(d, _NAME, "hidden_dim"),
        activation=activation(d.get("activation", "gelu"), _NAME, "activation"),
        norm="layernorm", norm_eps=_EPS, norm_position="post", embed_norm=True, final_norm=False,
        positions="learned", max_len=positive(d, _NAME, "max_position_embeddings"), type_vocab_size=0,
        tie_embeddings=tied, logits_bias=weights.has("vocab_projector.bias") and has_mlm,
        mlm_transform=has_mlm, dropout=dropout_of(d, "dropout"), **special_ids(d, vocab))


def _write(cfg: Config) -> dict:
    if cfg.mlm_transform != cfg.logits_bias:
        raise Unsupported(f"save_hf: a distilbert MLM head has both the transform and the logits bias "
                          f"(Config.mlm_transform={cfg.mlm_transform}, logits_bias={cfg.logits_bias})")
    return {
        "architectures": ["DistilBertForMaskedLM" if cfg.mlm_transform else "DistilBertModel"],
        "vocab_size": cfg.vocab_size, "dim": cfg.d_model, "n_layers": cfg.num_layers,
        "n_heads": cfg.num_heads, "hidden_dim": cfg.d_ff, "activation": hf_activation(cfg),
        "max_position_embeddings": cfg.max_len, "sinusoidal_pos_embds": False,
        "tie_word_embeddings": cfg.tie_embeddings, "dropout": cfg.dropout, "attention_dropout": cfg.dropout,
        **write_special_ids(cfg),
    }


_HEADS = (HeadFormat("DistilBertForSequenceClassification", "sequence", Recipe(pool="first", act="relu"),
                     {"dense": "pre_classifier", "out": "classifier"}, dropout=("seq_classif_dropout",)),
          HeadFormat("DistilBertForTokenClassification", "token", Recipe(), {"out": "classifier"},
                     dropout=("dropout",)),
          HeadFormat("DistilBertForQuestionAnswering", "qa", Recipe(), {"out": "qa_outputs"},
                     dropout=("qa_dropout",), qa_by_labels=True))

DISTILBERT = ModelType(_NAME, "encoder", _read, _write, _rules(), prefix="distilbert.",
                       ignore=(r"position_ids$",), heads=_HEADS)
