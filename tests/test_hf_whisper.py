"""Whisper (`whisper`) against transformers, offline: the log-mel encoder of an encdec model
(`Config.num_mel_bins`), its load_hf / save_hf, and generation from a forced decoder prompt.

Two tiny random models, every trained tensor perturbed: 80 mels with 3 encoder and 2 decoder
layers; 128 mels with 1 encoder and 2 decoder layers and scale_embedding=True (which
transformers' Whisper reads but never applies, so zoo ignores it too). Both have
16 encoder positions (32 frames) and 24 decoder positions. HF's suppress lists are empty, so
both sides run the same search.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding

import zoo
from zoo import sharding
from zoo.hf import Unsupported
from zoo.nn.positions import sinusoidal_table

VOCAB, FRAMES, NEW = 96, 32, 10
PREFIX = np.array([3, 90, 91, 92], np.int32)  # start, then three forced tokens (language, task, ...)
CASES = {
    "mel80": dict(num_mel_bins=80, encoder_layers=3, decoder_layers=2),
    "mel128": dict(num_mel_bins=128, encoder_layers=1, decoder_layers=2, scale_embedding=True),
}


def _hf_model(name: str):
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=FRAMES // 2, max_target_positions=24,
        pad_token_id=0, bos_token_id=2, eos_token_id=1, decoder_start_token_id=3,
        suppress_tokens=[], begin_suppress_tokens=[], **CASES[name])
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # not the frozen sinusoidal table: zoo computes it
        for key, p in model.named_parameters():
            if key != "model.encoder.embed_positions.weight":
                p.add_(torch.randn_like(p) * 0.3)
        model.model.decoder.embed_positions.weight.mul_(3.0)  # distinct positions: greedy does not loop
    return model


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """name -> (transformers model, its directory, zoo cfg, zoo params)."""
    built = {}

    def get(name):
        if name not in built:
            model, path = _hf_model(name), tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            built[name] = (model, path, *zoo.load_hf(path))
        return built[name]

    return get


def _feats(cfg, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, cfg.num_mel_bins, FRAMES)).astype(np.float32)


def _targets(batch=2, seed=1):
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, 7)).astype(np.int32)


def _hf_out(model, feats, tgt):
    with torch.no_grad():
        return model(input_features=torch.tensor(feats), decoder_input_ids=torch.tensor(tgt, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(whisper, name):
    model, _, cfg, params = whisper(name)
    assert (cfg.num_mel_bins, cfg.encoder_max_len, cfg.max_len) == (CASES[name]["num_mel_bins"], 16, 24)
    assert (cfg.num_layers, cfg.decoder_layers) == (CASES[name]["encoder_layers"], 2)
    assert cfg.attn_key_bias is False and "k_bias" not in params["encoder"]["layers"]["attn"]
    feats, tgt = _feats(cfg), _targets()
    ref = _hf_out(model, feats, tgt)
    out = zoo.encdec.forward(params, cfg, jnp.asarray(feats), jnp.asarray(tgt))
    assert out.logits.shape == (2, 7, VOCAB) and np.abs(ref.logits.numpy()).max() > 0.5
    np.testing.assert_allclose(out.encoder_hidden, ref.encoder_last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4)


def test_save_hf_round_trip(whisper, tmp_path):
    model, _, cfg, params = whisper("mel128")
    assert zoo.save_hf(cfg, params, tmp_path) == "whisper"
    back, info = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_array_equal(back.model.encoder.embed_positions.weight.detach().numpy(),
                                  sinusoidal_table(16, 32))
    feats, tgt = _feats(cfg), _targets()
    np.testing.assert_allclose(_hf_out(back.eval(), feats, tgt).logits.numpy(),
                               _hf_out(model, feats, tgt).logits.numpy(), atol=1e-5)
    cfg2, params2 = zoo.load_hf(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def _hf_generate(model, cfg, feats, num_beams, eos):
    config = transformers.GenerationConfig(
        do_sample=False, num_beams=num_beams, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=cfg.pad_id,
        decoder_start_token_id=cfg.decoder_start_id, length_penalty=1.0, early_stopping=False)
    prompt = torch.tensor(np.tile(PREFIX, (feats.shape[0], 1)), dtype=torch.long)
    with torch.no_grad():  # the plain search: Whisper's own generate adds its language/timestamp logic
        out = transformers.GenerationMixin.generate(model, input_features=torch.tensor(feats),
                                                    decoder_input_ids=prompt, generation_config=config)
    return out.numpy()[:, len(PREFIX):]


def _until(row, stop):
    row = [int(t) for t in row]
    return row[:row.index(stop) + 1] if stop in row else row


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generate_matches_transformers(whisper, num_beams):
    """Greedy and 4 beams from the forced prompt, token for token, with an EOS the model emits
    (the 4th greedy token of row 0, so rows and beams end at different lengths)."""
    model, _, cfg, params = whisper("mel80")
    feats = _feats(cfg, batch=3, seed=5)
    free = np.asarray(zoo.generate(params, cfg, feats, NEW, decoder_prompt=PREFIX, stop_tokens=()))
    assert len(set(free[0])) > 2  # not a constant row
    eos = int(free[0, 3])
    ours = zoo.generate(params, cfg, jnp.asarray(feats), NEW, decoder_prompt=np.tile(PREFIX, (3, 1)),
                        num_beams=num_beams, stop_tokens=(eos,))
    theirs = _hf_generate(model, cfg, feats, num_beams, eos)
    for a, b in zip(np.asarray(ours), theirs):
        assert _until(a, eos) == _until(b, eos)


def test_decoder_prompt_of_a_text_encdec():
    """T5-shaped: forcing the start token and greedy's first new token continues the same
    greedy sequence (the decoder prompt's cache rows and positions are those decoding wrote)."""
    cfg = zoo.preset("tiny-encdec")
    params = zoo.init(cfg, jax.random.key(0))
    src = jax.random.randint(jax.random.key(1), (2, 9), 3, cfg.vocab_size)
    free = np.asarray(zoo.generate(params, cfg, src, 6, stop_tokens=()))
    forced = np.stack([np.full(2, cfg.decoder_start_id), free[:, 0]], axis=1).astype(np.int32)
    np.testing.assert_array_equal(zoo.generate(params, cfg, src, 5, stop_tokens=(), decoder_prompt=forced),
                                  free[:, 1:])


def test_bad_inputs_are_named(whisper, tmp_path):
    _, path, cfg, params = whisper("mel80")
    tgt = jnp.asarray(_targets())
    with pytest.raises(ValueError, match=r"src: expected features \[batch, 80 mel bins, 32 frames\].*\(2, 128, 32\)"):
        zoo.encdec.forward(params, cfg, jnp.zeros((2, 128, FRAMES)), tgt)
    with pytest.raises(ValueError, match=r"src: expected features .*32 frames.*\(2, 80, 30\)"):
        zoo.encdec.forward(params, cfg, jnp.zeros((2, 80, 30)), tgt)
    with pytest.raises(ValueError, match=r"src: this encoder reads float log-mel features .*token ids"):
        zoo.encdec.forward(params, cfg, jnp.zeros((2, 32), jnp.int32), tgt)
    with pytest.raises(ValueError, match=r"src_mask: a feature encoder reads all 32 frames"):
        zoo.encdec.encode(params, cfg, jnp.zeros((2, 80, FRAMES)), jnp.ones((2, 16), bool))
    with pytest.raises(ValueError, match=r"prompt: expected features"):
        zoo.generate(params, cfg, jnp.zeros((2, 80, 3000)), 4)
    with pytest.raises(ValueError, match=r"decoder_prompt: expected int \[batch=2, P\]"):
        zoo.generate(params, cfg, jnp.zeros((2, 80, FRAMES)), 4, decoder_prompt=np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match=r"max_new_tokens: decoder prompt length 4 \+ 30 new tokens"):
        zoo.generate(params, cfg, jnp.zeros((2, 80, FRAMES)), 30, decoder_prompt=PREFIX)
    with pytest.raises(ValueError, match=r"decoder_prompt: only encdec models"):
        tiny = zoo.preset("tiny-decoder")
        zoo.generate(zoo.init(tiny, jax.random.key(0)), tiny, jnp.ones((1, 3), jnp.int32), 2, decoder_prompt=PREFIX)
    with pytest.raises(zoo.ConfigError, match=r"Config.num_mel_bins: only the encdec family"):
        zoo.preset("tiny-decoder", num_mel_bins=80)
    with pytest.raises(zoo.ConfigError, match=r"Config.encoder_positions: expected None or one of"):
        cfg.replace(encoder_positions="conv")
    with pytest.raises(zoo.ConfigError, match=r"Config.attn_key_bias: True needs attn_bias=True"):
        cfg.replace(attn_bias=False, attn_key_bias=True)
    # A checkpoint whose encoder position table is not Whisper's sinusoids.
    model = transformers.WhisperForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        model.model.encoder.embed_positions.weight.add_(0.05)
    model.save_pretrained(tmp_path)
    with pytest.raises(Unsupported, match=r"'model.encoder.embed_positions.weight' differs from the table"):
        zoo.load_hf(tmp_path)


@pytest.mark.slow  # the train step on a mesh and under pmap: tests/test_parallel.py (feature encoder)
def test_value_and_grad_on_an_8_device_mesh(whisper):
    """A jitted value_and_grad of the loss, params and batch sharded over data x fsdp x tensor,
    equals one device's."""
    _, _, cfg, params = whisper("mel128")
    feats, tgt = jnp.asarray(_feats(cfg, batch=4)), jnp.asarray(_targets(batch=4))

    def loss(p, f, t):
        logp = jax.nn.log_softmax(zoo.encdec.forward(p, cfg, f, t[:, :-1]).logits)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1))

    want_loss, want_grad = jax.jit(jax.value_and_grad(loss))(params, feats, tgt)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = jax.device_put(params, sharding.tree_shardings(zoo.axes(cfg), mesh, params))
    assert not sharded["encoder"]["stem"]["conv2"]["kernel"].sharding.is_fully_replicated
    put = lambda x, axes: jax.device_put(x, NamedSharding(mesh, sharding.spec_for(axes, x.shape, mesh)))
    with sharding.use(mesh):
        got_loss, got_grad = jax.jit(jax.value_and_grad(loss))(
            sharded, put(feats, ("batch", None, None)), put(tgt, ("batch", "length")))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grad, want_grad)


def test_flops_count_the_stem_and_cross_attention():
    """whisper-tiny over 30 s (1500 positions, 3000 frames) and 448 target tokens, by hand:
    conv1 at every frame, conv2 at every position, cross-attention keys/values over the source."""
    cfg = zoo.preset("whisper-tiny")
    d, f, v, m, s, t = 384, 1536, 51865, 80, 1500, 448
    stem = 2 * 3 * m * d * 2 * s + 2 * 3 * d * d * s
    encoder = 4 * (2 * 4 * d * d * s + 2 * 2 * d * f * s)
    decoder = 4 * (2 * 4 * d * d * t + 2 * 2 * d * d * t + 2 * 2 * d * d * s + 2 * 2 * d * f * t)
    assert zoo.flops.matmul_flops(cfg, s, t) == stem + encoder + decoder + 2 * v * d * t
    assert zoo.flops.attention_flops(cfg, s, t) == 4 * 4 * s * s * d + 4 * (4 * t * t * d + 4 * t * s * d)
