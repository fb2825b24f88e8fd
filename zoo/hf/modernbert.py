"""ModernBERT (`modernbert`): a pre-LayerNorm encoder with RoPE, GeGLU and no biases, whose
layers alternate two-sided local attention with a global layer every
`global_attn_every_n_layers` (or as `layer_types` lists them).

Differences from BERT that the map carries:
- q, k and v fused in one `Wqkv` (q | k | v on the torch output axis), the MLP's input and
  gate in one `Wi` (input | gate: the first half goes through the activation, zoo's `wg`).
- Global and local layers rotate with their own RoPE bases (`rope_parameters` per layer
  type, or the older top-level `global_rope_theta` / `local_rope_theta`).
- A local layer sees keys at most `local_attention // 2` positions away on either side:
  zoo's two-sided window of `local_attention // 2 + 1` (`Config.sliding_window`).
- The embedding norm feeds layer 0's attention directly: that layer has no attention norm
  (`Config.first_attn_norm=False`, the stack's `first_layer`).
- The MLM head is dense (bias as `classifier_bias`) -> activation -> LayerNorm -> the tied
  decoder with its own bias (`decoder_bias`).
- Task heads (sequence, token, QA) run the same dense -> activation -> LayerNorm under the same
  names (`head.*`), then dropout and `classifier`; sequence heads first pool the first token
  or the mean over real tokens (`classifier_pooling`). A checkpoint with a `classifier` has
  no MLM head.
"""

from __future__ import annotations

from typing import Any

from zoo.config import ACTIVATIONS, Config
from zoo.hf.common import (ModelType, Unsupported, activation, head_is_tied,
                           layer_pattern, positive, read_layer_kinds, require, special_ids,
                           write_layer_types, write_special_ids)
from zoo.hf.heads import HeadFormat, Recipe
from zoo.hf.keymap import Rule, rule

_NAME = "modernbert"
_EMBED = "model.embeddings.tok_embeddings.weight"
_S = "encoder/"


def _layer_rules(hf: str, zoo: str, layer_offset: int) -> list[Rule]:
    """The tensors of one layer layout: hf "model.layers.{i}." (or ".0."), zoo its leaf prefix."""
    out = [rule(hf + "attn.Wqkv.weight", tuple(f"{zoo}attn/{x}" for x in "qkv"), "linear",
                layer_offset=layer_offset),
           rule(hf + "attn.Wqkv.bias", tuple(f"{zoo}attn/{x}_bias" for x in "qkv"), "flat",
                layer_offset=layer_offset),
           rule(hf + "attn.Wo.weight", zoo + "attn/o", "linear_out", layer_offset=layer_offset),
           rule(hf + "attn.Wo.bias", zoo + "attn/o_bias", layer_offset=layer_offset),
           rule(hf + "mlp.Wi.weight", (zoo + "mlp/wg", zoo + "mlp/wi"), "linear", layer_offset=layer_offset),
           rule(hf + "mlp.Wi.bias", (zoo + "mlp/bg", zoo + "mlp/bi"), layer_offset=layer_offset),
           rule(hf + "mlp.Wo.weight", zoo + "mlp/wo", "linear_out", layer_offset=layer_offset),
           rule(hf + "mlp.Wo.bias", zoo + "mlp/bo", layer_offset=layer_offset)]
    for norm in ("attn_norm", "mlp_norm"):
        out += [rule(f"{hf}{norm}.weight", f"{zoo}{norm}/scale", layer_offset=layer_offset),
                rule(f"{hf}{norm}.bias", f"{zoo}{norm}/bias", layer_offset=layer_offset)]
    return out


