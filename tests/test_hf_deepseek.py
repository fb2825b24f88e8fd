"""DeepSeek-V2 (`deepseek_v2`) and DeepSeek-V3 (`deepseek_v3`) against transformers, offline.

One tiny random model per type (test_hf's builder and checks, every tensor and V3's
selection bias perturbed), each with multi-head latent attention and a dense first layer
before routed + shared experts: V2 without a query bottleneck, group-limited softmax routing
(best expert per group) and unnormalised top-k; V3 with the query bottleneck, YaRN with
DeepSeek's mscale / mscale_all_dim, sigmoid scores with the selection bias, groups scored by
their best two experts, renormalised top-k and routed_scaling_factor. Logit parity on a
padded batch, save_hf round trip, greedy and 4-beam generation through the latent cache.
"""

import pytest
import torch

import test_generate
import test_hf
import zoo
from zoo.hf import MODEL_TYPES

MLA = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
           intermediate_size=48, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
           max_position_embeddings=128, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
           moe_intermediate_size=16, num_experts_per_tok=2, n_group=4, topk_group=2,
           pad_token_id=0, bos_token_id=2, eos_token_id=1)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
            mscale=1.0, mscale_all_dim=0.707, beta_fast=32, beta_slow=1)
CASES = {
    "deepseek_v2": ("DeepseekV2Config", dict(MLA, q_lora_rank=None, topk_method="group_limited_greedy",
                                             routed_scaling_factor=1.5, n_shared_experts=2),
                    "DeepseekV2ForCausalLM", False),
    "deepseek_v3": ("DeepseekV3Config", dict(MLA, q_lora_rank=12, routed_scaling_factor=2.5, norm_topk_prob=True,
                                             rope_parameters=YARN), "DeepseekV3ForCausalLM", False),
}


def _model(name):
    model = test_hf._hf_model(name, cases=CASES)
    with torch.no_grad():  # a selection bias large enough to change which experts are chosen
        for layer in model.model.layers[1:]:
            if hasattr(layer.mlp.gate, "e_score_correction_bias"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_and_round_trip(name, tmp_path):
    diff = test_hf.check_parity_and_round_trip(_model(name), tmp_path)
    cfg = zoo.load_hf(tmp_path / "hf")[0]
    assert cfg.mla and cfg.dense_layers == (0,) and cfg.rope_interleave
    assert cfg.router == ("sigmoid" if name == "deepseek_v3" else "softmax")
    print(f"{name}: max |logit diff| {diff:.2e}")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (transformers model, zoo cfg, zoo params), as test_generate's fixture."""
    built = {}

    def get(name):
        if name not in built:
            model = _model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            built[name] = (model, *zoo.load_hf(path))
        return built[name]

    return get


@pytest.mark.parametrize("name,num_beams", [("deepseek_v3", 4), pytest.param("deepseek_v3", 1, marks=pytest.mark.slow),
                                            pytest.param("deepseek_v2", 1, marks=pytest.mark.slow),
                                            pytest.param("deepseek_v2", 4, marks=pytest.mark.slow)])
def test_generate_matches_transformers(hf_models, name, num_beams):
    """Greedy and 4-beam token for token through the latent cache (a left-padded row, an
    EOS the model emits), past V3's original YaRN context of 16."""
    test_generate.test_matches_transformers_generate(hf_models, name, num_beams)


def test_v3_without_interleave_and_refusals(tmp_path):
    """rope_interleave=False rotates halves (Llama's layout); V2 cannot hold that; a bias on
    the attention projections or a latent eps other than transformers' is refused."""
    model = test_hf._hf_model("deepseek_v3", cases={"deepseek_v3": (
        "DeepseekV3Config", dict(CASES["deepseek_v3"][1], rope_interleave=False), "DeepseekV3ForCausalLM", False)})
    test_hf.check_parity_and_round_trip(model, tmp_path)
    cfg, params = zoo.load_hf(tmp_path / "hf")
    assert not cfg.rope_interleave
    with pytest.raises(ValueError, match="rope_interleave"):
        zoo.save_hf(cfg, params, tmp_path / "v2", model_type="deepseek_v2")
    for field, bad, good in (("attention_bias", True, False), ("rms_norm_eps", 1e-5, 1e-6)):
        test_hf._edit_config(tmp_path / "hf", **{field: bad})
        with pytest.raises(ValueError, match=field):
            zoo.load_hf(tmp_path / "hf")
        test_hf._edit_config(tmp_path / "hf", **{field: good})


# The fields of the published config.json files (DeepSeek-V3, DeepSeek-V2-Lite), as written.
PUBLISHED = {
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, ep_size=1, routed_scaling_factor=2.5,
        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1,
        first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu",
        max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000,
        rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                          original_max_position_embeddings=4096, type="yarn"),
        attention_bias=False, attention_dropout=0.0, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16"),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, ep_size=1, routed_scaling_factor=1.0, kv_lora_rank=512,
        q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy",
        n_group=1, topk_group=1, num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1,
        norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
        max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000,
        rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=0.707, mscale_all_dim=0.707,
                          original_max_position_embeddings=4096, type="yarn"),
        attention_bias=False, attention_dropout=0.0, bos_token_id=100000, eos_token_id=100001,
        torch_dtype="bfloat16"),
}


class _Untied:
    def has(self, key: str) -> bool:
        return True


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_configs_read_as_the_presets(preset):
    """The config.json files name no pad token (load_hf then uses 0); the presets none."""
    d = PUBLISHED[preset]
    cfg = MODEL_TYPES[d["model_type"]].read_config(d, _Untied())
    assert cfg == zoo.preset(preset).replace(pad_id=cfg.pad_id)
