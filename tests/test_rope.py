"""RoPE scalings (zoo.nn.positions) and their Hugging Face form (zoo.hf.common.read_rope /
write_rope), against transformers: the cos/sin tables of its rotary module per scaling type
(including the per-call dynamic and longrope updates), a hand formula per type, and the
logits of a tiny LlamaForCausalLM per type through zoo.load_hf and back through zoo.save_hf.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_hf
import zoo
from test_hf import TOL, _batch, _hf_logits, _max_diff, _perturbed, torch, transformers
from zoo.hf.common import Unsupported, read_rope, write_rope
from zoo.nn import positions
from conftest import tiny

HEAD_DIM = 16  # 8 frequencies: wavelengths 6 to 2e4 at theta 1e4
MAX_LEN = 32  # max_position_embeddings: a 24-token batch stays inside, so crossing needs ORIG
ORIG = 16  # the original length of llama3 / yarn / longrope, the max_len of dynamic

_SHORT = [1.0, 1.0, 1.1, 1.3, 1.8, 2.5, 3.0, 3.2]
_LONG = [1.0, 1.2, 1.7, 2.6, 4.0, 6.5, 9.0, 12.0]
# rope_type -> transformers-5 rope_parameters (the tiny model's max_position_embeddings is
# MAX_LEN, except dynamic: ORIG, the length its base starts growing past).
ROPES = {
    "linear": dict(rope_type="linear", rope_theta=500.0, factor=2.0),
    "llama3": dict(rope_type="llama3", rope_theta=1e4, factor=4.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=ORIG),
    "yarn": dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=ORIG,
                 beta_fast=8.0, beta_slow=0.5),
    "yarn-deepseek": dict(rope_type="yarn", rope_theta=1e4, factor=8.0, original_max_position_embeddings=ORIG,
                          beta_slow=0.25, mscale=1.0, mscale_all_dim=0.5, truncate=False),
    "yarn-attention-factor": dict(rope_type="yarn", rope_theta=1e4, factor=2.0,
                                  original_max_position_embeddings=ORIG, attention_factor=1.3),
    "longrope": dict(rope_type="longrope", rope_theta=1e4, short_factor=_SHORT, long_factor=_LONG,
                     original_max_position_embeddings=ORIG),
    "dynamic": dict(rope_type="dynamic", rope_theta=1e4, factor=3.0),
}


def _hf_config(name: str, **extra):
    max_len = ORIG if name == "dynamic" else MAX_LEN
    return transformers.LlamaConfig(
        vocab_size=test_hf.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=HEAD_DIM, intermediate_size=96, max_position_embeddings=max_len,
        rope_parameters=dict(ROPES[name]), tie_word_embeddings=False, **extra)


def _zoo_config(hf_config) -> zoo.Config:
    """The zoo config of a tiny Llama as load_hf reads it (only the RoPE part matters here)."""
    d = hf_config.to_dict()
    rope = read_rope(d, "llama")
    return tiny("tiny-decoder", d_model=64, num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM,
                max_len=d["max_position_embeddings"], **rope)


def _hf_tables(hf_config, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [B, T, rot/2] of a fresh transformers rotary module (its updates are stateful)."""
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.tensor(pos, dtype=torch.long))
    half = cos.shape[-1] // 2
    return cos.numpy()[..., :half], sin.numpy()[..., :half]


def _positions(length: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + length)[None, :].repeat(2, axis=0)


# --- tables against transformers' rotary module -----------------------------------------
@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("length", [ORIG, ORIG + 1, 3 * MAX_LEN])  # at, past the original; past max_len
def test_tables_match_transformers(name, length):
    """Inside and past the original length, so the dynamic and longrope updates both fire."""
    hf_config = _hf_config(name)
    cfg = _zoo_config(hf_config)
    pos = _positions(length)
    ref_cos, ref_sin = _hf_tables(hf_config, pos)
    tables = jax.jit(positions.rope_tables, static_argnums=(0, 1))(cfg, "global", jnp.asarray(pos))
    np.testing.assert_allclose(tables.cos, ref_cos, atol=2e-5, rtol=0)
    np.testing.assert_allclose(tables.sin, ref_sin, atol=2e-5, rtol=0)


def test_a_cached_step_uses_the_length_it_reaches():
    """One new position past the original length (a decoding step over a KV cache) switches
    longrope to its long factors and grows the dynamic base, as transformers does."""
    for name in ("longrope", "dynamic"):
        hf_config = _hf_config(name)
        cfg = _zoo_config(hf_config)
        for step in (ORIG - 1, ORIG, 2 * ORIG + 3):
            pos = np.array([[step], [step - 5]])
            ref_cos, _ = _hf_tables(hf_config, pos)
            np.testing.assert_allclose(positions.rope_tables(cfg, "global", jnp.asarray(pos)).cos, ref_cos,
                                       atol=2e-5, rtol=0)


# --- hand formulas ------------------------------------------------------------------------
def _inv(theta: float, i: int) -> float:
    return theta ** (-2 * i / HEAD_DIM)


