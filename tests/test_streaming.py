"""Streaming past the context with attention sinks (zoo.streaming, StreamingLLM): while the
text fits, a streaming cache decodes exactly as a plain one; past sinks + window, each step's
logits are a fresh forward's over [sink tokens, last window tokens] with positions 0..n-1;
the cache stays one size however long the call; bad settings are ValueErrors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import decoding
from zoo.nn import cache as kv_cache
from conftest import tiny, tokens

KEY = jax.random.key(0)
FWD = jax.jit(zoo.decoder.forward, static_argnums=1)


@jax.jit
def _unstacked(params):
    return decoding.unstacked(params)


def _stream_logits(params, cfg, toks, sinks, window):
    """toks [B, T] fed through a (sinks, window) streaming cache -> logits [B, T, V]."""
    @jax.jit
    def run(params, toks):
        cache = kv_cache.init(cfg, toks.shape[0], toks.shape[1], per_layer=True, stream=(sinks, window))
        hidden, _, _ = decoding.feed(params, decoding.layout(cfg), toks, cache)
        return zoo.model.logits(params, cfg, hidden)
    return run(_unstacked(params), toks)


def _reference(params, cfg, toks, sinks, window, t):
    """Logits [B, V] of token t by the StreamingLLM definition for a one-layer model: a full
    forward over the sink tokens and the last `window` tokens up to t, at positions 0..n-1.
    (Deeper layers' cached keys were computed when their token was fed, with the context it
    had then, which this forward does not recompute: the identity holds for one layer.)"""
    if t < sinks + window:
        return FWD(params, cfg, toks[:, :sinks + window]).logits[:, t]
    kept = jnp.concatenate([toks[:, :sinks], toks[:, t - window + 1:t + 1]], axis=1)
    return FWD(params, cfg, kept).logits[:, -1]


@pytest.mark.parametrize("overrides,sinks", [
    ({}, 2),                                   # rope, GQA 4:2
    ({}, 0),                                   # window only (cache_window without sink_tokens)
    (dict(positions="alibi"), 2),
    (dict(attn_sinks=True), 2),                # gpt-oss's learned sinks
])
def test_steps_past_the_window_equal_a_forward_over_sinks_and_window(overrides, sinks):
    cfg = tiny("tiny-decoder", num_layers=1, **overrides)
    params = zoo.init(cfg, KEY)
    window, length = 6, 18  # the last 10 tokens each drop earlier ones
    toks = tokens(jax.random.key(1), 2, length)
    got = _stream_logits(params, cfg, toks, sinks, window)
    for t in range(length):
        want = _reference(params, cfg, toks, sinks, window, t)
        np.testing.assert_allclose(got[:, t], want, atol=2e-5, err_msg=f"token {t}")


def test_pattern_model_streams_its_prompt_as_token_steps():
    """gpt-oss's layout (learned sinks, local and global layers): a prompt longer than
    sinks + window, fed at once (`decoding.feed`), gives the logits of feeding it one token
    at a time."""
    cfg = tiny("tiny-decoder", attn_sinks=True, layer_pattern=("local", "global"), sliding_window=4)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(4), 2, 14)
    at_once = _stream_logits(params, cfg, toks, 2, 6)
    p, lc = _unstacked(params), decoding.layout(cfg)
    step = jax.jit(lambda p, tok, cache: zoo.model.cached_hidden(p, lc, tok, cache))
    cache = kv_cache.init(cfg, 2, 14, per_layer=True, stream=(2, 6))
    hidden = []
    for t in range(14):
        h, _, cache = step(p, toks[:, t:t + 1], cache)
        hidden.append(h)
    stepped = zoo.model.logits(p, cfg, jnp.concatenate(hidden, axis=1))
    np.testing.assert_allclose(at_once, stepped, atol=2e-5)


def test_while_it_fits_streaming_generates_as_a_plain_cache():
    """Ragged prompts (left padding never takes a sink slot), greedy: 5 + 10 tokens fit in
    2 sinks + 16."""
    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, KEY)
    prompt = tokens(jax.random.key(2), 2, 5)
    mask = jnp.array([[True] * 5, [False, False, True, True, True]])
    kw = dict(prompt_mask=mask, stop_tokens=())
    plain = zoo.generate(params, cfg, prompt, 10, **kw)
    streamed = zoo.generate(params, cfg, prompt, 10, sink_tokens=2, cache_window=16, **kw)
    np.testing.assert_array_equal(streamed, plain)


def test_ragged_rows_stream_as_they_would_alone():
    """Past the window, each row of a left-padded batch keeps its own sinks (slots by
    position, not by column): its logits are those of the row fed alone."""
    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(3), 2, 16)
    mask = jnp.array([[True] * 16, [False] * 5 + [True] * 11])

    @jax.jit
    def run(params, toks, mask):
        cache = kv_cache.init(cfg, toks.shape[0], toks.shape[1], per_layer=True, stream=(2, 5))
        hidden, _, _ = decoding.feed(params, decoding.layout(cfg), toks, cache, mask)
        return zoo.model.logits(params, cfg, hidden)

    p = _unstacked(params)
    both = run(p, toks, mask)
    alone = run(p, toks[1:, 5:], None)
    np.testing.assert_allclose(both[1, 5:], alone[0], atol=2e-5)
    np.testing.assert_allclose(both[:1], run(p, toks[:1], None), atol=2e-5)


def test_cache_memory_is_constant_past_max_len():
    cfg = tiny("tiny-decoder", layer_pattern=("local", "global"), sliding_window=4)
    opts = lambda n: decoding.Options(max_new_tokens=n, sink_tokens=4, cache_window=12)
    size = lambda n: kv_cache.nbytes(decoding.new_cache(cfg, 1, decoding.reach(cfg, 8, opts(n)), opts(n)))
    per_slot = 2 * cfg.kv_heads * cfg.head_size * 4  # keys and values, fp32
    assert size(10) == size(10_000) == (4 + 12 + 4) * per_slot  # global: 4 + 12, local: 4
    params = zoo.init(cfg, KEY)
    out = zoo.generate(params, cfg, tokens(KEY, 1, 8), cfg.max_len + 8, stop_tokens=(),
                       sink_tokens=4, cache_window=12)
    assert out.shape == (1, cfg.max_len + 8)


@pytest.mark.parametrize("overrides,kw,match", [
    ({}, dict(sink_tokens=4), "sink_tokens=4: needs cache_window"),
    ({}, dict(sink_tokens=4, cache_window=4), "cache_window: expected more than sink_tokens=4"),
    ({}, dict(cache_window=0), r"cache_window: expected an int >= 1, got 0"),
    ({}, dict(sink_tokens=-1, cache_window=8), r"sink_tokens: expected an int >= 1, got -1"),
    (dict(positions="learned"), dict(cache_window=8), "cfg.positions='learned'"),
    (dict(layer_pattern=("local", "global"), sliding_window=16), dict(cache_window=8),
     "smaller than the local layers' cfg.sliding_window=16"),
    ({}, dict(cache_window=8, cache_len=64), "cache_len=64"),
])
def test_bad_streaming_settings(overrides, kw, match):
    cfg = tiny("tiny-decoder", **overrides)
    with pytest.raises(ValueError, match=match):
        zoo.generate({}, cfg, tokens(KEY, 1, 4), 4, **kw)


def test_encdec_does_not_stream():
    with pytest.raises(ValueError, match="cfg.family='encdec'"):
        zoo.generate({}, tiny("tiny-encdec", decoder_start_id=0), tokens(KEY, 1, 4), 4, cache_window=8)
