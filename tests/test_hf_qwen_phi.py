"""Qwen2 (`qwen2`), Qwen3 (`qwen3`) and Phi-3 (`phi3`) against transformers, offline.

One tiny random model per type, every tensor perturbed (test_hf's builder and checks):
Qwen2 with q/k/v biases and no output bias, its first layer global and the second sliding
(window 6 < the 24-token batch and the 7 + 12 tokens generated); Qwen3 with QK-norm, a
head_dim other than d_model / heads and a tied head; Phi-3 with fused qkv (GQA) and gate/up
projections and every layer sliding; a Phi-3 128k-style longrope model rotating half of
each head, below and above its original context. Generation reuses test_generate's check.
"""

import jax
import numpy as np
import pytest

import test_generate
import test_hf
import zoo
from zoo.hf import MODEL_TYPES

WINDOW = 6
# head_dim 16, half of it rotated: 4 frequencies, each with its own short and long stretch.
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
                short_factor=[1.0, 1.1, 1.3, 1.6], long_factor=[1.0, 2.0, 4.0, 9.0])
# name -> (config class, config kwargs, model class, untie the head by hand), as test_hf.CASES.
CASES = {
    "qwen2": ("Qwen2Config", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, use_sliding_window=True,
                                  sliding_window=WINDOW, max_window_layers=1), "Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3Config", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                  tie_word_embeddings=True), "Qwen3ForCausalLM", False),
    "phi3": ("Phi3Config", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=48, sliding_window=WINDOW,
                                pad_token_id=0, bos_token_id=2, eos_token_id=1), "Phi3ForCausalLM", False),
    "phi3-longrope": ("Phi3Config", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64,
                                         original_max_position_embeddings=16, rope_parameters=LONGROPE,
                                         pad_token_id=0, bos_token_id=2, eos_token_id=1),
                      "Phi3ForCausalLM", False),
}


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3"])
def test_parity_and_round_trip(name, tmp_path):
    # phi3 is named: the first type that reproduces a Phi-3 config is mistral (the same model).
    diff = test_hf.check_parity_and_round_trip(test_hf._hf_model(name, cases=CASES), tmp_path,
                                               model_type="phi3" if name == "phi3" else None)
    print(f"{name}: max |logit diff| {diff:.2e}")


def test_phi3_longrope_below_and_above_the_original_context(tmp_path):
    """transformers stretches by short_factor while a forward's positions stay within
    original_max_position_embeddings (16) and by long_factor beyond it (the 24-token batch)."""
    model = test_hf._hf_model("phi3-longrope", cases=CASES)
    for lengths in ((14, 9, 16), test_hf.BATCH_LENGTHS):
        diff = test_hf.check_parity_and_round_trip(model, tmp_path / str(max(lengths)), lengths)
        print(f"phi3 longrope, {max(lengths)} positions: max |logit diff| {diff:.2e}")
    cfg = zoo.load_hf(tmp_path / "24" / "hf")[0]
    assert (cfg.rope_scaling, cfg.rope_fraction, cfg.rope_original_max_len) == ("longrope", 0.5, 16)


def test_qwen2_config_without_layer_types_slides_from_max_window_layers(tmp_path):
    """Configs written before transformers had `layer_types`: with use_sliding_window, the
    layers from max_window_layers on slide (as Qwen2Config fills layer_types in)."""
    test_hf._hf_model("qwen2", cases=CASES).save_pretrained(tmp_path)
    cfg = zoo.load_hf(tmp_path)[0]
    test_hf._edit_config(tmp_path, layer_types=None)
    assert zoo.load_hf(tmp_path)[0] == cfg and cfg.layer_pattern == ("global", "local")
    test_hf._edit_config(tmp_path, max_window_layers=0)
    assert zoo.load_hf(tmp_path)[0] == cfg.replace(layer_pattern=())  # every layer slides
    test_hf._edit_config(tmp_path, use_sliding_window=False)
    assert zoo.load_hf(tmp_path)[0] == cfg.replace(layer_pattern=(), sliding_window=None)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (transformers model, zoo cfg, zoo params), as test_generate's fixture."""
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
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "phi3"])
def test_generate_matches_transformers(hf_models, name, num_beams):
    """Greedy and 4-beam token for token through the cache (a left-padded row, an EOS the
    model emits), the 7 + 12 tokens longer than the window of the sliding layers."""
    cfg = hf_models(name)[1]
    assert cfg.layer_pattern == (("global", "local") if name == "qwen2" else ())
    assert (cfg.sliding_window is not None) == (name != "qwen3")
    assert 7 + test_generate.HF_NEW > WINDOW
    test_generate.test_matches_transformers_generate(hf_models, name, num_beams)