def test_yarn_by_hand():
    cfg = _zoo_config(_hf_config("yarn"))  # factor 4, beta 8 / 0.5 over 16 positions, theta 1e4
    # dim turning beta times over 16 positions: 16 ln(16 / (2 pi beta)) / (2 ln 1e4)
    low = math.floor(16 * math.log(16 / (2 * math.pi * 8.0)) / (2 * math.log(1e4)))  # -1 -> 0
    high = math.ceil(16 * math.log(16 / (2 * math.pi * 0.5)) / (2 * math.log(1e4)))  # 2
    assert (max(low, 0), high) == (0, 2)
    inv = positions.rope_inv_freq(cfg)
    assert inv[0] == pytest.approx(1.0)  # ramp 0: kept
    assert inv[1] == pytest.approx(_inv(1e4, 1) * (0.5 / 4 + 0.5))  # ramp 1/2: half slowed
    np.testing.assert_allclose(inv[2:], [_inv(1e4, i) / 4 for i in range(2, 8)], rtol=1e-6)
    assert positions.rope_attention_factor(cfg) == pytest.approx(0.1 * math.log(4) + 1)
    deepseek = _zoo_config(_hf_config("yarn-deepseek"))
    assert positions.rope_attention_factor(deepseek) == pytest.approx(
        (0.1 * math.log(8) + 1) / (0.05 * math.log(8) + 1))


def test_longrope_by_hand():
    cfg = _zoo_config(_hf_config("longrope"))
    np.testing.assert_allclose(positions.rope_inv_freq(cfg), [_inv(1e4, i) / _SHORT[i] for i in range(8)],
                               rtol=1e-6)
    np.testing.assert_allclose(positions.rope_inv_freq(cfg, long=True),
                               [_inv(1e4, i) / _LONG[i] for i in range(8)], rtol=1e-6)
    # stretch 32 / 16 = 2 over 16 original positions
    assert positions.rope_attention_factor(cfg) == pytest.approx(math.sqrt(1 + math.log(2) / math.log(16)))
    # Phi-3-mini-128k: 131072 / 4096 = 32
    assert positions.longrope_attention_factor(32, 4096) == pytest.approx(math.sqrt(1 + 5 / 12))


def test_dynamic_by_hand():
    cfg = _zoo_config(_hf_config("dynamic"))  # factor 3, max_len 16, rot 16
    tables = positions.rope_tables(cfg, "global", jnp.asarray(_positions(40)))  # length 40
    base = 1e4 * (3 * 40 / 16 - 2) ** (16 / 14)
    assert float(tables.cos[0, 1, 3]) == pytest.approx(math.cos(base ** (-6 / 16)), abs=1e-6)
    inside = positions.rope_tables(cfg, "global", jnp.asarray(_positions(16)))
    assert float(inside.cos[0, 1, 3]) == pytest.approx(math.cos(_inv(1e4, 3)), abs=1e-6)


# --- Hugging Face configs -----------------------------------------------------------------
def _v4(rope: dict) -> dict:
    """The transformers-4.x form of a rope dict: rope_scaling with `type`, rope_theta outside."""
    d = {k: v for k, v in rope.items() if k != "rope_theta"}
    d["type"] = d.pop("rope_type")
    return d


@pytest.mark.parametrize("name", sorted(ROPES))
def test_read_rope_reads_both_forms_and_write_rope_inverts_it(name):
    d = _hf_config(name).to_dict()
    fields = read_rope(d, "llama")
    old = {"rope_scaling": _v4(ROPES[name]), "rope_theta": ROPES[name]["rope_theta"],
           "max_position_embeddings": d["max_position_embeddings"]}
    assert read_rope(old, "llama") == fields
    cfg = _zoo_config(_hf_config(name))
    assert read_rope({**write_rope(cfg), "max_position_embeddings": cfg.max_len}, "llama") == fields
    assert read_rope({"rope_theta": 5e5}, "llama") == dict(rope_theta=5e5, rope_fraction=1.0)


def test_phi3_reads_its_top_level_original_length():
    """Phi3Config prefers original_max_position_embeddings outside the rope dict and reads the
    legacy type names su / yarn as longrope."""
    head = 8
    d = dict(hidden_size=32, num_attention_heads=4, max_position_embeddings=131072,
             original_max_position_embeddings=8192,
             rope_scaling=dict(type="su", short_factor=[1.0] * (head // 2), long_factor=[2.0] * (head // 2),
                               original_max_position_embeddings=4096))
    fields = read_rope(d, "phi3")
    assert fields["rope_scaling"] == "longrope" and fields["rope_original_max_len"] == 8192
    hf = transformers.Phi3Config(**{**d, "rope_scaling": dict(d["rope_scaling"], type="longrope")})
    _, factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu")
    cfg = tiny("tiny-decoder", d_model=32, num_heads=4, max_len=131072, **fields)
    assert positions.rope_attention_factor(cfg) == pytest.approx(factor)
    explicit = read_rope({**d, "rope_scaling": dict(d["rope_scaling"], factor=8.0)}, "phi3")
    assert explicit["rope_attention_factor"] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(8192)))


