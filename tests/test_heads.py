"""zoo.heads against transformers' *ForSequenceClassification, *ForTokenClassification and
*ForQuestionAnswering, offline.

Every (model type, head kind) that transformers 5 has a class for: a tiny perturbed model of
the body shapes test_hf / test_hf_qwen_phi / test_hf_gemma already use, saved with
save_pretrained; zoo.load_hf + zoo.heads.load_hf must give its fp32 logits within TOL on a
right-padded batch of odd lengths, and zoo.save_hf(..., head=) must reload in transformers as
the same class with the same logits, id2label and problem_type, and in zoo as the same body
and head.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import test_hf
import test_hf_albert_distilbert
import test_hf_gemma
import test_hf_modernbert
import test_hf_qwen_phi
import zoo
from test_hf import TOL, torch, transformers
from zoo.hf import MODEL_TYPES

LENGTHS = (11, 7, 4)  # right padding, odd lengths
# model_type -> (transformers class prefix, body config class, body config kwargs)
_BODIES = {"bert": ("Bert", test_hf.CASES["bert"]), "roberta": ("Roberta", test_hf.CASES["roberta"]),
           "llama": ("Llama", test_hf.CASES["llama-llama3"]), "mistral": ("Mistral", test_hf.CASES["mistral"]),
           "mixtral": ("Mixtral", test_hf.CASES["mixtral"]), "qwen2": ("Qwen2", test_hf_qwen_phi.CASES["qwen2"]),
           "qwen3": ("Qwen3", test_hf_qwen_phi.CASES["qwen3"]), "phi3": ("Phi3", test_hf_qwen_phi.CASES["phi3"]),
           "gemma2": ("Gemma2", test_hf_gemma.CASES["gemma2"]),
           "gemma3_text": ("Gemma3Text", test_hf_gemma.CASES["gemma3_text"]),
           "modernbert": ("ModernBert", ("ModernBertConfig", test_hf_modernbert.SHAPE)),
           "albert": ("Albert", test_hf_albert_distilbert.CASES["albert"]),
           "distilbert": ("DistilBert", test_hf_albert_distilbert.CASES["distilbert"])}
_SUFFIX = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification",
           "qa": "ForQuestionAnswering"}
# Every head class transformers has for a zoo type.
ALL = [(name, kind) for name, (arch, _) in _BODIES.items() for kind in _SUFFIX
       if hasattr(transformers, arch + _SUFFIX[kind])]
# One check per kind runs by default (and the BERT-style pooler, RoBERTa's own dense, a
# decoder's QA body under "transformer."); the others with -m slow.
FAST = {("bert", "sequence"), ("roberta", "sequence"), ("llama", "sequence"), ("roberta", "token"),
        ("llama", "qa"), ("albert", "sequence"), ("distilbert", "sequence")}
# The types whose QA class is transformers' GenericForQuestionAnswering (2 outputs whatever
# num_labels is); the encoders' size qa_outputs by num_labels.
_GENERIC_QA = {"llama", "mistral", "mixtral", "qwen2", "qwen3"}
# A label set per head, problem types rotated over the sequence heads.
_PROBLEMS = [("single_label_classification", ["neg", "neu", "pos"]),
             ("multi_label_classification", ["sport", "art", "tech", "food"]), ("regression", ["score"])]


def _head_kwargs(name: str, kind: str) -> dict:
    if kind == "qa":  # transformers' generic QA classes keep any id2label and 2 outputs; BERT's needs 2 labels
        return dict(id2label={0: "a", 1: "b", 2: "c"}) if name in _GENERIC_QA else {}
    if kind == "token":
        problem, labels = "single_label_classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    else:
        problem, labels = _PROBLEMS[list(_BODIES).index(name) % len(_PROBLEMS)]  # roberta multi, llama regression
    return dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                problem_type=problem)


def hf_head_model(name: str, kind: str, **config):
    """A perturbed transformers head model of `name`'s test body: pad id 0 (the batch's pad)
    unless `config` says otherwise."""
    arch, (config_cls, body, *_) = _BODIES[name]
    kwargs = {"vocab_size": test_hf.VOCAB, **body, "pad_token_id": 0, **_head_kwargs(name, kind), **config}
    torch.manual_seed(0)
    model = getattr(transformers, arch + _SUFFIX[kind])(getattr(transformers, config_cls)(**kwargs))
    return test_hf._perturbed(model.eval())


def hf_logits(model, tokens, mask, kind: str) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
    if kind == "qa":
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], axis=-1)
    return out.logits.numpy()


_forward = jax.jit(zoo.forward, static_argnums=1)
_apply = jax.jit(zoo.heads.apply, static_argnums=1)


def zoo_logits(params, cfg, head, tokens, mask, **kw) -> np.ndarray:
    out = _forward(params, cfg, jnp.asarray(tokens), mask=jnp.asarray(mask))
    return np.asarray(_apply(head, cfg, out, mask=jnp.asarray(mask), **kw))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(name, kind) -> (transformers model, its directory, zoo cfg, zoo params, zoo head)."""
    built = {}

    def get(name, kind):
        if (name, kind) not in built:
            model = hf_head_model(name, kind)
            path = tmp_path_factory.mktemp(f"{name}-{kind}")
            model.save_pretrained(path)
            cfg, params = zoo.load_hf(path)
            built[name, kind] = (model, path, cfg, params, zoo.heads.load_hf(path, cfg))
        return built[name, kind]

    return get