def _rules() -> list[Rule]:
    out = [rule(_EMBED, "embed/tokens"),
           rule("model.embeddings.norm.weight", _S + "embed_norm/scale"),
           rule("model.embeddings.norm.bias", _S + "embed_norm/bias"),
           rule("model.final_norm.weight", _S + "final_norm/scale"),
           rule("model.final_norm.bias", _S + "final_norm/bias"),
           rule("head.dense.weight", "mlm/dense/kernel", "linear"),
           rule("head.dense.bias", "mlm/dense/bias"),
           rule("head.norm.weight", "mlm/norm/scale"),
           rule("head.norm.bias", "mlm/norm/bias"),
           rule("decoder.weight", "head/kernel", "linear"),
           rule("decoder.bias", "head/bias")]
    # Layer 0 has its own layout (no attn_norm); the stacked layers are HF's 1..L-1.
    return out + _layer_rules("model.layers.0.", _S + "first_layer/", 0) + \
        _layer_rules("model.layers.{i}.", _S + "layers/", 1)


def _rope_thetas(d: dict) -> tuple[float, float]:
    """(global, local) RoPE bases, from `rope_parameters` per layer type (transformers 5) or
    the top-level `global_rope_theta` / `local_rope_theta`; only unscaled RoPE."""
    rope = d.get("rope_parameters") or {}
    thetas = []
    for layer_type, legacy, default in (("full_attention", "global_rope_theta", 160_000.0),
                                        ("sliding_attention", "local_rope_theta", 10_000.0)):
        params = rope.get(layer_type) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        require(kind == "default", _NAME, f"rope_parameters.{layer_type}.rope_type",
                f"value {kind!r} is not supported by zoo (supported: ['default'])")
        theta = params.get("rope_theta", d.get(legacy, default))
        require(isinstance(theta, (int, float)) and theta > 0, _NAME, f"rope_parameters.{layer_type}.rope_theta",
                f"expected a positive number, got {theta!r}")
        thetas.append(float(theta))
    return thetas[0], thetas[1]


def _layer_kinds(d: dict, num_layers: int) -> list[str]:
    every = d.get("global_attn_every_n_layers", 3)
    require(isinstance(every, int) and every > 0, _NAME, "global_attn_every_n_layers",
            f"expected a positive int, got {every!r}")
    default = ["sliding_attention" if i % every else "full_attention" for i in range(num_layers)]
    return read_layer_kinds(d, _NAME, num_layers, default)


def _read(d: dict, weights: Any) -> Config:
    vocab = positive(d, _NAME, "vocab_size")
    width, heads = positive(d, _NAME, "hidden_size"), positive(d, _NAME, "num_attention_heads")
    require(width % heads == 0, _NAME, "num_attention_heads",
            f"hidden_size={width} must be a multiple of num_attention_heads={heads}")
    layers = positive(d, _NAME, "num_hidden_layers")
    require(layers >= 2, _NAME, "num_hidden_layers", f"zoo needs >= 2 layers, got {layers}")
    kinds = _layer_kinds(d, layers)
    local = d.get("local_attention", 128)
    require(isinstance(local, int) and local >= 0, _NAME, "local_attention",
            f"expected a non-negative int, got {local!r}")
    act = activation(d.get("hidden_activation", "gelu"), _NAME, "hidden_activation", gated=True)
    has_mlm = weights.has("head.dense.weight") and not weights.has("classifier.weight")
    if has_mlm:
        head_act = activation(d.get("classifier_activation", "gelu"), _NAME, "classifier_activation")
        require(head_act == ACTIVATIONS[act][0], _NAME, "classifier_activation",
                f"zoo's MLM head uses the layers' activation {ACTIVATIONS[act][0]!r}, got {head_act!r}")
        require(bool(d.get("classifier_bias", False)) == bool(d.get("mlp_bias", False)), _NAME,
                "classifier_bias", "zoo's MLM dense has a bias exactly when the MLPs do (mlp_bias="
                f"{d.get('mlp_bias', False)}), got {d.get('classifier_bias', False)}")
    global_theta, local_theta = _rope_thetas(d)
    has_local = "local" in kinds
    norm_bias = bool(d.get("norm_bias", False))
    return Config(
        family="encoder", vocab_size=vocab, d_model=width, num_layers=layers, num_heads=heads,
        d_ff=positive(d, _NAME, "intermediate_size"), activation=act,
        norm="layernorm", norm_bias=norm_bias, norm_eps=float(d.get("norm_eps", 1e-5)),
        norm_position="pre", embed_norm=True, final_norm=True, first_attn_norm=False,
        attn_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
        positions="rope", max_len=positive(d, _NAME, "max_position_embeddings"), rope_theta=global_theta,
        local_rope_theta=local_theta if has_local and local_theta != global_theta else None,
        sliding_window=local // 2 + 1 if has_local else None, layer_pattern=layer_pattern(kinds),
        tie_embeddings=head_is_tied(d, weights, _NAME, "decoder.weight", _EMBED, default=True) if has_mlm else True,
        logits_bias=weights.has("decoder.bias"), mlm_transform=has_mlm,
        dropout=float(d.get("mlp_dropout", 0.0) or 0.0), **special_ids(d, vocab))


