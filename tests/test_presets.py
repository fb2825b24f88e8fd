"""Parameter counts of the published presets equal the published models'.

Numbers are those of the Hugging Face `transformers` classes holding the same tensors:
BertModel + MLM head (pooler included), RobertaModel + MLM head, ModernBertForMaskedLM,
AlbertModel + MLM head (pooler included, as for BERT: 11_683_584 + 128_688; transformers'
AlbertForMaskedLM leaves the pooler out), DistilBertForMaskedLM (DistilBertModel's
66_362_880 + 622_650), GPT2LMHeadModel,
LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, T5ForConditionalGeneration,
BartForConditionalGeneration (+ its final_logits_bias, which transformers keeps as a buffer),
Gemma2ForCausalLM and Gemma3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and
Phi3ForCausalLM (tied heads counted once), WhisperForConditionalGeneration less its encoder's
frozen sinusoidal position table [1500, d_model], which zoo computes instead of storing.
"""

import jax
import numpy as np
import pytest

import zoo
from zoo.nn.param import Param

PUBLISHED = {
    "bert-base-uncased": 109_482_240 + 622_650,
    "bert-large-uncased": 335_141_888 + 1_082_170,
    "roberta-base": 124_645_632 + 642_393,
    "albert-base-v2": 11_683_584 + 128_688,
    "distilbert-base-uncased": 66_362_880 + 622_650,
    "modernbert-base": 149_655_232,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "t5-small": 60_506_624,
    "t5-base": 222_903_552,
    "flan-t5-base": 247_577_856,
    "bart-base": 139_420_416 + 50_265,
    "whisper-tiny": 37_760_640 - 1500 * 384,
    "whisper-base": 72_593_920 - 1500 * 512,
    "whisper-large-v3": 1_543_490_560 - 1500 * 1280,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "phi-3-mini": 3_821_079_552,
    "gemma-2-2b": 2_614_341_888,
    "gemma-3-1b": 999_885_952,
    # DeepseekV3ForCausalLM (no multi-token-prediction layer; + the selection biases, buffers
    # there) and DeepseekV2ForCausalLM of the published config.json files.
    "deepseek-v3": 671_026_404_352 + 58 * 256,
    "deepseek-v2-lite": 15_706_484_224,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_count(name):
    cfg = zoo.preset(name)
    shapes = jax.eval_shape(lambda: zoo.init(cfg, jax.random.key(0)))
    counted = sum(x.size for x in jax.tree.leaves(shapes))
    assert counted == PUBLISHED[name] == zoo.param_count(cfg)


def test_active_parameters_count_the_routed_experts_only():
    """Mixtral 8x7B: 12.9B of its 46.7B parameters run per token (2 of 8 experts)."""
    cfg = zoo.preset("mixtral-8x7b")
    per_expert = 3 * cfg.d_model * cfg.d_ff  # gate, up, down of one expert in one layer
    active = zoo.param_count(cfg, active=True)
    assert active == PUBLISHED["mixtral-8x7b"] - cfg.num_layers * (8 - 2) * per_expert == 12_879_925_248
    dense = zoo.preset("llama-3.2-1b")
    assert zoo.param_count(dense, active=True) == zoo.param_count(dense)


@pytest.mark.parametrize("name,total,active", [("deepseek-v3", 671e9, 37e9), ("deepseek-v2-lite", 15.7e9, 2.4e9)])
def test_deepseek_published_totals_and_activated_parameters(name, total, active):
    """DeepSeek's papers: V3 671B total, 37B activated per token; V2-Lite 15.7B and 2.4B.
    Their activated counts leave out the embedding table (a lookup, not a matmul): with it
    zoo counts 37.55B and 2.66B."""
    cfg = zoo.preset(name)
    assert round(zoo.param_count(cfg) / total, 3) == 1.0
    looked_up = zoo.param_count(cfg, active=True) - cfg.vocab_size * cfg.d_model
    assert round(looked_up / active, 1) == 1.0 and abs(looked_up - active) < 0.03 * active


def test_axes_cover_every_leaf_with_matching_rank():
    for name in zoo.presets.names():
        cfg = zoo.preset(name)
        shapes = jax.eval_shape(lambda: zoo.init(cfg, jax.random.key(0)))
        axes = zoo.axes(cfg)
        leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
        assert len(leaves) == len(jax.tree.leaves(shapes))
        jax.tree.map(lambda a, s: (len(a) == len(s.shape)) or pytest.fail(f"{name}: {a} vs {s.shape}"),
                     axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def test_layers_are_stacked():
    cfg = zoo.preset("gpt2")
    axes = zoo.axes(cfg)
    assert axes["decoder"]["layers"]["attn"]["q"] == ("layers", "embed", "heads", "head_dim")
    shapes = jax.eval_shape(lambda: zoo.init(cfg, jax.random.key(0)))
    assert shapes["decoder"]["layers"]["attn"]["q"].shape == (12, 768, 12, 64)


def _std_ok(x, want):
    """x ~ N(0, want^2) elementwise: the sample std of n draws has relative standard error
    1/sqrt(2n) and the mean standard error want/sqrt(n); allow 5 of each."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    return abs(x.std() / want - 1) < 5 / np.sqrt(2 * n) and abs(x.mean()) < 5 * want / np.sqrt(n)


def _small(name, **shape):
    """A preset at test size (vocabulary 512, ids remapped into it), initialised."""
    ids = dict(pad_id=0, bos_id=None, eos_id=1, decoder_start_id=0 if "t5" in name else None)
    size = dict(vocab_size=512, num_layers=2, d_model=64, num_heads=4, d_ff=128)
    cfg = zoo.preset(name, **{**ids, **size, **shape})
    return cfg, jax.jit(lambda k: zoo.init(cfg, k))(jax.random.key(0))


def _check_stds(params, want):
    for path, std in want.items():
        x = params
        for k in path.split("/"):
            x = x[k]
        assert _std_ok(x, std), (path, float(np.std(np.asarray(x))), std)


def test_gpt2_scales_its_residual_projections_by_depth(tmp_path):
    """GPT-2: N(0, 0.02), the attention and MLP output projections 0.02 / sqrt(2 * layers)."""
    cfg, params = _small("gpt2", num_layers=8)
    zoo.save_hf(cfg, params, tmp_path)
    assert zoo.load_hf(tmp_path)[0].initializer == "gpt2"  # a loaded GPT-2 re-initialises alike
    residual = 0.02 / np.sqrt(16)
    _check_stds(params, {"embed/tokens": 0.02, "decoder/positions": 0.02,
                         "decoder/layers/attn/q": 0.02, "decoder/layers/mlp/wi": 0.02,
                         "decoder/layers/attn/o": residual, "decoder/layers/mlp/wo": residual})


def test_t5_scales_by_fan_in(tmp_path):
    """T5: 1/sqrt(fan_in); the query also by 1/sqrt(head_dim) (no score scaling); token
    embeddings N(0, 1); the relative bias 1/sqrt(d_model)."""
    d, h, n, f = 64, 16, 4, 128
    cfg, params = _small("flan-t5-base", head_dim=h)
    zoo.save_hf(cfg, params, tmp_path)
    assert zoo.load_hf(tmp_path)[0].initializer == "t5"
    want = {"embed/tokens": 1.0, "head/kernel": d ** -0.5, "encoder/rel_bias": d ** -0.5}
    for stack, blocks in (("encoder", ("attn",)), ("decoder", ("attn", "cross"))):
        for b in blocks:
            want |= {f"{stack}/layers/{b}/q": (d * h) ** -0.5, f"{stack}/layers/{b}/k": d ** -0.5,
                     f"{stack}/layers/{b}/v": d ** -0.5, f"{stack}/layers/{b}/o": (n * h) ** -0.5}
        want |= {f"{stack}/layers/mlp/wi": d ** -0.5, f"{stack}/layers/mlp/wg": d ** -0.5,
                 f"{stack}/layers/mlp/wo": f ** -0.5}
    _check_stds(params, want)


@pytest.mark.parametrize("name", ["bert-base-uncased", "roberta-base", "bart-base",
                                  "llama-3.2-1b", "mistral-7b", "mixtral-8x7b"])
def test_other_families_start_from_normal_0_02(name):
    """BERT, RoBERTa, BART, Llama, Mistral, Mixtral: N(0, 0.02) (pooler, router included),
    read from the declarations (the draws follow them: the two tests above)."""
    spec = zoo.spec(zoo.preset(name))
    stds = {p.std for p in jax.tree.leaves(spec, is_leaf=lambda x: isinstance(x, Param)) if p.init == "normal"}
    assert stds == {0.02}


def test_unknown_initializer_is_a_config_error():
    with pytest.raises(zoo.ConfigError, match=r"Config.initializer: expected one of \('normal', 'gpt2', 't5'\)"):
        zoo.preset("tiny-decoder", initializer="xavier")