@pytest.mark.parametrize("name, kind", [pytest.param(*case, marks=() if case in FAST else pytest.mark.slow)
                                        for case in ALL])
def test_parity_and_round_trip(saved, name, kind, tmp_path):
    model, _, cfg, params, head = saved(name, kind)
    assert head.kind == kind and head.labels == tuple(model.config.id2label[i] for i in range(len(head.labels)))
    tokens, mask = test_hf._batch(cfg, LENGTHS)
    ref = hf_logits(model, tokens, mask, kind)
    got = zoo_logits(params, cfg, head, tokens, mask)
    assert got.shape == ref.shape == {"sequence": (3, head.num_labels), "token": (3, 11, head.num_labels),
                                      "qa": (3, 11, 2)}[kind]
    valid = slice(None) if kind == "sequence" else mask
    assert np.abs(ref[valid]).max() > 0.1  # not a comparison of near-zeros
    assert np.abs(got[valid] - ref[valid]).max() <= TOL

    zoo.save_hf(cfg, params, tmp_path, head=head, model_type=name)  # phi3: mistral holds it too
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert back.architectures == [type(model).__name__]
    assert back.id2label == model.config.id2label
    assert back.problem_type == (model.config.problem_type or "single_label_classification")
    reloaded = type(model).from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask, kind)[valid], ref[valid], atol=1e-6, rtol=0)
    cfg2, params2 = zoo.load_hf(tmp_path)
    head2 = zoo.heads.load_hf(tmp_path, cfg2)
    assert cfg2 == cfg and jax.tree.structure(head2) == jax.tree.structure(head)
    for a, b in zip(jax.tree.leaves(head2), jax.tree.leaves(head)):
        np.testing.assert_array_equal(a, b)


def test_zoo_declares_every_head_class_transformers_has():
    declared = {(name, f.kind) for name, m in MODEL_TYPES.items() for f in m.heads if name in _BODIES}
    assert declared == set(ALL)
    for name, kind in ALL:
        assert [f.arch for f in MODEL_TYPES[name].heads if f.kind == kind] == [_BODIES[name][0] + _SUFFIX[kind]]


