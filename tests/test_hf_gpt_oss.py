"""gpt-oss (`gpt_oss`) against transformers, offline.

One tiny random model (every tensor perturbed, sinks and router bias included): a sliding
layer (window 5, shorter than the 24-token batch and the 7 + 12 tokens generated) and a
full one, GQA 4:2 with head_dim 16 != 64 / 4, biases on q/k/v/o, 4 fused experts top-2 with
biases and a SwiGLU clamp of 0.5 that the activations exceed, GptOssConfig's default YaRN
(x32 from 4096, not truncated). The helpers are test_hf's and test_generate's.
"""

import shutil

import jax
import numpy as np
import pytest

import test_generate
from conftest import tokens
import zoo
from test_hf import TOL, _edit_config, _perturbed, check_parity_and_round_trip, torch, transformers
from zoo.hf import MODEL_TYPES
from zoo.nn.positions import rope_inv_freq

WINDOW = 5
KWARGS = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
              sliding_window=WINDOW, max_position_embeddings=64, swiglu_limit=0.5, pad_token_id=0,
              eos_token_id=1, bos_token_id=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(transformers model, its save_pretrained dir, zoo cfg, zoo params), built once."""
    torch.manual_seed(0)
    model = _perturbed(transformers.GptOssForCausalLM(transformers.GptOssConfig(**KWARGS)).eval())
    path = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(path)
    return (model, path, *zoo.load_hf(path))


def test_parity_and_round_trip(built, tmp_path):
    model, _, cfg, params = built
    assert cfg.attn_sinks and cfg.router_bias and cfg.attn_bias and cfg.mlp_bias and cfg.swiglu_limit == 0.5
    assert cfg.layer_pattern == ("local", "global") and cfg.sliding_window == WINDOW
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_len, cfg.rope_truncate) == (
        "yarn", 32.0, 4096, False)
    # The settings the parity below must see: an untruncated YaRN ramp and a clamp that bites.
    assert not np.array_equal(rope_inv_freq(cfg), rope_inv_freq(cfg.replace(rope_truncate=True)))
    toks = tokens(jax.random.key(0), 2, 16)
    unclamped = zoo.forward(params, cfg.replace(swiglu_limit=None), toks).logits
    assert np.abs(zoo.forward(params, cfg, toks).logits - unclamped).max() > 1e-2
    assert check_parity_and_round_trip(model, tmp_path) <= TOL  # on 24 > WINDOW tokens


# Greedy runs with -m slow (CI time): the 4-beam check runs greedy decoding too (to pick its EOS).
@pytest.mark.parametrize("num_beams", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_generate_matches_transformers(built, num_beams):
    """As test_generate.test_matches_transformers_generate: greedy and 4-beam token for token
    through the cache (sinks over the ring of the sliding layer and the full cache of the
    other), a left-padded row, an EOS the model emits; 7 + 12 tokens > the window."""
    assert 7 + test_generate.HF_NEW > WINDOW
    test_generate.test_matches_transformers_generate(lambda _: (built[0], *built[2:]), "gpt_oss", num_beams)


# The fields of openai/gpt-oss-20b's config.json (transformers 4.55).
PUBLISHED = dict(
    model_type="gpt_oss", architectures=["GptOssForCausalLM"], attention_bias=True, attention_dropout=0.0,
    eos_token_id=200002, experts_per_token=4, head_dim=64, hidden_act="silu", hidden_size=2880,
    initial_context_length=4096, initializer_range=0.02, intermediate_size=2880,
    layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
    num_attention_heads=64, num_experts_per_tok=4, num_hidden_layers=24, num_key_value_heads=8,
    num_local_experts=32, output_router_logits=False, pad_token_id=199999,
    quantization_config={"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                    "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    rms_norm_eps=1e-05, rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                      "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                      "truncate": False},
    rope_theta=150000, router_aux_loss_coef=0.9, sliding_window=128, swiglu_limit=7.0,
    tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True, vocab_size=201088)


class _Checkpoint:
    def has(self, key: str) -> bool:
        return True  # an untied head is stored


def test_published_config_reads_as_the_preset_once_dequantized():
    """The published experts are MXFP4 (refused, naming quantization_config); the same
    config without it (a dequantized save) is the preset."""
    read = MODEL_TYPES["gpt_oss"].read_config
    with pytest.raises(ValueError, match=r"gpt_oss config field 'quantization_config'.*mxfp4.*dequantize"):
        read(PUBLISHED, _Checkpoint())
    dequantized = {k: v for k, v in PUBLISHED.items() if k != "quantization_config"}
    assert read(dequantized, _Checkpoint()) == zoo.preset("gpt-oss-20b")


def test_preset_counts_the_published_parameters():
    """gpt-oss-20b: 20.9B parameters, 4 of 32 experts per token. zoo's active count holds the
    embedding table whole (as Mixtral's 12.9B does); OpenAI's 3.6B leaves the embedding
    lookup out and keeps the unembedding."""
    cfg = zoo.preset("gpt-oss-20b")
    assert zoo.param_count(cfg) == 20_914_757_184
    active = zoo.param_count(cfg, active=True)
    assert active == 4_187_440_704
    assert active - cfg.vocab_size * cfg.d_model == 3_608_307_264


@pytest.mark.parametrize("changes, message", [
    (dict(quantization_config={"quant_method": "mxfp4"}), r"'quantization_config': quantized experts"),
    (dict(swiglu_alpha=1.0), r"gpt_oss config field 'swiglu_alpha': zoo's clamped SwiGLU has the gain 1.702"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), r"'layer_types': \['chunked_attention'\]"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, partial_rotary_factor=0.5,
                               original_max_position_embeddings=16)), r"'partial_rotary_factor'"),
])
def test_unsupported_config_field(built, tmp_path, changes, message):
    shutil.copytree(built[1], tmp_path, dirs_exist_ok=True)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        zoo.load_hf(tmp_path)
