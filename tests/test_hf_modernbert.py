"""ModernBERT (`modernbert`) against transformers, offline.

One tiny random ModernBertForMaskedLM (every tensor perturbed), four layers in the published
pattern (global, local, local, global), local_attention 8 (keys up to 4 away on each side,
zoo's window 5) on a right-padded batch of 24, 17 and 9 tokens, so the window cuts every
long row on both sides; global and local RoPE bases differ. Layer 0 has no attention norm.
The helpers are test_hf's.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from test_hf import TOL, _edit_config, _perturbed, check_parity_and_round_trip, torch, transformers
from zoo.hf import MODEL_TYPES
from zoo.nn.attention import attention_mask

LOCAL_ATTENTION = 8
SHAPE = dict(vocab_size=128, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=3,
             max_position_embeddings=64, local_attention=LOCAL_ATTENTION, global_rope_theta=1000.0,
             local_rope_theta=50.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
             sep_token_id=2)
CASES = {
    "modernbert": SHAPE,  # as published: no biases anywhere but the decoder's
    "modernbert-biases": dict(SHAPE, attention_bias=True, mlp_bias=True, classifier_bias=True, norm_bias=True,
                              hidden_activation="gelu_pytorch_tanh", classifier_activation="gelu_pytorch_tanh"),
}


def _model(name: str):
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(**CASES[name])
    return _perturbed(transformers.ModernBertForMaskedLM(config).eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The save_pretrained dir of the published-shape case, written once."""
    path = tmp_path_factory.mktemp("modernbert")
    _model("modernbert").save_pretrained(path)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_and_round_trip(name, tmp_path):
    model = _model(name)
    assert check_parity_and_round_trip(model, tmp_path) <= TOL  # on 24 tokens > the window
    cfg, params = zoo.load_hf(tmp_path / "hf")
    assert cfg.sliding_window == LOCAL_ATTENTION // 2 + 1 and cfg.layer_pattern == ("global", "local", "local")
    assert "attn_norm" not in params["encoder"]["first_layer"]  # layer 0 reads the embedding norm
    assert params["encoder"]["layers"]["attn_norm"]["scale"].shape[0] == 3


def test_encoder_window_is_two_sided():
    """An encoder's local key is visible when |q - k| < window; a decoder's when 0 <= q - k < window."""
    pos = jnp.arange(7)[None]
    distance = np.arange(7)[:, None] - np.arange(7)[None, :]
    both = attention_mask(pos, pos, causal=False, window=3)[0]
    back = attention_mask(pos, pos, causal=True, window=3)[0]
    np.testing.assert_array_equal(both, np.abs(distance) < 3)
    np.testing.assert_array_equal(back, (distance >= 0) & (distance < 3))


# The published config.json of answerdotai/ModernBERT-base (transformers 4.47, before
# layer_types and rope_parameters): it reads as zoo's preset.
PUBLISHED = dict(
    model_type="modernbert", architectures=["ModernBertForMaskedLM"], attention_bias=False, attention_dropout=0.0,
    bos_token_id=50281, classifier_activation="gelu", classifier_bias=False, classifier_dropout=0.0,
    classifier_pooling="mean", cls_token_id=50281, decoder_bias=True, deterministic_flash_attn=False,
    embedding_dropout=0.0, eos_token_id=50282, global_attn_every_n_layers=3, global_rope_theta=160000.0,
    gradient_checkpointing=False, hidden_activation="gelu", hidden_size=768, initializer_cutoff_factor=2.0,
    initializer_range=0.02, intermediate_size=1152, layer_norm_eps=1e-05, local_attention=128,
    local_rope_theta=10000.0, max_position_embeddings=8192, mlp_bias=False, mlp_dropout=0.0, norm_bias=False,
    norm_eps=1e-05, num_attention_heads=12, num_hidden_layers=22, pad_token_id=50283,
    position_embedding_type="absolute", sep_token_id=50282, sparse_pred_ignore_index=-100,
    sparse_prediction=False, torch_dtype="float32", vocab_size=50368)


