"""Every input check at the public boundary, with its message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from conftest import tiny

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def decoder():
    cfg = tiny("tiny-decoder", positions="learned", max_len=16)
    return cfg, zoo.init(cfg, KEY)


def test_wrong_rank(decoder):
    cfg, params = decoder
    with pytest.raises(ValueError, match=r"tokens: expected rank 2 \[batch, length\], got shape \(5,\)"):
        zoo.decoder.forward(params, cfg, jnp.ones(5, jnp.int32))


def test_wrong_dtype(decoder):
    cfg, params = decoder
    with pytest.raises(ValueError, match="tokens: expected an integer dtype.*float32"):
        zoo.decoder.forward(params, cfg, jnp.ones((1, 5), jnp.float32))


def test_not_an_array(decoder):
    cfg, params = decoder
    with pytest.raises(ValueError, match="tokens: expected an int array"):
        zoo.decoder.forward(params, cfg, [[1, 2, 3]])


@pytest.mark.parametrize("bad", [-1, 128, 5000])
def test_token_out_of_vocabulary(decoder, bad):
    cfg, params = decoder
    toks = jnp.array([[1, 2, bad]], jnp.int32)
    with pytest.raises(ValueError, match=rf"tokens: token id {bad} is outside the vocabulary \[0, 128\)"):
        zoo.decoder.forward(params, cfg, toks)


def test_too_long(decoder):
    cfg, params = decoder
    with pytest.raises(ValueError, match="tokens: length 17 exceeds the model's max_len 16"):
        zoo.decoder.forward(params, cfg, jnp.ones((1, 17), jnp.int32))


def test_empty(decoder):
    cfg, params = decoder
    with pytest.raises(ValueError, match="tokens: expected at least one token"):
        zoo.decoder.forward(params, cfg, jnp.ones((1, 0), jnp.int32))


def test_mask_shape_and_dtype(decoder):
    cfg, params = decoder
    toks = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 5\) \(same as tokens\), got \(2, 4\)"):
        zoo.decoder.forward(params, cfg, toks, mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="mask: expected dtype bool"):
        zoo.decoder.forward(params, cfg, toks, mask=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"positions: expected shape \(2, 5\)"):
        zoo.decoder.forward(params, cfg, toks, positions=jnp.ones((5,), jnp.int32))


def test_encoder_and_encdec_arguments():
    cfg = tiny("tiny-encoder")
    params = zoo.init(cfg, KEY)
    with pytest.raises(ValueError, match=r"token_types: expected shape \(1, 3\)"):
        zoo.encoder.forward(params, cfg, jnp.ones((1, 3), jnp.int32), token_types=jnp.ones((1, 4), jnp.int32))
    cfg = tiny("tiny-encdec")
    params = zoo.init(cfg, KEY)
    src = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="src_mask: expected shape"):
        zoo.encdec.forward(params, cfg, src, src, src_mask=jnp.ones((2, 6), bool))
    with pytest.raises(ValueError, match="tgt: token id 999"):
        zoo.encdec.forward(params, cfg, src, jnp.full((2, 3), 999, jnp.int32))
    with pytest.raises(ValueError, match="tgt: batch 3 differs from src batch 2"):
        zoo.encdec.forward(params, cfg, src, jnp.ones((3, 3), jnp.int32))


def test_family_mismatch():
    cfg = tiny("tiny-encoder")
    params = zoo.init(cfg, KEY)
    with pytest.raises(ValueError, match="zoo.decoder.forward: cfg.family must be 'decoder', got 'encoder'"):
        zoo.decoder.forward(params, cfg, jnp.ones((1, 3), jnp.int32))


def test_init_needs_a_config():
    with pytest.raises(TypeError, match="cfg must be a zoo.Config"):
        zoo.init({"family": "decoder"}, KEY)


def test_checks_add_no_host_sync_under_jit(decoder):
    """Under jit the id check is skipped (values are abstract); shapes are still checked."""
    cfg, params = decoder
    f = jax.jit(lambda t: zoo.decoder.forward(params, cfg, t).logits)
    assert f(jnp.ones((1, 4), jnp.int32)).shape == (1, 4, 128)
    with pytest.raises(ValueError, match="tokens: expected rank 2"):
        f(jnp.ones((4,), jnp.int32))
    assert np.isfinite(np.asarray(f(jnp.full((1, 4), 200, jnp.int32)))).all()  # clamped gather, no NaN