def _write(cfg: Config) -> dict:
    if cfg.logits_bias and not cfg.mlm_transform:
        raise Unsupported("save_hf: a modernbert decoder bias belongs to its MLM head "
                          "(Config.logits_bias=True needs mlm_transform=True)")
    local_theta = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta
    window = cfg.sliding_window if cfg.sliding_window is not None else 65  # unused without local layers
    act = _hf_act(ACTIVATIONS[cfg.activation][0])
    return {
        "architectures": ["ModernBertForMaskedLM" if cfg.mlm_transform else "ModernBertModel"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.d_ff,
        "hidden_activation": act, "classifier_activation": act,
        "norm_eps": cfg.norm_eps, "norm_bias": cfg.norm_bias,
        "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias, "classifier_bias": cfg.mlp_bias,
        "decoder_bias": cfg.logits_bias, "max_position_embeddings": cfg.max_len,
        "layer_types": write_layer_types(cfg), "local_attention": 2 * (window - 1),
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "global_rope_theta": cfg.rope_theta, "local_rope_theta": local_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "mlp_dropout": cfg.dropout,
        **write_special_ids(cfg),
    }


def _hf_act(name: str) -> str:
    """A zoo elementwise activation as ModernBERT configs name it (tanh GELU: gelu_pytorch_tanh)."""
    return {"gelu_tanh": "gelu_pytorch_tanh"}.get(name, name)


# --- task heads: ModernBertPredictionHead (dense, act, norm) then classifier ------------------
_POOLS = {"cls": "first", "mean": "mean"}


def _read_head(d: dict, sequence: bool) -> dict:
    """The recipe fields a ModernBERT config chooses (classifier_pooling for sequence heads)."""
    out = dict(act=activation(d.get("classifier_activation", "gelu"), _NAME, "classifier_activation"),
               dense_bias=bool(d.get("classifier_bias", False)))
    if sequence:
        pooling = d.get("classifier_pooling", "cls")
        require(pooling in _POOLS, _NAME, "classifier_pooling",
                f"value {pooling!r} is not supported by zoo (supported: {list(_POOLS)})")
        out["pool"] = _POOLS[pooling]
    return out


def _write_head(head: Any) -> dict:
    out = {"classifier_activation": _hf_act(head.recipe.act), "classifier_bias": head.recipe.dense_bias}
    if head.kind == "sequence":
        out["classifier_pooling"] = {zoo: hf for hf, zoo in _POOLS.items()}.get(head.recipe.pool, head.recipe.pool)
    return out


_HEAD = {"dense": "head.dense", "norm": "head.norm", "out": "classifier"}
_HEADS = tuple(HeadFormat(f"ModernBertFor{cls}", kind, Recipe(pool="first", act="gelu", dense_bias=False, norm=True),
                          _HEAD, dropout=("classifier_dropout",),
                          read=lambda d, seq=kind == "sequence": _read_head(d, seq), write=_write_head,
                          qa_by_labels=kind == "qa")  # the classifier has a row per label
               for cls, kind in (("SequenceClassification", "sequence"), ("TokenClassification", "token"),
                                 ("QuestionAnswering", "qa")))

MODERNBERT = ModelType(_NAME, "encoder", _read, _write, _rules(), prefix="model.",
                       ignore=(r"rotary_emb\.",), heads=_HEADS)
