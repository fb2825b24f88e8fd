"""DeepSeek-V2 (`deepseek_v2`) and DeepSeek-V3 (`deepseek_v3`): multi-head latent attention
(zoo.nn.mla) and mixtures of routed plus shared experts after `first_k_dense_replace` dense
layers (zoo.nn.moe).

Both rotate the rope dims of queries and the shared key in adjacent pairs: V2 always (its
complex-number rotary), V3 with `rope_interleave` (default True); zoo reads that layout
through `Config.rope_interleave` and keeps the weights as stored. Routers: V2 a softmax
whose top k are not renormalised (transformers 5 ignores `norm_topk_prob` there), limited to
the best `topk_group` of `n_group` groups by their best expert with
`topk_method="group_limited_greedy"`; V3 sigmoid scores, selection shifted by
`e_score_correction_bias`, groups scored by their best two experts, renormalised by
`norm_topk_prob`. Both scale the routed sum by `routed_scaling_factor`. Experts are stored
one tensor per expert (`mlp.experts.{e}.gate_proj`...), as the published checkpoints and
transformers' save_pretrained write them.

A model with dense first layers keeps them in their own stacked tree (`decoder/layers/0`)
and the MoE layers in another (`decoder/layers/{k}`, zoo.nn.transformer.segments); the key
map is written for one stacked tree and zoo.hf.keymap copies it per segment.
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, Unsupported, activation, dropout_of, expect, head_is_tied,
                           hf_activation, positive, read_rope, require, special_ids, write_rope,
                           write_special_ids)
from zoo.hf.keymap import Rule, rule

_L = "model.layers.{i}."
_MAX_DENSE = 64  # first_k_dense_replace values the key map covers (published: 1 and 3)
# The latent norms (q_a_layernorm, kv_a_layernorm) run at transformers' default eps, the
# layer norms at rms_norm_eps; zoo has one eps, so the two must agree.
_LATENT_EPS = 1e-6

_ATTENTION = {"q_proj": ("q", "linear"), "q_a_proj": ("q_a", "linear"),
              "q_a_layernorm": ("q_a_norm/scale", "copy"), "q_b_proj": ("q_b", "linear"),
              "kv_a_proj_with_mqa": ("kv_a", "linear"), "kv_a_layernorm": ("kv_a_norm/scale", "copy"),
              "kv_b_proj": ("kv_b", "linear"), "o_proj": ("o", "linear_out")}
_MLP = {"gate_proj": ("wg", "linear"), "up_proj": ("wi", "linear"), "down_proj": ("wo", "linear_out")}


def _layer_rules(layers: str, offset: int) -> list[Rule]:
    """The rules of one stacked tree of layers at zoo path `layers` whose row 0 is Hugging
    Face layer `offset`: norms, MLA, and either a dense MLP or the routed + shared experts."""
    r = lambda hf, zoo, kind="copy": rule(_L + hf, layers + zoo, kind, layer_offset=offset)
    out = [r("input_layernorm.weight", "attn_norm/scale"), r("post_attention_layernorm.weight", "mlp_norm/scale")]
    out += [r(f"self_attn.{hf}.weight", f"attn/{zoo}", kind) for hf, (zoo, kind) in _ATTENTION.items()]
    out += [r(f"mlp.{hf}.weight", f"mlp/{zoo}", kind) for hf, (zoo, kind) in _MLP.items()]
    out += [r("mlp.gate.weight", "moe/router", "linear"), r("mlp.gate.e_score_correction_bias", "moe/score_bias")]
    out += [r(f"mlp.experts.{{e}}.{hf}.weight", f"moe/{zoo}", kind) for hf, (zoo, kind) in _MLP.items()]
    out += [r(f"mlp.shared_experts.{hf}.weight", f"moe/shared/{zoo}", kind) for hf, (zoo, kind) in _MLP.items()]
    return out


def _rules() -> list[Rule]:
    """Embeddings, final norm and head; the layers (dense or MoE, only the rules whose zoo
    leaves a config has apply)."""
    out = [rule("model.embed_tokens.weight", "embed/tokens"), rule("model.norm.weight", "decoder/final_norm/scale"),
           rule("lm_head.weight", "head/kernel", "linear")]
    return out + _layer_rules("decoder/layers/", 0)


# --- config ---------------------------------------------------------------------------------
def _mla(d: dict, name: str) -> dict[str, Any]:
    heads = positive(d, name, "num_attention_heads")
    kv_heads = d.get("num_key_value_heads") or heads
    require(kv_heads == heads, name, "num_key_value_heads",
            f"MLA expands the latent into every head; expected {heads}, got {kv_heads}")
    nope, rope = positive(d, name, "qk_nope_head_dim"), positive(d, name, "qk_rope_head_dim")
    q_rank = d.get("q_lora_rank")
    require(q_rank is None or (isinstance(q_rank, int) and q_rank > 0), name, "q_lora_rank",
            f"expected None or a positive int, got {q_rank!r}")
    interleave = True if name == "deepseek_v2" else bool(d.get("rope_interleave", True))
    return dict(q_lora_rank=q_rank, kv_lora_rank=positive(d, name, "kv_lora_rank"), qk_nope_head_dim=nope,
                qk_rope_head_dim=rope, v_head_dim=positive(d, name, "v_head_dim"), head_dim=nope + rope,
                rope_interleave=interleave)


def _router(d: dict, name: str) -> dict[str, Any]:
    """The router fields as transformers' DeepseekV2/V3TopkRouter computes them."""
    if name == "deepseek_v3":
        groups = dict(router_groups=positive(d, name, "n_group"), router_topk_groups=positive(d, name, "topk_group"))
        return dict(router="sigmoid", router_score_bias=True, router_norm_topk=bool(d.get("norm_topk_prob")), **groups)
    method = d.get("topk_method", "greedy")
    expect(d, name, "topk_method", ("greedy", "group_limited_greedy"), "greedy")
    groups = {}
    if method == "group_limited_greedy":
        groups = dict(router_groups=positive(d, name, "n_group"), router_topk_groups=positive(d, name, "topk_group"))
    return dict(router="softmax", router_norm_topk=False, **groups)