# --- decoders: which token a sequence head scores ------------------------------------------------
def test_decoder_scores_the_last_non_pad_token_as_transformers(saved):
    """Left padding and a real token equal to the pad id: with tokens=, apply finds the last
    non-pad token by the pad id (transformers' rule, here not the last real token); with the
    mask only, the last real token. A head without a pad id scores the last position of one
    row, and refuses more rows, as transformers does."""
    model, _, cfg, params, head = saved("llama", "sequence")
    tokens = np.array([[0, 0, 5, 9, 7, 4], [8, 3, 6, 0, 0, 0]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)  # row 1's last real token is 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = _forward(params, cfg, jnp.asarray(tokens), mask=jnp.asarray(mask), positions=jnp.asarray(positions))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    by_tokens = np.asarray(zoo.heads.apply(head, cfg, out, mask=jnp.asarray(mask), tokens=jnp.asarray(tokens)))
    np.testing.assert_allclose(by_tokens, ref, atol=TOL, rtol=0)
    by_mask = np.asarray(zoo.heads.apply(head, cfg, out, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(by_mask[0], ref[0], atol=TOL, rtol=0)
    assert np.abs(by_mask[1] - ref[1]).max() > 1e-3  # transformers skipped the real token 0

    no_pad = dataclasses.replace(head, pad_id=None)
    model.config.pad_token_id = None
    try:
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(tokens[1:], dtype=torch.long)).logits.numpy()
    finally:
        model.config.pad_token_id = 0
    out = _forward(params, cfg, jnp.asarray(tokens[1:]))
    np.testing.assert_allclose(np.asarray(zoo.heads.apply(no_pad, cfg, out)), ref, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"has no pad_id .* got 2 rows"):
        zoo.heads.apply(no_pad, cfg, _forward(params, cfg, jnp.asarray(tokens)))


def test_checkpoint_without_pad_token_id_round_trips(tmp_path):
    model = hf_head_model("qwen3", "sequence", pad_token_id=None)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = zoo.load_hf(tmp_path / "hf")
    head = zoo.heads.load_hf(tmp_path / "hf", cfg)
    assert head.pad_id is None and cfg.pad_id == 0
    zoo.save_hf(cfg, params, tmp_path / "zoo", head=head)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "zoo").pad_token_id is None


# --- init, jit, grad -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["roberta", "llama"])
def test_init_saves_as_the_class_transformers_loads(saved, name, tmp_path):
    """heads.init copies the class of the type save_hf writes: a fresh head of each kind
    saves and transformers loads it with the same logits; under jit the head is an ordinary
    argument and grad reaches its params only."""
    _, _, cfg, params, _ = saved(name, "sequence")
    tokens, mask = test_hf._batch(cfg, LENGTHS)
    for i, kind in enumerate(_SUFFIX):
        head = zoo.heads.init(cfg, jax.random.key(i), num_labels=2 if kind == "qa" else 3, kind=kind)
        head = dataclasses.replace(head, params=jax.tree.map(lambda x: x + 0.1, head.params))
        assert head.recipe == next(f.recipe for f in MODEL_TYPES[name].heads if f.kind == kind)
        got = zoo_logits(params, cfg, head, tokens, mask)
        zoo.save_hf(cfg, params, tmp_path / kind, head=head)
        model = getattr(transformers, _BODIES[name][0] + _SUFFIX[kind]).from_pretrained(tmp_path / kind).eval()
        valid = slice(None) if kind == "sequence" else mask
        np.testing.assert_allclose(got[valid], hf_logits(model, tokens, mask, kind)[valid], atol=TOL, rtol=0)
        if head.dropout:  # a key turns the classifier dropout on
            out = _forward(params, cfg, jnp.asarray(tokens), mask=jnp.asarray(mask))
            dropped = np.asarray(zoo.heads.apply(head, cfg, out, mask=jnp.asarray(mask), key=jax.random.key(0)))
            assert not np.allclose(dropped, got)
    out = _forward(params, cfg, jnp.asarray(tokens), mask=jnp.asarray(mask))
    grads = jax.grad(lambda h: jnp.sum(_apply(h, cfg, out, mask=jnp.asarray(mask))))(head)
    assert isinstance(grads, zoo.heads.Head) and grads.kind == "qa"
    assert jax.tree.structure(grads) == jax.tree.structure(head)


# --- bad input ------------------------------------------------------------------------------------
def test_refusals(saved, tmp_path):
    _, path, cfg, params, head = saved("bert", "sequence")
    # A body-only checkpoint: no head, and the message says which classes were looked for.
    test_hf._hf_model("bert").save_pretrained(tmp_path / "mlm")
    with pytest.raises(ValueError, match=r"holds no task head; looked for bert classes "
                                         r"BertForSequenceClassification \(classifier.weight\), "
                                         r"BertForTokenClassification .*BertForQuestionAnswering"):
        zoo.heads.load_hf(tmp_path / "mlm", zoo.load_hf(tmp_path / "mlm")[0])
    # Two heads in one checkpoint.
    two = tmp_path / "two"
    zoo.save_hf(cfg, params, two, head=head)
    tensors = load_file(two / "model.safetensors")
    tensors.update({"qa_outputs.weight": np.zeros((2, cfg.d_model), np.float32),
                    "qa_outputs.bias": np.zeros(2, np.float32)})
    save_file(tensors, two / "model.safetensors", metadata={"format": "pt"})
    test_hf._edit_config(two, architectures=["BertForSequenceClassification", "BertForQuestionAnswering"])
    for load in (zoo.load_hf, lambda p: zoo.heads.load_hf(p, cfg)):
        with pytest.raises(ValueError, match=r"two task heads \(BertForSequenceClassification, "
                                             r"BertForQuestionAnswering\)"):
            load(two)
    test_hf._edit_config(two, architectures=["BertForSequenceClassification"])
    with pytest.raises(ValueError, match=r"two task heads \('classifier.weight', 'qa_outputs.weight'\)"):
        zoo.heads.load_hf(two, cfg)
    # What zoo does not support: the problem type, a qa head of 3 outputs, id2label's ids.
    bad = tmp_path / "bad"
    zoo.save_hf(cfg, params, bad, head=head)
    test_hf._edit_config(bad, problem_type="ordinal_regression")
    with pytest.raises(ValueError, match=r"problem_type must be one of .* got 'ordinal_regression'"):
        zoo.heads.load_hf(bad, cfg)
    test_hf._edit_config(bad, problem_type=None, id2label={"0": "a", "2": "b"})
    with pytest.raises(ValueError, match=r"'id2label' must number labels 0..n-1, got keys \['0', '2'\]"):
        zoo.heads.load_hf(bad, cfg)
    test_hf._edit_config(bad, id2label={"0": "a", "1": "b"})  # the classifier has 3 rows
    with pytest.raises(ValueError, match=r"2 labels in id2label.*'classifier.weight' has shape \(3, 32\)"):
        zoo.heads.load_hf(bad, cfg)
    with pytest.raises(ValueError, match=r"num_labels must be >= 1, got 0"):
        zoo.heads.init(cfg, jax.random.key(0), num_labels=0)
    qa3 = zoo.heads.init(cfg, jax.random.key(0), num_labels=3, kind="qa")  # id2label only, as transformers
    assert qa3.outputs == 2 and qa3.params["out"]["kernel"].shape == (cfg.d_model, 2)
    with pytest.raises(ValueError, match=r"BertForQuestionAnswering has one qa_outputs row per label, so it "
                                         r"holds 2 labels \(start, end\); the head has 3"):
        zoo.save_hf(cfg, params, tmp_path / "qa3", head=qa3)
    with pytest.raises(ValueError, match=r"problem_type must be one of"):
        zoo.heads.init(cfg, jax.random.key(0), num_labels=3, problem_type="ranking")
    # apply: a mask of the wrong shape.
    tokens, mask = test_hf._batch(cfg, LENGTHS)
    out = _forward(params, cfg, jnp.asarray(tokens), mask=jnp.asarray(mask))
    with pytest.raises(ValueError, match=r"mask: expected shape \(3, 11\) \(same as out.hidden\[:, :, 0\]\), "
                                         r"got \(3, 10\)"):
        zoo.heads.apply(head, cfg, out, mask=jnp.asarray(mask[:, :10]))
    # save_hf: a kind the type has no class for, a head of another type's recipe.
    gemma_cfg = zoo.preset("gemma-3-1b", vocab_size=128, d_model=32, num_layers=2, num_heads=2,
                           num_kv_heads=1, head_dim=16, d_ff=64, embed_scale=32 ** 0.5)
    qa = zoo.heads.init(gemma_cfg, jax.random.key(0), kind="qa")
    gemma_params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                                jax.eval_shape(lambda k: zoo.init(gemma_cfg, k), jax.random.key(0)))
    with pytest.raises(ValueError, match=r"no qa head for gemma3_text \(it has: Gemma3TextForSequenceClassification\)"):
        zoo.save_hf(gemma_cfg, gemma_params, tmp_path / "g", head=qa)
    roberta_style = zoo.heads.init(cfg.replace(pooler=False), jax.random.key(0), 3)  # no pooler to read
    assert roberta_style.recipe == zoo.heads.Recipe(pool="first", act="tanh")
    with pytest.raises(ValueError, match=r"a BertForSequenceClassification computes Recipe\(pool='pooled'"):
        zoo.save_hf(cfg, params, tmp_path / "r", head=roberta_style, model_type="bert")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