class _TiedCheckpoint:
    """The keys of a ModernBertForMaskedLM checkpoint whose decoder is the embedding (not stored)."""

    def has(self, key: str) -> bool:
        return key not in ("decoder.weight", "head.dense.bias", "classifier.weight")


def test_published_config_reads_as_the_preset():
    cfg = MODEL_TYPES["modernbert"].read_config(PUBLISHED, _TiedCheckpoint())
    assert cfg == zoo.preset("modernbert-base").replace(initializer="normal")


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e3},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
     r"'rope_parameters.full_attention.rope_type': value 'linear'"),
    (dict(classifier_bias=True), r"modernbert config field 'classifier_bias'"),
    (dict(layer_types=["full_attention", "chunked_attention", "full_attention", "full_attention"]),
     r"'layer_types': \['chunked_attention'\] not supported"),
])
def test_unsupported_config_field(saved, tmp_path, changes, message):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        zoo.load_hf(tmp_path)


# --- task heads -------------------------------------------------------------------------------
# (kind, class, config): mean pooling (a sequence head of its own recipe) with a biased
# tanh-GELU head; QA with the default cls recipe. test_heads runs every class (-m slow).
HEADS = {"sequence": ("ModernBertForSequenceClassification",
                      dict(classifier_pooling="mean", classifier_bias=True, classifier_activation="gelu_pytorch_tanh",
                           id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})),
         "qa": ("ModernBertForQuestionAnswering", {})}


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_heads_parity_and_round_trip(kind, tmp_path):
    """zoo.heads.load_hf reads the head (its ModernBertPredictionHead, pooling and classifier)
    within TOL of transformers on a padded batch longer than the window, and save_hf writes the
    same class back."""
    from test_heads import LENGTHS, hf_logits, zoo_logits
    from test_hf import _batch

    arch, config = HEADS[kind]
    torch.manual_seed(0)
    model = _perturbed(getattr(transformers, arch)(transformers.ModernBertConfig(**SHAPE, **config)).eval())
    model.save_pretrained(tmp_path / "hf")
    cfg, params = zoo.load_hf(tmp_path / "hf")
    head = zoo.heads.load_hf(tmp_path / "hf", cfg)
    assert not cfg.mlm_transform and head.kind == kind and head.recipe.norm
    tokens, mask = _batch(cfg, (24,) + LENGTHS[1:])
    ref = hf_logits(model, tokens, mask, kind)
    got = zoo_logits(params, cfg, head, tokens, mask)
    valid = slice(None) if kind == "sequence" else mask
    assert np.abs(got[valid] - ref[valid]).max() <= TOL

    zoo.save_hf(cfg, params, tmp_path / "zoo", head=head)
    back = getattr(transformers, arch).from_pretrained(tmp_path / "zoo").eval()
    np.testing.assert_allclose(hf_logits(back, tokens, mask, kind)[valid], ref[valid], atol=1e-6, rtol=0)
    assert back.config.classifier_pooling == model.config.classifier_pooling


def test_an_mlm_body_saves_with_a_task_head_without_its_mlm_head(saved, tmp_path):
    """ModernBERT's task classes keep their head under the MLM head's names (head.*): the
    export of an MLM body with a fresh head holds the task head alone."""
    cfg, params = zoo.load_hf(saved)
    assert cfg.mlm_transform
    head = zoo.heads.init(cfg, jax.random.key(0), num_labels=2, kind="token")
    zoo.save_hf(cfg, params, tmp_path, head=head)
    cfg2, params2 = zoo.load_hf(tmp_path)
    assert cfg2 == cfg.replace(mlm_transform=False, logits_bias=False)
    np.testing.assert_array_equal(params2["encoder"]["first_layer"]["attn"]["q"],
                                  params["encoder"]["first_layer"]["attn"]["q"])
    head2 = zoo.heads.load_hf(tmp_path, cfg2)
    np.testing.assert_array_equal(head2.params["dense"]["kernel"], head.params["dense"]["kernel"])