def _moe(d: dict, name: str, num_layers: int) -> dict[str, Any]:
    dense = d.get("first_k_dense_replace") or 0
    require(isinstance(dense, int) and 0 <= dense <= min(num_layers, _MAX_DENSE), name, "first_k_dense_replace",
            f"expected an int in [0, {min(num_layers, _MAX_DENSE)}], got {dense!r}")
    return dict(num_experts=positive(d, name, "n_routed_experts"), experts_per_token=positive(d, name, "num_experts_per_tok"),
                moe_d_ff=positive(d, name, "moe_intermediate_size"), shared_experts=d.get("n_shared_experts") or 0,
                dense_layers=tuple(range(dense)), routed_scaling=float(d.get("routed_scaling_factor", 1.0)),
                **_router(d, name))


def _read(d: dict, weights: Any, name: str) -> Config:
    expect(d, name, "pretraining_tp", (1, None), 1)
    expect(d, name, "attention_bias", (False,), False)
    expect(d, name, "mlp_bias", (False,), False)
    eps = float(d.get("rms_norm_eps", 1e-6))
    require(eps == _LATENT_EPS, name, "rms_norm_eps",
            f"zoo runs the latent norms at rms_norm_eps and transformers at {_LATENT_EPS}; got {eps}")
    rope = read_rope(d, name)
    require(rope.pop("rope_fraction") == 1.0, name, "partial_rotary_factor",
            "DeepSeek rotates all qk_rope_head_dim dims")
    vocab, layers = positive(d, name, "vocab_size"), positive(d, name, "num_hidden_layers")
    return Config(
        family="decoder", vocab_size=vocab, d_model=positive(d, name, "hidden_size"), num_layers=layers,
        num_heads=positive(d, name, "num_attention_heads"), d_ff=positive(d, name, "intermediate_size"),
        activation=activation(d.get("hidden_act", "silu"), name, "hidden_act", gated=True),
        norm="rmsnorm", norm_bias=False, norm_eps=eps, positions="rope",
        max_len=positive(d, name, "max_position_embeddings"), **rope,
        tie_embeddings=head_is_tied(d, weights, name, "lm_head.weight", "model.embed_tokens.weight", False),
        attn_bias=False, mlp_bias=False, dropout=dropout_of(d, "attention_dropout"),
        **_mla(d, name), **_moe(d, name, layers), **special_ids(d, vocab))


def _write(cfg: Config, name: str) -> dict:
    if not cfg.mla or not cfg.moe:
        raise Unsupported(f"save_hf: {name} has multi-head latent attention (Config.kv_lora_rank) and "
                          f"experts (Config.num_experts), got kv_lora_rank={cfg.kv_lora_rank}, "
                          f"num_experts={cfg.num_experts}")
    out = {
        "architectures": ["DeepseekV3ForCausalLM" if name == "deepseek_v3" else "DeepseekV2ForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": hf_activation(cfg), "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_len, **write_rope(cfg), "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_size,
        "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
        "moe_intermediate_size": cfg.moe_d_ff or cfg.d_ff, "n_shared_experts": cfg.shared_experts,
        # read back as range(k): a dense_layers that is not a prefix fails save_hf's check
        "first_k_dense_replace": len(cfg.dense_layers), "routed_scaling_factor": cfg.routed_scaling,
        "n_group": cfg.router_groups, "topk_group": cfg.router_topk_groups,
        "norm_topk_prob": cfg.router_norm_topk, **write_special_ids(cfg),
    }
    if name == "deepseek_v3":
        out["rope_interleave"] = cfg.rope_interleave
    else:
        out["topk_method"] = "group_limited_greedy" if cfg.router_groups > 1 else "greedy"
    return out


def _model_type(name: str) -> ModelType:
    # V3 checkpoints carry the multi-token-prediction layer after the last (index 61 in the
    # published one), which transformers skips as well.
    ignore = (r"rotary_emb\.",) + ((r"model\.layers\.61\.",) if name == "deepseek_v3" else ())
    return ModelType(name, "decoder", lambda d, w: _read(d, w, name), lambda cfg: _write(cfg, name),
                     _rules(), prefix="model.", ignore=ignore)


DEEPSEEK_V2 = _model_type("deepseek_v2")
DEEPSEEK_V3 = _model_type("deepseek_v3")
