"""Parameter counts of the published presets equal the published models'.

Numbers are those of the Hugging Face `transformers` classes holding the same tensors:
BertModel + MLM head (pooler included), RobertaModel + MLM head, GPT2LMHeadModel,
LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, T5ForConditionalGeneration and
BartForConditionalGeneration (+ its final_logits_bias, which transformers keeps as a buffer).
"""

import jax
import pytest

import zoo

PUBLISHED = {
    "bert-base-uncased": 109_482_240 + 622_650,
    "bert-large-uncased": 335_141_888 + 1_082_170,
    "roberta-base": 124_645_632 + 642_393,
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
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_count(name):
    cfg = zoo.preset(name)
    shapes = jax.eval_shape(lambda: zoo.init(cfg, jax.random.key(0)))
    counted = sum(x.size for x in jax.tree.leaves(shapes))
    assert counted == PUBLISHED[name] == zoo.param_count(cfg)


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
