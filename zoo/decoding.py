"""One interface over the decoder and encdec families for the decoding loops in
`zoo.generate`, `zoo.beam_search` and `zoo.speculative`:

    params = unstacked(params)                                          # once per call
    cache = new_cache(cfg, batch, reach, options)
    logits, cache = prefill(params, cfg, prompt, prompt_mask, cache)   # [B, V]: first new token
    logits, cache = step(params, cfg, tokens, cache)                  # tokens [B, T] -> [B, T, V]
    hidden, mask, cache = prefill_hidden(...); hidden, cache = step_hidden(...)  # the states

For a decoder the prompt is the start of the sequence (left-aligned here, so every row's last
prompt token is in the last column); for encdec the prompt is the source: the encoder runs once,
its keys/values are cached, and decoding starts from `cfg.decoder_start_id`, or from a forced
decoder prompt `start` [B, P] (Whisper's <|startoftranscript|><|en|><|transcribe|>...) that the
functions below take as their last argument.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo import encdec
from zoo.config import Config
from zoo.logits import Penalties
from zoo.model import cached_hidden
from zoo.nn import cache as kv_cache
from zoo.nn.attention import fuse_qkv
from zoo.nn.backend import resolve
from zoo.nn.embeddings import vocab_logits
from zoo.nn.mlp import fuse_gate
from zoo.nn.transformer import unstack_layers
from zoo.sampling import Sampler


class Options(NamedTuple):
    """Static settings of one generate call (hashable: a jit static argument)."""

    max_new_tokens: int
    sampler: Sampler = Sampler()
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0  # written after a row's stop token (generate.filler)
    cache_len: int | None = None  # slots to reach; None: just what the call needs
    quantize: bool = False  # int8 cache
    num_beams: int = 1
    length_penalty: float = 1.0
    num_speculative: int = 0  # draft tokens per round; 0: no draft model
    penalties: Penalties = Penalties()  # repetition / n-gram / min-new-tokens (zoo.logits)
    contrastive_k: int = 0  # contrastive search over this many candidates; 0: off
    penalty_alpha: float = 0.0  # contrastive search's weight of the degeneration penalty
    sink_tokens: int = 0  # streaming (zoo.streaming): first tokens kept past the window
    cache_window: int | None = None  # streaming: recent tokens kept; None: a plain cache


def reach(cfg: Config, prompt_len: int, opts: Options, start_len: int = 1) -> int:
    """Tokens the cache must hold: the prompt (decoder) or the start_len decoder-prompt
    tokens (encdec: the start token, or `start`), every new token but the last (contrastive
    search feeds the last too), and the draft tokens a speculative round may add."""
    fed = (prompt_len if cfg.family == "decoder" else start_len) + opts.max_new_tokens - 1
    return fed + opts.num_speculative + (opts.contrastive_k > 0)


def unstacked(params: dict) -> dict:
    """params in the decoding layout (`Config.layout="decoding"`, which `prefill` and `step`
    set): the decoder stack's layers split apart (`unstack_layers`), each self-attention's
    q, k, v fused into one matrix (`fuse_qkv`) and each gated MLP's gate and input matrices
    into one (`fuse_gate`). The decoding loops run the layers unrolled over per-layer caches
    (`new_cache`), so no token step copies a layer's weights or cache out of a stack. Costs
    one copy of the decoder weights; a tree already in this layout is returned as is."""
    if isinstance(params["decoder"]["layers"], tuple):  # converted by the caller already
        return params
    stack = unstack_layers(params["decoder"])
    stack["layers"] = tuple(_fused(layer) for layer in stack["layers"])
    return {**params, "decoder": stack}


def _fused(layer: dict) -> dict:
    # MLA (zoo.nn.mla) has no q/k/v to fuse: its decoding reads the latent cache as is.
    out = {**layer, "attn": fuse_qkv(layer["attn"]) if "kv_a" not in layer["attn"] else layer["attn"]}
    if "mlp" in layer:
        out["mlp"] = fuse_gate(layer["mlp"])
    if "shared" in layer.get("moe", {}):  # the shared experts run as a dense MLP (zoo.nn.moe)
        out["moe"] = {**layer["moe"], "shared": fuse_gate(layer["moe"]["shared"])}
    return out


def layout(cfg: Config) -> Config:
    """The config that runs `unstacked` parameters."""
    return cfg.replace(layout="decoding")


def new_cache(cfg: Config, batch: int, length: int, opts: Options) -> kv_cache.Cache:
    """An empty per-layer cache for `unstacked` parameters."""
    chunk = opts.num_speculative + 1
    stream = None if opts.cache_window is None else (opts.sink_tokens, opts.cache_window)
    return kv_cache.init(cfg, batch, length, quantize=opts.quantize, chunk=chunk, per_layer=True,
                         stream=stream)


def left_align(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens (mask True, order kept) to the right end: [B, T] each."""
    order = jnp.argsort(mask, axis=1, stable=True)  # False (padding) first
    return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def decoder_prompt(cfg: Config, prompt: jax.Array, prompt_mask: jax.Array | None,
                   start: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """What the decoder is fed first: the prompt left-aligned (decoder) or, for encdec, the
    forced decoder prompt start [B, P] (default: the start token), with its mask ->
    (tokens [B, T'], mask [B, T'] or None: all real)."""
    if cfg.family == "encdec":
        if start is not None:
            return start.astype(jnp.int32), None
        return jnp.full((prompt.shape[0], 1), cfg.decoder_start_id, jnp.int32), None
    if prompt_mask is not None:
        return left_align(prompt, prompt_mask)
    return prompt, None


def history(cfg: Config, prompt: jax.Array, prompt_mask: jax.Array | None,
            start: jax.Array | None = None) -> jax.Array:
    """The tokens seen before the first new one, as `zoo.logits` reads them: int32 [B, T'],
    -1 on padding."""
    tokens, mask = decoder_prompt(cfg, prompt, prompt_mask, start)
    tokens = tokens.astype(jnp.int32)
    return tokens if mask is None else jnp.where(mask, tokens, -1)


def prefill_hidden(params: dict, cfg: Config, prompt: jax.Array, prompt_mask: jax.Array | None,
                   cache: kv_cache.Cache, start: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array | None, kv_cache.Cache]:
    """Feeds the prompt [B, T] (encdec: the source, tokens or features, and the decoder prompt
    start [B, P] or None) -> (last hidden states of what the decoder was fed [B, T', D], their
    mask [B, T'] or None (all real; see `decoder_prompt`), cache)."""
    if cfg.family == "encdec":
        cache, _ = encdec.prime_cache(params, layout(cfg), cache, prompt, prompt_mask)
    prompt, prompt_mask = decoder_prompt(cfg, prompt, prompt_mask, start)
    hidden, _, cache = feed(params, layout(cfg), prompt, cache, prompt_mask)
    return hidden, prompt_mask, cache


def feed(params: dict, cfg: Config, tokens: jax.Array, cache: kv_cache.Cache,
         mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, kv_cache.Cache]:
    """`zoo.model.cached_hidden` of a chunk tokens [B, T] (mask [B, T]) into a cache that holds
    none yet. A streaming cache takes its first sinks + window columns at once and the rest
    one column at a time (a `lax.scan`), as each token past them sees its own window.
    Returns (hidden [B, T, D], MoE loss, cache)."""
    head = sum(cache.stream) if cache.stream is not None else tokens.shape[1]
    cut = lambda a, start, stop: None if a is None else a[:, start:stop]
    hidden, aux, cache = cached_hidden(params, cfg, tokens[:, :head], cache, cut(mask, 0, head))
    if tokens.shape[1] <= head:
        return hidden, aux, cache

    def one(cache: kv_cache.Cache, column: tuple) -> tuple[kv_cache.Cache, jax.Array]:
        token, valid = column  # [B], [B] or None
        h, _, cache = cached_hidden(params, cfg, token[:, None], cache,
                                    None if valid is None else valid[:, None])
        return cache, h[:, 0]

    rest = cut(mask, head, None)
    cache, tail = jax.lax.scan(one, cache, (tokens[:, head:].T, None if rest is None else rest.T))
    return jnp.concatenate([hidden, jnp.swapaxes(tail, 0, 1)], axis=1), aux, cache


def prefill(params: dict, cfg: Config, prompt: jax.Array, prompt_mask: jax.Array | None,
            cache: kv_cache.Cache, start: jax.Array | None = None) -> tuple[jax.Array, kv_cache.Cache]:
    """Feeds the prompt [B, T] (and an encdec decoder prompt start [B, P]) -> (logits of the
    first new token [B, V] fp32, cache)."""
    hidden, _, cache = prefill_hidden(params, cfg, prompt, prompt_mask, cache, start)
    return logits(params, cfg, hidden[:, -1:])[:, 0], cache


def step_hidden(params: dict, cfg: Config, tokens: jax.Array,
                cache: kv_cache.Cache) -> tuple[jax.Array, kv_cache.Cache]:
    """Feeds tokens [B, T] after the cached ones -> (last hidden states [B, T, D], cache)."""
    hidden, _, cache = cached_hidden(params, layout(cfg), tokens, cache)
    return hidden, cache


def step(params: dict, cfg: Config, tokens: jax.Array,
         cache: kv_cache.Cache) -> tuple[jax.Array, kv_cache.Cache]:
    """Feeds tokens [B, T] after the cached ones -> (logits [B, T, V] fp32, cache)."""
    hidden, cache = step_hidden(params, cfg, tokens, cache)
    return logits(params, cfg, hidden), cache


def logits(params: dict, cfg: Config, hidden: jax.Array) -> jax.Array:
    """The vocabulary projection of hidden states [B, T, D] -> fp32 logits [B, T, V]."""
    return vocab_logits(params, hidden, resolve(cfg)).astype(jnp.float32)


def is_stop(tokens: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
    """tokens [...] -> bool [...], True on a stop token."""
    if not stop_tokens:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32))


def pad_after_stop(tokens: jax.Array, stop_tokens: tuple[int, ...], pad_id: int) -> jax.Array:
    """tokens [B, N]: everything after each row's first stop token becomes pad_id."""
    stops = is_stop(tokens, stop_tokens).astype(jnp.int32)
    after = (jnp.cumsum(stops, axis=1) - stops) > 0
    return jnp.where(after, pad_id, tokens)
