"""ALBERT (`albert`) and DistilBERT (`distilbert`) against transformers, offline.

ALBERT: embeddings 16 wide under a 32-wide stack, four layers over two shared groups
(layers 0-1 run group 0, 2-3 group 1, as transformers maps them). DistilBERT: its own key
names, no token types, sinusoidal_pos_embds set (the stored table is read as is). Each a
tiny random *ForMaskedLM with every tensor perturbed, on test_hf's right-padded batch of
24, 17 and 9 tokens; the helpers are test_hf's.
"""

import jax
import numpy as np
import pytest

import zoo
from test_hf import TOL, _batch, _edit_config, _perturbed, check_parity_and_round_trip, torch, transformers
from zoo.hf import MODEL_TYPES

CASES = {
    "albert": ("AlbertConfig", dict(embedding_size=16, hidden_size=32, num_hidden_layers=4, num_hidden_groups=2,
                                    num_attention_heads=4, intermediate_size=48, max_position_embeddings=64),
               "AlbertForMaskedLM"),
    "distilbert": ("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                            max_position_embeddings=64, sinusoidal_pos_embds=True),
                   "DistilBertForMaskedLM"),
}


def _model(name: str, model_cls: str | None = None):
    config_cls, kwargs, mlm_cls = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=128, **kwargs)
    return _perturbed(getattr(transformers, model_cls or mlm_cls)(config).eval())


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_and_round_trip(name, tmp_path):
    assert check_parity_and_round_trip(_model(name), tmp_path) <= TOL


def test_albert_reads_groups_as_shared_layers(tmp_path):
    """Two parameter sets for four layers, embeddings narrower than the stack; a bare
    AlbertModel (pooler, no MLM head) has no vocabulary logits to give."""
    model = _model("albert", "AlbertModel")
    model.save_pretrained(tmp_path)
    cfg, params = zoo.load_hf(tmp_path)
    assert (cfg.shared_layers, cfg.embed_dim, cfg.num_layers, cfg.pooler, cfg.mlm_transform) == (2, 16, 4, True, False)
    assert params["encoder"]["layers"]["attn"]["q"].shape == (2, 32, 4, 8)
    assert params["embed"]["tokens"].shape == (128, 16) and params["encoder"]["embed_proj"]["kernel"].shape == (16, 32)
    src, mask = _batch(cfg)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(src, dtype=torch.long), attention_mask=torch.tensor(mask))
    out = zoo.forward(params, cfg, src, mask=mask)
    assert out.logits is None
    np.testing.assert_allclose(np.asarray(out.hidden)[mask], ref.last_hidden_state.numpy()[mask], atol=TOL)
    np.testing.assert_allclose(np.asarray(out.pooled), ref.pooler_output.numpy(), atol=TOL)


@pytest.mark.parametrize("changes, field", [
    (dict(inner_group_num=2), "inner_group_num"),
    (dict(num_hidden_groups=3), "num_hidden_groups"),  # 3 groups do not divide 4 layers
])
def test_albert_refusals(tmp_path, changes, field):
    _model("albert").save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=field):
        zoo.load_hf(tmp_path)


def test_save_refuses_what_neither_holds(tmp_path):
    """A BERT config without token types is no BERT checkpoint (transformers embeds type 0),
    and DistilBERT has no pooler; an ALBERT checkpoint needs factorised embeddings."""
    typeless = zoo.preset("tiny-encoder", type_vocab_size=0)
    params = jax.eval_shape(lambda: zoo.init(typeless, jax.random.key(0)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    with pytest.raises(ValueError, match="type_vocab_size"):
        zoo.save_hf(typeless, params, tmp_path, model_type="bert")
    with pytest.raises(ValueError, match="pooler"):
        zoo.save_hf(typeless, params, tmp_path, model_type="distilbert")
    with pytest.raises(ValueError, match="embed_dim"):
        zoo.save_hf(zoo.preset("tiny-encoder"), params, tmp_path, model_type="albert")
    distil = typeless.replace(pooler=False, norm_eps=1e-12)
    assert zoo.save_hf(distil, _without_pooler(params), tmp_path) == "distilbert"


def _without_pooler(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "pooler"}


# The published config.json files (albert/albert-base-v2, distilbert/distilbert-base-uncased).
PUBLISHED = {
    "albert-base-v2": dict(
        model_type="albert", architectures=["AlbertForMaskedLM"], attention_probs_dropout_prob=0,
        bos_token_id=2, classifier_dropout_prob=0.1, down_scale_factor=1, embedding_size=128, eos_token_id=3,
        gap_size=0, hidden_act="gelu_new", hidden_dropout_prob=0, hidden_size=768, initializer_range=0.02,
        inner_group_num=1, intermediate_size=3072, layer_norm_eps=1e-12, max_position_embeddings=512,
        net_structure_type=0, num_attention_heads=12, num_hidden_groups=1, num_hidden_layers=12,
        num_memory_blocks=0, pad_token_id=0, type_vocab_size=2, vocab_size=30000),
    "distilbert-base-uncased": dict(
        model_type="distilbert", architectures=["DistilBertForMaskedLM"], activation="gelu",
        attention_dropout=0.1, dim=768, dropout=0.1, hidden_dim=3072, initializer_range=0.02,
        max_position_embeddings=512, n_heads=12, n_layers=6, pad_token_id=0, qa_dropout=0.1,
        seq_classif_dropout=0.2, sinusoidal_pos_embds=False, tie_weights_=True, vocab_size=30522),
}


class _Checkpoint:
    """The keys of a published checkpoint: everything but the tied decoder weight."""

    def has(self, key: str) -> bool:
        return key not in ("predictions.decoder.weight", "vocab_projector.weight")


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_configs_read_as_the_presets(preset):
    """The presets keep dropout at 0, as bert-base-uncased does (DistilBERT publishes 0.1)."""
    d = PUBLISHED[preset]
    cfg = MODEL_TYPES[d["model_type"]].read_config(d, _Checkpoint())
    assert cfg.replace(dropout=0.0) == zoo.preset(preset)


def test_albert_parameters_do_not_grow_with_depth():
    cfg = zoo.preset("albert-base-v2")
    assert zoo.param_count(cfg.replace(num_layers=48)) == zoo.param_count(cfg) == 11_812_272
    assert zoo.param_count(cfg.replace(shared_layers=2)) == zoo.param_count(cfg) + 7_087_872  # one layer more


def test_distilbert_token_head_drops_out_by_the_body_rate(tmp_path):
    """DistilBertForTokenClassification reads its dropout from the body's `dropout`: a head
    with another rate has no checkpoint (saving it would change the body's)."""
    cfg = zoo.preset("distilbert-base-uncased", vocab_size=128, d_model=32, num_heads=4, d_ff=64, num_layers=1,
                     max_len=64, dropout=0.1)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(lambda: zoo.init(cfg, jax.random.key(0))))
    head = zoo.heads.init(cfg, jax.random.key(1), num_labels=3, kind="token", dropout=0.3)
    with pytest.raises(ValueError, match="dropout"):
        zoo.save_hf(cfg, params, tmp_path, head=head)
    zoo.save_hf(cfg, params, tmp_path, head=zoo.heads.init(cfg, jax.random.key(1), num_labels=3, kind="token",
                                                           dropout=0.1))
    assert zoo.heads.load_hf(tmp_path, zoo.load_hf(tmp_path)[0]).dropout == 0.1
