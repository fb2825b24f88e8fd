"""Gemma 2 (`gemma2`) and Gemma 3 text (`gemma3_text`) against transformers, offline.

One tiny random model per type (every tensor perturbed, so the (1 + w) norms are not at their
zero init), its sliding window 5 shorter than the 24-token batch and than the 7 + 12 tokens
generated, query_pre_attn_scalar != head_dim. Gemma 2: three alternating layers (a pattern
remainder), soft-caps small enough to bend scores and logits. Gemma 3: QK-norm, a linearly
scaled global RoPE and a local base of its own, the pattern local, local, global over four
layers. The helpers are test_hf's and test_generate's.
"""

import shutil

import pytest

import test_generate
import zoo
from test_hf import TOL, _edit_config, _perturbed, check_parity_and_round_trip, torch, transformers
from zoo.hf import MODEL_TYPES

WINDOW = 5
SHAPE = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=96, max_position_embeddings=64, sliding_window=WINDOW, query_pre_attn_scalar=20)
CASES = {
    "gemma2": ("Gemma2Config", dict(SHAPE, num_hidden_layers=3, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0), "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", dict(
        SHAPE, num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
        "Gemma3ForCausalLM"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (transformers model, its save_pretrained dir, zoo cfg, zoo params), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            config_cls, kwargs, model_cls = CASES[name]
            torch.manual_seed(0)
            model = _perturbed(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval())
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path, *zoo.load_hf(path))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_and_round_trip(built, name, tmp_path):
    model, _, cfg, _ = built(name)
    assert cfg.sliding_window == WINDOW and "global" in cfg.layer_pattern
    assert check_parity_and_round_trip(model, tmp_path) <= TOL  # on 24 > WINDOW tokens


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_matches_transformers(built, name, num_beams):
    """As test_generate.test_matches_transformers_generate: greedy and 4-beam token for token
    through the cache, a left-padded row, an EOS the model emits; 7 + 12 tokens > the window."""
    assert 7 + test_generate.HF_NEW > WINDOW
    test_generate.test_matches_transformers_generate(lambda n: (built(n)[0], *built(n)[2:]), name, num_beams)


# The fields of the published config.json files (written by transformers 4.42 and 4.50, before
# layer_types and rope_parameters): they read as zoo's presets.
PUBLISHED = {
    "gemma-2-2b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_theta=10000.0, sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, attention_bias=False, attention_dropout=0.0, pad_token_id=0,
        eos_token_id=1, bos_token_id=2, cache_implementation="hybrid", torch_dtype="float32"),
    "gemma-3-1b": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000, rope_local_base_freq=10000, rope_scaling=None, sliding_window=512,
        sliding_window_pattern=6, query_pre_attn_scalar=256, attn_logit_softcapping=None,
        final_logit_softcapping=None, attention_bias=False, attention_dropout=0.0, pad_token_id=0,
        eos_token_id=1, bos_token_id=2, cache_implementation="hybrid", torch_dtype="bfloat16"),
}


class _TiedCheckpoint:
    """The keys of a checkpoint whose head is the embedding (as the published ones store it)."""

    def has(self, key: str) -> bool:
        return key != "lm_head.weight"


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_configs_read_as_the_presets(preset):
    d = PUBLISHED[preset]
    assert MODEL_TYPES[d["model_type"]].read_config(d, _TiedCheckpoint()) == zoo.preset(preset)


@pytest.mark.parametrize("name, changes, message", [
    ("gemma2", dict(use_bidirectional_attention=True), r"gemma2 config field 'use_bidirectional_attention'"),
    ("gemma2", dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     r"gemma2 config field 'layer_types': \['chunked_attention'\] not supported"),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"'rope_parameters.sliding_attention.rope_type': value 'linear'"),
    ("gemma3_text", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
     r"gemma3_text config field 'rope_parameters': expected entries per layer type"),
    ("gemma3_text", dict(layer_types=["full_attention"] * 3), r"'layer_types': expected a list of num_hidden"),
])
def test_unsupported_config_field(built, tmp_path, name, changes, message):
    shutil.copytree(built(name)[1], tmp_path, dirs_exist_ok=True)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        zoo.load_hf(tmp_path)
