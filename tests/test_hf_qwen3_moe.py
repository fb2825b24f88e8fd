"""Qwen3-MoE (`qwen3_moe`) against transformers, offline: one tiny random model whose middle
layer is dense (`mlp_only_layers`, so the stack runs as three segments), top-2 of 8 experts
without renormalisation (`norm_topk_prob` False, transformers' default), every tensor
perturbed; parity on a padded batch, save_hf's round trip, greedy and beam generation
(test_hf's and test_generate's checks); the qwen3-30b-a3b preset against its published
config.json and parameter counts."""

import jax
import numpy as np
import pytest

import test_generate
import test_hf
import zoo
from zoo.hf import MODEL_TYPES

CASES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, intermediate_size=48,
                                         moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                         mlp_only_layers=[1], tie_word_embeddings=False),
                  "Qwen3MoeForCausalLM", False),
}


def test_parity_and_round_trip(tmp_path):
    model = test_hf._hf_model("qwen3_moe", cases=CASES)
    diff = test_hf.check_parity_and_round_trip(model, tmp_path)
    cfg = zoo.load_hf(tmp_path / "hf")[0]
    assert (cfg.dense_layers, cfg.moe_d_ff, cfg.router_norm_topk, cfg.moe_dispatch) == ((1,), 24, False, "sparse")
    # The checkpoint's own layout: one tensor per expert and projection (transformers fuses on load).
    with zoo.hf.files.open_weights(tmp_path / "zoo") as weights:
        keys = weights.keys()
    assert "model.layers.2.mlp.experts.7.gate_proj.weight" in keys and "model.layers.1.mlp.up_proj.weight" in keys
    print(f"qwen3_moe: max |logit diff| {diff:.2e}")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            model = test_hf._hf_model(name, cases=CASES)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            built[name] = (model, *zoo.load_hf(path))
        return built[name]

    return get


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generate_matches_transformers(hf_models, num_beams):
    test_generate.test_matches_transformers_generate(hf_models, "qwen3_moe", num_beams)


def test_sparse_step_and_refusals(tmp_path):
    """decoder_sparse_step=2 makes every other layer dense, as transformers builds it; a
    config whose layers are all dense is refused, naming the field."""
    test_hf._hf_model("qwen3_moe", cases=CASES).save_pretrained(tmp_path)
    test_hf._edit_config(tmp_path, decoder_sparse_step=2, mlp_only_layers=[])
    with pytest.raises(ValueError, match=r"weight 'model.layers.0.mlp.gate_proj.weight'|model.layers.0.mlp"):
        zoo.load_hf(tmp_path)  # layer 0 is dense now, but the checkpoint holds experts there
    d = dict(model_type="qwen3_moe", vocab_size=128, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
             moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2)
    cfg = MODEL_TYPES["qwen3_moe"].read_config(d, _Checkpoint(False))
    assert cfg.dense_layers == (0,)
    with pytest.raises(ValueError, match="qwen3_moe config field 'mlp_only_layers'"):
        MODEL_TYPES["qwen3_moe"].read_config(dict(d, mlp_only_layers=[0, 1]), _Checkpoint(False))


# --- preset --------------------------------------------------------------------------------
# Qwen/Qwen3-30B-A3B config.json (huggingface.co/Qwen/Qwen3-30B-A3B, as published).
PUBLISHED = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope_scaling=None, rope_theta=1000000.0, sliding_window=None, use_sliding_window=False,
    max_window_layers=48, attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False,
    router_aux_loss_coef=0.001, output_router_logits=False, bos_token_id=151643,
    eos_token_id=151645, torch_dtype="bfloat16")


class _Checkpoint:
    def __init__(self, tied: bool):
        self.tied = tied

    def has(self, key: str) -> bool:
        return not (self.tied and key == "lm_head.weight")


def test_published_config_reads_as_the_preset_with_its_counts():
    """The model card's "30.5B in total and 3.3B activated", from the config.json values:
    embeddings and head 2 x 151936 x 2048; per layer attention 2 x 2048 x (32 + 4) x 128,
    q/k norms 2 x 128, two norms 2 x 2048, router 2048 x 128 and 128 experts (8 routed) of
    3 x 2048 x 768; the final norm 2048."""
    cfg = MODEL_TYPES["qwen3_moe"].read_config(PUBLISHED, _Checkpoint(False))
    assert cfg == zoo.preset("qwen3-30b-a3b").replace(pad_id=0)
    embed, expert = 2 * 151936 * 2048, 3 * 2048 * 768
    layer = 2 * 2048 * (32 + 4) * 128 + 2 * 128 + 2 * 2048 + 2048 * 128
    assert zoo.param_count(cfg) == embed + 48 * (layer + 128 * expert) + 2048 == 30_532_122_624
    assert zoo.param_count(cfg, active=True) == embed + 48 * (layer + 8 * expert) + 2048 == 3_353_032_704


def test_shrunk_preset_exports_and_comes_back(tmp_path):
    cfg = zoo.preset("qwen3-30b-a3b", vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, d_ff=64, moe_d_ff=16, num_experts=4, experts_per_token=2,
                     dense_layers=(0,), pad_id=0, bos_id=2, eos_id=1)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          jax.eval_shape(lambda k: zoo.init(cfg, k), jax.random.key(0)))
    assert zoo.save_hf(cfg, params, tmp_path) == "qwen3_moe"
    cfg2, params2 = zoo.load_hf(tmp_path)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
