"""Multi-head latent attention (zoo.nn.mla): the absorbed form equals the expanded one, the
cache holds only the latent and the shared rotated key, and decoding through it equals the
full forward (left padding, a ring-free cache, greedy generation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from conftest import tiny, tokens
from test_generate import _assert_greedy
from zoo.nn import cache as kv_cache
from zoo.nn.mla import attend_absorbed, attend_expanded, mla_scale

# A query bottleneck, values narrower than the keys, more heads than latent dims per head.
MLA = dict(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
           head_dim=12)


def _model(seed=0, **overrides):
    cfg = tiny("tiny-decoder", **{**MLA, **overrides})
    return cfg, zoo.init(cfg, jax.random.key(seed))


def test_absorbed_attention_equals_the_expanded_form():
    b, t, s, n, hn, r, c, hv = 2, 3, 7, 4, 8, 4, 16, 6
    ks = jax.random.split(jax.random.key(0), 5)
    q_nope, q_rope = jax.random.normal(ks[0], (b, t, n, hn)), jax.random.normal(ks[1], (b, t, n, r))
    lat, k_rope = jax.random.normal(ks[2], (b, s, c)), jax.random.normal(ks[3], (b, s, r))
    kv_b = jax.random.normal(ks[4], (c, n, hn + hv)) / 4
    mask = jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None] + 4
    mask = jnp.broadcast_to(mask, (b, t, s)).at[1, :, :2].set(False)
    expanded = attend_expanded(q_nope, q_rope, lat, k_rope, kv_b, mask, 0.3)
    absorbed = attend_absorbed(q_nope, q_rope, lat, k_rope, kv_b, mask, 0.3)
    assert expanded.shape == (b, t, n, hv)
    np.testing.assert_allclose(absorbed, expanded, atol=2e-5, rtol=1e-5)


def test_the_cache_stores_the_latent_and_one_rotated_key_per_token():
    cfg, _ = _model()
    cache = kv_cache.init(cfg, batch=3, length=10)
    assert isinstance(cache.kv, kv_cache.LatentKV)
    assert cache.kv.c.shape == (cfg.num_layers, 3, 10, cfg.kv_lora_rank)
    assert cache.kv.k_rope.shape == (cfg.num_layers, 3, 10, cfg.qk_rope_head_dim)
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * cfg.num_layers
    assert kv_cache.nbytes(cache) == 3 * 10 * per_token
    with pytest.raises(ValueError, match="quantize"):
        kv_cache.init(cfg, 1, 4, quantize=True)


def test_cached_decoding_equals_the_full_forward_with_left_padding():
    cfg, params = _model()
    seq = tokens(jax.random.key(1), 2, 9)
    mask = jnp.ones(seq.shape, bool).at[1, :3].set(False)  # row 1 left-padded
    full = zoo.forward(params, cfg, seq, mask=mask).logits
    out = zoo.forward(params, cfg, seq[:, :5], mask=mask[:, :5], cache=kv_cache.init(cfg, 2, 12))
    steps, cache = [out.logits], out.cache
    for i in range(5, 9):
        out = zoo.forward(params, cfg, seq[:, i:i + 1], cache=cache)
        steps.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(steps, 1)[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_the_argmax_of_the_full_forward():
    cfg, params = _model(q_lora_rank=None)
    params["head"]["kernel"] = params["head"]["kernel"] * 20  # sharp next-token choices
    prompt = tokens(jax.random.key(2), 2, 5)
    out = zoo.generate(params, cfg, prompt, 8, stop_tokens=())
    _assert_greedy(params, cfg, prompt, out)


def test_yarn_scale_correction():
    """DeepSeek's score scale: (Hn + R)**-0.5 * (0.1 mscale_all_dim ln(factor) + 1)**2."""
    cfg = tiny("tiny-decoder", **MLA, rope_scaling="yarn", rope_scaling_factor=40.0, rope_mscale=1.0,
               rope_mscale_all_dim=0.707, rope_original_max_len=32)
    assert mla_scale(cfg) == pytest.approx(12 ** -0.5 * (0.0707 * np.log(40.0) + 1) ** 2)
    assert mla_scale(cfg.replace(rope_mscale_all_dim=None, rope_mscale=None)) == pytest.approx(12 ** -0.5)