def test_unknown_rope_type_is_one_clear_error(tmp_path):
    with pytest.raises(Unsupported, match=r"llama config field 'rope_parameters.rope_type': value 'mrope' "
                                          r"is not supported by zoo \(supported: \['default', "):
        read_rope({"rope_scaling": {"type": "mrope", "factor": 2.0}}, "llama")
    with pytest.raises(ValueError, match=r"rope_scaling.*'ntk'"):
        tiny("tiny-decoder", rope_scaling="ntk")


@pytest.mark.parametrize("changes, field", [
    (dict(rope_scaling="yarn"), "rope_scaling_factor"),
    (dict(rope_scaling="dynamic", rope_scaling_factor=0.5), "rope_scaling_factor"),
    (dict(rope_scaling="yarn", rope_scaling_factor=2.0, rope_beta_fast=0.5), "rope_beta_fast"),
    (dict(rope_scaling="yarn", rope_scaling_factor=2.0, rope_attention_factor=0.0), "rope_attention_factor"),
    (dict(rope_scaling="longrope", rope_short_factor=(1.0,) * 4, rope_long_factor=(0.0,) * 4),
     "rope_long_factor"),
])
def test_config_refuses_insane_rope_settings(changes, field):
    with pytest.raises(ValueError, match=field):
        tiny("tiny-decoder", **changes)  # head_dim 8: 4 frequencies


# --- logits through load_hf / save_hf ------------------------------------------------------
# name -> batch lengths; longrope and dynamic once inside the original length, once across it.
PARITY = {
    "yarn": (24, 17, 9),
    "longrope-inside": (ORIG, 11, 5),
    "longrope-across": (24, 17, 9),
    "dynamic-inside": (ORIG, 11, 5),
    "dynamic-across": (24, 17, 9),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_logit_parity_and_round_trip(case, tmp_path):
    torch.manual_seed(0)
    model = _perturbed(transformers.LlamaForCausalLM(_hf_config(case.split("-")[0])).eval())
    model.save_pretrained(tmp_path / "hf")
    cfg, params = zoo.load_hf(tmp_path / "hf")
    src, mask = _batch(cfg, PARITY[case])
    ref, _ = _hf_logits(model, src, mask)
    out = jax.jit(zoo.forward, static_argnums=1)(params, cfg, jnp.asarray(src), mask=jnp.asarray(mask))
    diff = _max_diff(out.logits, ref, mask)
    print(f"{case}: max |logit diff| {diff:.2e}")
    assert np.abs(ref[mask]).max() > 0.5 and diff <= TOL

    zoo.save_hf(cfg, params, tmp_path / "zoo")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    assert _max_diff(_hf_logits(back, src, mask)[0], ref, mask) <= 1e-6
    assert zoo.load_hf(tmp_path / "zoo")[0] == cfg


def test_save_ignores_the_fields_a_scaling_does_not_read(tmp_path):
    """A zoo config may carry settings its scaling never reads (yarn's betas on a dynamic
    model): save_hf writes the model, which reads back with those at their defaults."""
    cfg = tiny("tiny-decoder", rope_scaling="dynamic", rope_scaling_factor=2.0, rope_original_max_len=100,
               rope_beta_fast=5.0, rope_attention_factor=1.5)
    shapes = jax.eval_shape(lambda k: zoo.init(cfg, k), jax.random.key(0))
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    assert zoo.save_hf(cfg, params, tmp_path) == "llama"
    back = zoo.load_hf(tmp_path)[0]
    assert back == cfg.replace(rope_original_max_len=8192, rope_beta_fast=32.0, rope_attention_factor=None)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (a perturbed tiny transformers Llama with that rope, zoo cfg, zoo params)."""

    def get(name):
        torch.manual_seed(0)
        model = _perturbed(transformers.LlamaForCausalLM(_hf_config(name)).eval())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        return (model, *zoo.load_hf(path))

    return get


@pytest.mark.parametrize("name", ["longrope", "dynamic"])
def test_cached_step_logits_match_transformers(hf_models, name):
    """Logits of a 7-token prefill and 12 single-token steps over the KV cache, the steps
    crossing the original length, against transformers' cached forward."""
    from zoo import decoding

    model, cfg, params = hf_models(name)
    ids = np.random.default_rng(3).integers(3, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        out = model(torch.tensor(ids[:, :7]), use_cache=True)
        ref, past = [out.logits[:, -1].numpy()], out.cache
        for t in range(7, 18):
            out = model(torch.tensor(ids[:, t:t + 1]), cache=past, use_cache=True)
            ref.append(out.logits[:, -1].numpy())
    p = decoding.unstacked(params)
    cache = decoding.new_cache(cfg, 2, 19, decoding.Options(max_new_tokens=12))
    logits, cache = decoding.prefill(p, cfg, jnp.asarray(ids[:, :7]), None, cache)
    ours = [np.asarray(logits)]
    for t in range(7, 18):
        logits, cache = decoding.step(p, cfg, jnp.asarray(ids[:, t:t + 1]), cache)
        ours.append(np.asarray(logits[:, -1]))
    diff = float(np.abs(np.stack(ours) - np.stack(ref)).max())
    print(f"{name} cached steps: max |logit diff| {diff:.2e}")
    assert diff <= TOL
