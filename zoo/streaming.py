"""Streaming past the context with attention sinks (StreamingLLM, Xiao et al. 2023).

`zoo.generate(params, cfg, prompt, max_new_tokens=N, sink_tokens=4, cache_window=W)` keeps
the first `sink_tokens` tokens and the `W` most recent ones (the current token included) in a
cache of sink_tokens + W slots (`zoo.nn.cache`, "streaming"), so a decoder generates
indefinitely in constant memory. Positions are assigned within the cache, as StreamingLLM
does: past sinks + W tokens, each step attends over the cached keys and values of the sinks
and the last W tokens at positions 0..sinks + W - 1, by their order, the query at the last.
RoPE keys are cached unrotated and rotated to their in-cache position on each read; ALiBi
and relative biases read the same positions. The cached states of deeper layers are those
computed when each token was fed, with the context it had then (StreamingLLM does not
recompute them), so only a one-layer model's step equals a fresh forward over
[sink tokens, last W tokens] (tests/test_streaming.py checks that identity).
`cache_window` without `sink_tokens` is the window-only baseline.

Learned and sinusoidal position tables are refused: they add each token's absolute position
to its embedding, which every cached key and value of every layer carries, so no position can
be reassigned within the cache. Encoder-decoder and latent-attention (MLA) models are refused
too; models with sliding-window layers stream when cache_window >= their window.

`token_losses` is the teacher-forced measurement: every token fed through such a cache, the
loss of each next token recorded (bench/streaming.py plots sinks vs window-only vs full).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import Config
from zoo.decoding import feed, layout, unstacked
from zoo.nn import cache as kv_cache
from zoo.nn.backend import resolve
from zoo.nn.checks import TABLE_POSITIONS
from zoo.nn.embeddings import vocab_logits


def check(cfg: Config, sink_tokens: int | None, cache_window: int | None) -> tuple[int, int | None]:
    """Validates generate's streaming arguments -> (sinks, window), (0, None) when off."""
    if cache_window is None:
        if sink_tokens is not None:
            raise ValueError(f"sink_tokens={sink_tokens!r}: needs cache_window (the recent tokens "
                             "kept beside the sinks)")
        return 0, None
    _check_count("cache_window", cache_window)
    if sink_tokens is not None:
        _check_count("sink_tokens", sink_tokens)
    sinks = sink_tokens or 0
    if cache_window <= sinks:
        raise ValueError(f"cache_window: expected more than sink_tokens={sinks}, got {cache_window}")
    if cfg.family != "decoder":
        raise ValueError(f"cache_window: streaming needs the decoder family, got cfg.family={cfg.family!r}")
    if cfg.positions in TABLE_POSITIONS:
        raise ValueError(f"cache_window: cfg.positions={cfg.positions!r} adds absolute positions to "
                         "the embeddings, which every cached key carries, so the cache cannot "
                         "reassign them; streaming needs rope, alibi, relative or none")
    kinds = {cfg.layer_kind(i) for i in range(cfg.num_layers)}
    kv_cache.check_stream(cfg, (sinks, cache_window), 1, kinds)
    return sinks, cache_window


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def token_losses(params: dict, cfg: Config, tokens: jax.Array, *, sink_tokens: int | None = None,
                 cache_window: int | None = None) -> jax.Array:
    """Teacher-forced next-token losses of tokens [B, T] -> fp32 [B, T - 1] (nats; entry t
    is -log p(tokens[t + 1] | what token t saw)). With cache_window the tokens stream
    through a sinks + window cache one at a time (past the first sinks + window); without,
    full attention over all T."""
    sinks, window = check(cfg, sink_tokens, cache_window)
    return _losses(params, jnp.asarray(tokens, jnp.int32), cfg=cfg,
                   stream=None if window is None else (sinks, window))


@functools.partial(jax.jit, static_argnames=("cfg", "stream"))
def _losses(params: dict, tokens: jax.Array, *, cfg: Config,
            stream: tuple[int, int] | None) -> jax.Array:
    params = unstacked(params)
    cache = kv_cache.init(cfg, tokens.shape[0], tokens.shape[1], per_layer=True, stream=stream)
    hidden, _, _ = feed(params, layout(cfg), tokens, cache)
    logits = vocab_logits(params, hidden[:, :-1], resolve(cfg)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