# --- presets -------------------------------------------------------------------------------
# The fields of the published config.json files (written by transformers 4.40 - 4.51).
PUBLISHED = {
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072,
        use_sliding_window=False, max_window_layers=28, use_mrope=False, tie_word_embeddings=False,
        attention_dropout=0.0, bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16"),
    "qwen3-0.6b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6, rope_scaling=None,
        rope_theta=1000000, sliding_window=None, use_sliding_window=False, max_window_layers=28,
        attention_bias=False, attention_dropout=0.0, tie_word_embeddings=True, bos_token_id=151643,
        eos_token_id=151645, torch_dtype="bfloat16"),
    "qwen3-8b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6, rope_scaling=None,
        rope_theta=1000000, sliding_window=None, use_sliding_window=False, max_window_layers=36,
        attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151645, torch_dtype="bfloat16"),
    "phi-3-mini": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
        max_position_embeddings=4096, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_scaling=None, rope_theta=10000.0, sliding_window=2047, attention_bias=False,
        attention_dropout=0.0, embd_pdrop=0.0, resid_pdrop=0.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000, torch_dtype="bfloat16"),
}


class _Checkpoint:
    """The keys of a published checkpoint: a tied head is not stored."""

    def __init__(self, tied: bool):
        self.tied = tied

    def has(self, key: str) -> bool:
        return not (self.tied and key == "lm_head.weight")


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_configs_read_as_the_presets(preset):
    """Qwen's config.json names no pad token (load_hf then uses 0); the presets carry the
    tokenizer's, <|endoftext|>."""
    d = PUBLISHED[preset]
    cfg = MODEL_TYPES[d["model_type"]].read_config(d, _Checkpoint(d["tie_word_embeddings"]))
    want = zoo.preset(preset)
    assert cfg == (want.replace(pad_id=0) if d["model_type"] != "phi3" else want)


@pytest.mark.parametrize("preset, model_type", [("qwen2.5-7b", "qwen2"), ("qwen3-0.6b", "qwen3"),
                                                ("qwen3-8b", "qwen3"), ("phi-3-mini", "phi3")])
def test_shrunk_presets_export_and_come_back(tmp_path, preset, model_type):
    """save_hf picks the preset's type (phi-3-mini named: mistral holds it too) and load_hf
    returns the same Config and weights."""
    cfg = zoo.preset(preset, vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, d_ff=64, pad_id=0, bos_id=2, eos_id=1)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          jax.eval_shape(lambda k: zoo.init(cfg, k), jax.random.key(0)))
    named = "phi3" if model_type == "phi3" else None
    assert zoo.save_hf(cfg, params, tmp_path, model_type=named) == model_type
    cfg2, params2 = zoo.load_hf(tmp_path)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fields, model_type", [
    (dict(attn_bias=True, attn_out_bias=True), "llama"),  # attn_out_bias spelled out
    (dict(sliding_window=4, layer_pattern=("global",)), "llama"),  # a window no layer uses
    (dict(sliding_window=4, layer_pattern=("local", "local")), "mistral"),  # every layer local
    (dict(sliding_window=4, layer_pattern=("global", "local", "global", "local")), "qwen2"),
])
def test_save_compares_configs_by_what_they_compute(tmp_path, fields, model_type):
    """save_hf's read-back check compares layer kinds, not how the pattern spells them, and
    the output bias whether or not it is spelled out. qwen2: q/k/v biases, no o bias."""
    if model_type == "qwen2":
        fields = dict(fields, attn_bias=True, attn_out_bias=False)
    cfg = zoo.preset("tiny-decoder", **fields)
    params = jax.eval_shape(lambda k: zoo.init(cfg, k), jax.random.key(0))
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), params)
    assert zoo.save_hf(cfg, params, tmp_path) == model_type


# --- what is refused -------------------------------------------------------------------------
@pytest.mark.parametrize("name, changes, message", [
    ("qwen2", dict(layer_types=["full_attention", "chunked_attention"]),
     r"qwen2 config field 'layer_types': \['chunked_attention'\] not supported"),
    ("qwen2", dict(use_sliding_window=False),
     r"qwen2 config field 'layer_types': has sliding_attention layers but use_sliding_window is false"),
    ("qwen3", dict(layer_types=["full_attention"] * 3), r"qwen3 config field 'layer_types': expected a list"),
    ("qwen3", dict(rope_parameters=dict(rope_type="mrope", rope_theta=1e4)),
     r"qwen3 config field 'rope_parameters.rope_type': value 'mrope' is not supported"),
    ("phi3", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
     r"phi3 config field 'rope_parameters.rope_type': value 'dynamic' is not supported by phi3"),
    ("phi3", dict(sliding_window=0), r"phi3 config field 'sliding_window': expected None or a positive int"),
])
def test_unsupported_config_field(tmp_path, name, changes, message):
    test_hf._hf_model(name, cases=CASES).save_pretrained(tmp_path)
    test_hf._edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        zoo.load_hf(tmp_path)


def test_phi3_fused_weight_of_the_wrong_size_is_refused(tmp_path):
    test_hf._hf_model("phi3", cases=CASES).save_pretrained(tmp_path)
    test_hf._edit_config(tmp_path, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.qkv_proj.weight' has shape \(64, 32\), "
                                         r"but the config implies \(96, 32\)"):
        zoo.load_hf(tmp_path)
