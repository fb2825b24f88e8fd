import json

import jax
import jax.numpy as jnp
import pytest

import zoo
from zoo.config import Config, ConfigError


def test_json_round_trip_and_hashable():
    for name in zoo.presets.names():
        cfg = zoo.preset(name)
        again = Config.from_json(cfg.to_json())
        assert again == cfg and hash(again) == hash(cfg)


def test_config_is_a_static_jit_argument():
    cfg = zoo.preset("tiny-decoder")

    f = jax.jit(lambda x, c: x * c.d_model, static_argnums=1)
    assert int(f(jnp.ones(()), cfg)) == cfg.d_model


def test_replace_validates():
    cfg = zoo.preset("tiny-decoder")
    assert cfg.replace(num_layers=3).num_layers == 3
    with pytest.raises(ConfigError, match="num_layers"):
        cfg.replace(num_layers=0)


@pytest.mark.parametrize("changes, field", [
    (dict(family="rnn"), "family"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(d_model=30, num_heads=4), "head_dim"),
    (dict(activation="tanh"), "activation"),
    (dict(norm="batchnorm"), "norm"),
    (dict(norm="rmsnorm", norm_bias=True), "norm_bias"),
    (dict(positions="rotary"), "positions"),
    (dict(positions="learned", rope_scaling="linear"), "rope_scaling"),
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(layer_pattern=("local", "global")), "layer_pattern"),
    (dict(rope_scaling="longrope", rope_short_factor=(1.0,)), "rope_short_factor"),
    (dict(num_experts=2, experts_per_token=3), "experts_per_token"),
    (dict(num_experts=4, router="topk"), "router"),
    (dict(num_experts=4, moe_dispatch="capacity"), "moe_dispatch"),
    (dict(num_experts=4, expert_parallel="ring"), "expert_parallel"),
    (dict(num_experts=4, router_groups=3), "router_groups"),
    (dict(num_experts=8, router_groups=4, router_topk_groups=5), "router_topk_groups"),
    (dict(num_experts=8, experts_per_token=4, router_groups=4), "router_topk_groups"),
    (dict(num_experts=4, router_score_bias=True), "router_score_bias"),
    (dict(num_experts=4, swiglu_limit=7.0), "swiglu_limit"),
    (dict(num_experts=4, dense_layers=(1,)), "dense_layers"),
    (dict(num_experts=4, moe_d_ff=0), "moe_d_ff"),
    (dict(shared_experts=1), "shared_experts"),
    (dict(routed_scaling=2.5), "routed_scaling"),
    (dict(dropout=1.0), "dropout"),
    (dict(dtype="int8"), "dtype"),
    (dict(eos_id=1000), "eos_id"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(shared_layers=2), "shared_layers"),  # 2 sets do not divide 1 layer
    (dict(embed_dim=16), "embed_dim"),  # a decoder's head reads d_model-wide states
    (dict(qk_rope_head_dim=4), "qk_rope_head_dim"),  # an MLA field without kv_lora_rank
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=3, attn_bias=False), "qk_rope_head_dim"),
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4), "attn_bias"),  # MLA has no biases
    (dict(attn_sinks=1), "attn_sinks"),
    (dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, attn_bias=False, attn_sinks=True), "attn_sinks"),
])
def test_invalid_fields_name_the_field(changes, field):
    base = dict(family="decoder", vocab_size=100, d_model=32, num_layers=1, num_heads=4, d_ff=64,
                positions="rope", norm="rmsnorm", norm_bias=False)
    with pytest.raises(ConfigError, match=rf"Config\.{field}"):
        Config(**{**base, **changes})


def test_family_specific_fields():
    with pytest.raises(ConfigError, match="sliding_window"):
        zoo.preset("tiny-encdec", sliding_window=8)
    assert zoo.preset("tiny-encoder", sliding_window=8).layer_kind(0) == "local"  # two-sided (ModernBERT)
    for family, changes in (("tiny-decoder", {}), ("tiny-encoder", {"norm_position": "post"})):
        with pytest.raises(ConfigError, match="first_attn_norm"):  # ModernBERT's pre-norm encoder only
            zoo.preset(family, first_attn_norm=False, **changes)
    with pytest.raises(ConfigError, match="num_decoder_layers"):
        zoo.preset("tiny-decoder", num_decoder_layers=2)


def test_from_dict_rejects_unknown_fields():
    d = json.loads(zoo.preset("tiny-decoder").to_json())
    d["n_layer"] = 3
    with pytest.raises(ConfigError, match="n_layer"):
        Config.from_dict(d)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown name 'gpt5'"):
        zoo.preset("gpt5")
