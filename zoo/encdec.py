"""Encoder-decoder family (T5, BART, Whisper): bidirectional encoder, causal decoder with
cross-attention, shared token embeddings.

src -> embed -> scan(encoder layer) -> norm = memory
tgt -> embed -> scan(causal layer + cross-attention over memory) -> norm -> head

With `Config.num_mel_bins` set (Whisper) the encoder reads float log-mel features
[B, num_mel_bins, 2 S] through a convolutional stem (`zoo.nn.stem`) instead of token ids; the
encoder stack has its own positions and table size (`Config.encoder_stack`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.attention import project_kv
from zoo.nn.backend import resolve
from zoo.nn.cache import Cache, LayerKV, advance, cache_layout, with_cross
from zoo.nn.checks import check_mask, check_tokens
from zoo.nn.embeddings import embed_spec, embed_tokens, head_spec, vocab_logits
from zoo.nn.output import Output
from zoo.nn.param import Spec
from zoo.nn.stem import apply_stem, check_features, frames, stem_spec
from zoo.nn.transformer import (StackCache, cached_context, cached_positions, default_positions,
                                embed_for_stack, run_stack, self_context, stack_spec)


def spec(cfg: Config) -> Spec:
    encoder = stack_spec(cfg.encoder_stack, cfg.num_layers)
    if cfg.num_mel_bins is not None:
        encoder["stem"] = stem_spec(cfg)
    out = {"embed": embed_spec(cfg), "encoder": encoder,
           "decoder": stack_spec(cfg, cfg.decoder_layers, cross=True)}
    head = head_spec(cfg)
    if head:
        out["head"] = head
    return out


def encode(params: dict, cfg: Config, src: jax.Array, src_mask: jax.Array | None = None,
           key: jax.Array | None = None, remat: bool | str = False) -> tuple[jax.Array, jax.Array]:
    """src int [B, S], or float features [B, num_mel_bins, 2 S] when cfg.num_mel_bins is set
    (every frame read: no src_mask) -> (memory [B, S, D], MoE balance loss)."""
    cfg = resolve(cfg, encoder_rows(cfg, src)).replace(layout="stacked")  # decoding: the decoder only
    stack, enc = params["encoder"], cfg.encoder_stack
    if cfg.num_mel_bins is not None:
        check_features("src", src, cfg)
        if src_mask is not None:
            raise ValueError(f"src_mask: a feature encoder reads all {frames(cfg)} frames "
                             "(Whisper pads audio to its window); pass src_mask=None")
        x = apply_stem(stack["stem"], src, cfg)
    else:
        check_tokens("src", src, enc)
        check_mask("src_mask", src_mask, "src", src)
        x = embed_tokens(params["embed"], src, cfg)
    keys = jax.random.split(key) if key is not None else (None, None)
    positions = default_positions(x[:, :, 0], None)  # [B, S]
    x = embed_for_stack(stack, x, positions, enc, keys[0])
    ctx = self_context(stack, enc, positions, causal=False, valid=src_mask)
    hidden, aux, _ = run_stack(stack, x, ctx, enc, key=keys[1], remat=remat)
    return hidden, aux


def encoder_rows(cfg: Config, src: jax.Array | None) -> jax.Array | jax.ShapeDtypeStruct | None:
    """What `zoo.nn.backend.resolve` weighs for the encoder: src [B, S] itself, or for
    features [B, M, 2 S] the [B, S] positions the stack attends over."""
    if cfg.num_mel_bins is None or getattr(src, "ndim", 0) != 3:
        return src
    return jax.ShapeDtypeStruct((src.shape[0], src.shape[2] // 2), jnp.int32)


def cross_cache(params: dict, cfg: Config, memory: jax.Array) -> LayerKV | tuple[LayerKV, ...]:
    """Cross-attention keys/values of every decoder layer over memory [B, S, D], computed
    once in the cache layout (keys [B*K, S, H], values [B*K, H, S]): stacked on a leading
    [L] axis, or a tuple of layers for the decoding layout."""
    def one(p: dict) -> LayerKV:
        return LayerKV(*cache_layout(*project_kv(p, memory, cfg)))

    layers = params["decoder"]["layers"]
    if cfg.layout == "decoding":
        return tuple(one(p["cross"]) for p in layers)
    return jax.vmap(one)(layers["cross"])


def prime_cache(params: dict, cfg: Config, cache: Cache, src: jax.Array,
                src_mask: jax.Array | None = None) -> tuple[Cache, jax.Array]:
    """Runs the encoder once over src [B, S] (or features, as `encode` reads them) and stores
    the cross-attention keys/values in the cache. Returns (cache, memory [B, S, D])."""
    cfg = resolve(cfg)
    memory, _ = encode(params, cfg, src, src_mask)
    return with_cross(cache, cross_cache(params, cfg, memory), src_mask), memory


def decode(params: dict, cfg: Config, memory: jax.Array | None, tgt: jax.Array,
           src_mask: jax.Array | None = None, tgt_mask: jax.Array | None = None,
           key: jax.Array | None = None, remat: bool | str = False, cache: Cache | None = None) -> Output:
    """Decoder over tgt int [B, T] attending to memory [B, S, D] -> Output(logits [B, T, V]).

    With a primed cache (`prime_cache`), memory and src_mask are not needed: tgt continues
    the cached rows and Output.cache is the updated cache."""
    cfg = resolve(cfg, tgt, memory)
    check_tokens("tgt", tgt, cfg)
    check_mask("tgt_mask", tgt_mask, "tgt", tgt)
    if cache is not None:
        if cache.cross is None:
            raise ValueError("zoo.encdec.decode: the cache has no encoder keys/values; "
                             "fill it with zoo.encdec.prime_cache first")
        hidden, aux, cache = cached_hidden(params, cfg, tgt, cache, tgt_mask=tgt_mask, key=key)
        return Output(logits=vocab_logits(params, hidden, cfg), hidden=hidden, aux_loss=aux, cache=cache)
    keys = jax.random.split(key) if key is not None else (None, None)
    positions = default_positions(tgt, None)
    stack = params["decoder"]
    x = embed_for_stack(stack, embed_tokens(params["embed"], tgt, cfg), positions, cfg, keys[0])
    ctx = self_context(stack, cfg, positions, causal=True, valid=tgt_mask, memory=memory,
                       memory_valid=src_mask)
    hidden, aux, _ = run_stack(stack, x, ctx, cfg, key=keys[1], remat=remat, cross=True)
    return Output(logits=vocab_logits(params, hidden, cfg), hidden=hidden, aux_loss=aux)


def cached_hidden(params: dict, cfg: Config, tgt: jax.Array, cache: Cache, *,
                  tgt_mask: jax.Array | None = None, key: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array, Cache]:
    """A decoder chunk tgt [B, T] over a primed cache -> (hidden [B, T, D], MoE loss, cache)."""
    cfg = resolve(cfg)
    if cache.batch != tgt.shape[0]:
        raise ValueError(f"cache: batch {cache.batch} differs from tgt batch {tgt.shape[0]}")
    keys = jax.random.split(key) if key is not None else (None, None)
    positions = cached_positions(cache, tgt_mask, tgt.shape[1])
    stack = params["decoder"]
    x = embed_for_stack(stack, embed_tokens(params["embed"], tgt, cfg), positions, cfg, keys[0])
    ctx, slots = cached_context(stack, cfg, positions, tgt_mask, cache)
    hidden, aux, layers = run_stack(stack, x, ctx, cfg, key=keys[1], cache=StackCache(cache.kv, cache.cross),
                                    cross=True)
    return hidden, aux, advance(cache, layers.kv, slots, tgt.shape[1], tgt_mask)


def forward(params: dict, cfg: Config, src: jax.Array | None, tgt: jax.Array, *,
            src_mask: jax.Array | None = None, tgt_mask: jax.Array | None = None,
            key: jax.Array | None = None, remat: bool | str = False, cache: Cache | None = None) -> Output:
    """Sequence-to-sequence forward.

    src: int [B, S] encoder tokens, src_mask: bool [B, S] (or float features
    [B, num_mel_bins, 2 S] when cfg.num_mel_bins is set, no mask); tgt: int [B, T] decoder inputs
    (already shifted right), tgt_mask: bool [B, T]; key: dropout RNG.
    cache: a decoder cache (`zoo.init_cache`). An empty one is primed with the encoder's
    keys/values from src (the encoder runs once); a primed one skips the encoder (src may
    be None) and tgt continues the cached rows.
    Returns Output(logits [B, T, V], hidden [B, T, D], encoder_hidden [B, S, D], aux_loss,
    cache).
    """
    if cfg.family != "encdec":
        raise ValueError(f"zoo.encdec.forward: cfg.family must be 'encdec', got {cfg.family!r}")
    cfg = resolve(cfg, encoder_rows(cfg, src), tgt)
    if cache is not None:
        memory = None
        if cache.cross is None:
            if src is None:
                raise ValueError("zoo.encdec.forward: src is needed to prime an empty cache")
            cache, memory = prime_cache(params, cfg, cache, src, src_mask)
        out = decode(params, cfg, None, tgt, tgt_mask=tgt_mask, key=key, cache=cache)
        return out._replace(encoder_hidden=memory)
    if getattr(src, "ndim", 2) in (2, 3) and getattr(tgt, "ndim", 2) == 2 and src.shape[0] != tgt.shape[0]:
        raise ValueError(f"tgt: batch {tgt.shape[0]} differs from src batch {src.shape[0]}")
    keys = jax.random.split(key) if key is not None else (None, None)
    memory, enc_aux = encode(params, cfg, src, src_mask, keys[0], remat)
    out = decode(params, cfg, memory, tgt, src_mask, tgt_mask, keys[1], remat)
    return out._replace(encoder_hidden=memory, aux_loss=(enc_aux + out.aux_loss) / 2)
