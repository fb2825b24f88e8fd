"""Key/value caches for decoding.

A `Cache` is a pytree preallocated to a fixed number of slots R; only the K key/value heads
are stored (GQA, MQA), rows and heads merged in front: keys `[B*K, R, H]` and values
`[B*K, H, R]` (slots last). Both attention matmuls (q·K over H, p·V over R) are then batched
matmuls over one leading axis that find their contracted axis innermost, the operand layout
XLA's CPU matmuls read in place; any other order (or a reshape of the buffer in between)
makes XLA transpose or copy the whole cache on every step. The layers come in one of two
layouts, matching the parameters they run with:

- stacked, `LayerKV` with a leading `[layers]` axis: a layer's slice rides through the layer
  `lax.scan` as xs and comes back as ys (stacked parameters, the default);
- per layer, a tuple of `LayerKV` (`init(..., per_layer=True)`): each layer's
  buffer is updated in place by an unrolled layer loop. Decoding loops use this layout with
  unstacked parameters (`zoo.nn.transformer.unstack_layers`), because slicing a layer out of
  a stack copies it, and a per-token copy of every weight and cache costs more than the step.

Each slot remembers the integer position of the token in it (`positions [B, R]`, -1 where
empty or padding), and attention masks are built from positions (`attention_mask`), so one
rule serves plain caches, left-padded prompts, rewinds and ring buffers:

- a plain cache writes token n of the sequence into slot n (`dynamic_update_slice`);
- a sliding-window model keeps a ring of `window + chunk - 1` slots (token n -> slot n % R),
  so a chunk of up to `chunk` new tokens never overwrites a key that a query still sees.
  A longer chunk (the prompt) attends over the old slots and its own keys side by side and
  then keeps only its last R keys.

A model whose layers mix kinds (`Config.layer_pattern`, e.g. Gemma 3's five sliding-window
layers per global one) keeps one slot group per kind (`Cache.slots`): each "local" layer a
ring of its window, each "global" layer the full length, so the cache of a long context is
dominated by the few global layers. Such a cache is always per layer (buffers of two sizes
do not stack).

Slots written past the live length (rejected speculative tokens, after `rewind`) hold
positions beyond every later query until they are overwritten, so causality hides them.

A multi-head latent attention model (`Config.kv_lora_rank`, `zoo.nn.mla`) stores per token
and layer its latent and its shared rotated key instead (`LatentKV`: c [B, R, C] and k_rope
[B, R, R_rope]), kv_lora_rank + qk_rope_head_dim numbers, in the same slots and layouts.

A streaming cache (StreamingLLM: `init(..., stream=(sinks, window))`) keeps, in its global
layers, the first `sinks` tokens and the `window` most recent ones in sinks + window slots:
token p of a row goes to slot p if p < sinks, else to sinks + (p - sinks) % window (per row, by
position, so left padding never takes a sink slot), and its keys are stored before RoPE.
Positions are assigned within the cache: each read rotates the keys to their rank among the
attended ones (`stream_positions`), sinks 0..sinks-1 and the window after them, and the
query gets its own key's rank; ALiBi and relative biases read the same positions. So past
sinks + window tokens a step attends over the cached keys and values of the sinks and the
window as a forward over [sinks, last window tokens] at positions 0..n-1 would; as in
StreamingLLM, deeper layers' cached states are the ones computed when each token was fed
(with the context it had then), not recomputed. Local layers (`Config.layer_pattern`) keep
their own ring; their window must not exceed the streaming one. A chunk of more than one
token must end by position sinks + window - 1 (`zoo.decoding.feed` splits a longer prompt).

With `quantize=True` keys and values are int8 with one fp32 scale per token and head
(absmax over head_dim), which halves the memory of a bf16 cache (quarters an fp32 one).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from zoo.config import Config


class LayerKV(NamedTuple):
    """Keys k [B*K, R, H] and values v [B*K, H, R] (row-major over (B, K); with a leading
    [L] axis when stacked), in the compute dtype, or int8 with k_scale, v_scale [B*K, R]
    fp32."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


class LatentKV(NamedTuple):
    """An MLA layer's cache (`zoo.nn.mla`): latents c [B, R, C] and shared rotated keys
    k_rope [B, R, R_rope] (with a leading [L] axis when stacked), in the compute dtype."""

    c: jax.Array
    k_rope: jax.Array


class Plan(NamedTuple):
    """Where a chunk of `num_new` tokens goes; the same for every layer of one forward."""

    index: jax.Array  # [] int32: tokens written before this chunk (slots include padding)
    num_new: int
    size: int  # R
    ring: bool
    concat: bool  # attend over old slots + new keys, then keep the last R (long ring chunk)
    targets: jax.Array | None = None  # [B, T] slot of each new token per row (streaming; R: dropped)


@flax.struct.dataclass
class Slots:
    """The slots of one kind of layer: positions [B, R] int32 of the token in each slot (-1
    if empty or padding); ring: slots wrap around (a window shorter than the cache's reach);
    sinks: a streaming group's number of sink slots (None: not streaming; see the module doc)."""

    positions: jax.Array
    ring: bool = flax.struct.field(pytree_node=False, default=False)
    sinks: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def size(self) -> int:
        return self.positions.shape[1]


@flax.struct.dataclass
class Cache:
    """Decoding state of one model.

    kv: self-attention keys/values, LayerKV with a leading [L] axis (stacked) or a tuple of
        L LayerKV (per layer).
    slots: layer kind ("global" | "local", `Config.layer_kind`) -> its `Slots`; one entry
        unless the model mixes kinds.
    index: [] int32, tokens written so far (padding included); the next goes to index % R.
    lengths: [B] int32, real tokens seen per row: the position of the row's next token.
    cross: encdec cross-attention keys/values in the layout of kv (S source slots): LayerKV
        with a leading [L] axis or a tuple of L LayerKV, or None.
    cross_valid: [B, S] bool, the source mask, or None.
    """

    kv: LayerKV | tuple[LayerKV, ...]
    slots: dict[str, Slots]
    index: jax.Array
    lengths: jax.Array
    cross: LayerKV | tuple[LayerKV, ...] | None = None
    cross_valid: jax.Array | None = None

    @property
    def main(self) -> Slots:
        """The slots of the global layers (of the only kind, when there is one)."""
        return self.slots.get("global") or self.slots["local"]

    @property
    def size(self) -> int:
        return self.main.size

    @property
    def ring(self) -> bool:
        return self.main.ring

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def stream(self) -> tuple[int, int] | None:
        """(sinks, window) of a streaming cache, else None."""
        group = self.slots.get("global")
        return None if group is None or group.sinks is None else (group.sinks, group.size - group.sinks)

    @property
    def quantized(self) -> bool:
        return getattr(layer_kv(self.kv, 0), "k_scale", None) is not None

    @property
    def cross_len(self) -> int:
        """S, the source length of the cached cross-attention keys (a primed encdec cache)."""
        return layer_kv(self.cross, 0).k.shape[-2]


def is_stacked(kv: LayerKV | LatentKV | tuple) -> bool:
    """True for the stacked layout (LayerKV or LatentKV of [L, ...]), False for a tuple of layers."""
    return isinstance(kv, (LayerKV, LatentKV))


def layer_kv(kv: LayerKV | tuple[LayerKV, ...], i: int) -> LayerKV:
    """Layer i's keys/values from either layout."""
    return jax.tree.map(lambda a: a[i], kv) if is_stacked(kv) else kv[i]


def per_layer(kv: LayerKV | tuple[LayerKV, ...]) -> tuple[LayerKV, ...]:
    """Either layout as a tuple of layers (copies when it splits a stack)."""
    if not is_stacked(kv):
        return tuple(kv)
    return tuple(layer_kv(kv, i) for i in range(kv[0].shape[0]))


def stacked(kv: LayerKV | tuple[LayerKV, ...]) -> LayerKV:
    """Either layout as LayerKV of [L, ...]."""
    return kv if is_stacked(kv) else jax.tree.map(lambda *xs: jnp.stack(xs), *kv)


def slots_needed(cfg: Config, length: int, chunk: int = 1, kind: str = "global") -> tuple[int, bool]:
    """(R, ring) for a layer of `kind` whose cache must reach `length` tokens fed in chunks
    of <= `chunk`."""
    w = window(cfg, kind)
    if w is not None and w + chunk - 1 < length:
        return w + chunk - 1, True
    return length, False


def window(cfg: Config, kind: str) -> int | None:
    """The sliding window of a layer of `kind`, None for global attention."""
    return cfg.sliding_window if kind == "local" else None


def init(cfg: Config, batch: int, length: int, *, quantize: bool = False, chunk: int = 1,
         num_layers: int | None = None, per_layer: bool = False,
         stream: tuple[int, int] | None = None) -> Cache:
    """An empty cache that reaches `length` tokens (prompt included) for `batch` rows.

    chunk: the longest chunk fed after the first call (speculative decoding: k + 1); it
    sizes the rings of sliding-window layers. num_layers: default the decoder depth.
    per_layer: a tuple of per-layer buffers (for unstacked parameters) instead of a stack;
    always so for a model that mixes layer kinds.
    stream: (sinks, window): a streaming cache (module doc) whose global layers hold
    sinks + window slots whatever `length`; feed it one token at a time past the first chunk.
    """
    if batch < 1 or length < 1 or chunk < 1:
        raise ValueError(f"cache: batch, length and chunk must be >= 1, got {batch}, {length}, {chunk}")
    layers = num_layers or (cfg.decoder_layers if cfg.family == "encdec" else cfg.num_layers)
    kinds = [cfg.layer_kind(i) for i in range(layers)]
    sizes = {kind: slots_needed(cfg, length, chunk, kind) for kind in sorted(set(kinds))}
    if stream is not None:
        check_stream(cfg, stream, chunk, set(kinds))
        sizes["global"] = (sum(stream), True)
    per_layer = per_layer or len(sizes) > 1
    if cfg.mla and quantize:
        raise ValueError("cache: quantize=True is not supported for the latent cache of MLA (Config.kv_lora_rank)")

    def buffers(size: int, lead: tuple[int, ...]) -> LayerKV | LatentKV:
        if cfg.mla:  # one latent and one rotated key per token, no heads
            dt = jnp.dtype(cfg.dtype)
            return LatentKV(jnp.zeros((*lead, size, cfg.kv_lora_rank), dt),
                            jnp.zeros((*lead, size, cfg.qk_rope_head_dim), dt))
        k_shape, v_shape = (*lead, size, cfg.head_size), (*lead, cfg.head_size, size)
        if quantize:
            scales = jnp.zeros((*lead, size), jnp.float32)
            return LayerKV(jnp.zeros(k_shape, jnp.int8), jnp.zeros(v_shape, jnp.int8), scales, scales)
        dt = jnp.dtype(cfg.dtype)
        return LayerKV(jnp.zeros(k_shape, dt), jnp.zeros(v_shape, dt))

    rows = batch if cfg.mla else batch * cfg.kv_heads
    if per_layer:
        kv = tuple(buffers(sizes[kind][0], (rows,)) for kind in kinds)
    else:
        kv = buffers(sizes[kinds[0]][0], (layers, rows))
    sinks = lambda kind: stream[0] if stream is not None and kind == "global" else None
    slots = {kind: Slots(jnp.full((batch, size), -1, jnp.int32), ring, sinks(kind))
             for kind, (size, ring) in sizes.items()}
    return Cache(kv=kv, slots=slots, index=jnp.zeros((), jnp.int32),
                 lengths=jnp.zeros((batch,), jnp.int32))


def check_stream(cfg: Config, stream: tuple[int, int], chunk: int, kinds: set[str]) -> None:
    """What a streaming cache needs of the model (ValueErrors name the setting)."""
    sinks, window_ = stream
    if "global" not in kinds:
        raise ValueError(f"cache_window: every layer of this model is a sliding-window layer "
                         f"(cfg.sliding_window={cfg.sliding_window}), whose cache is constant in size "
                         "already; generate without cache_window")
    if cfg.mla:
        raise ValueError("cache_window: streaming is not supported for multi-head latent attention "
                         "(cfg.kv_lora_rank), whose cached keys carry their rotation")
    if "local" in kinds and cfg.sliding_window > window_:
        raise ValueError(f"cache_window: {window_} is smaller than the local layers' "
                         f"cfg.sliding_window={cfg.sliding_window}; expected cache_window >= it")
    if chunk != 1:
        raise ValueError(f"cache: a streaming cache takes one token per step after the first "
                         f"chunk, got chunk={chunk} (speculative decoding)")


def plan(cache: Cache, kind: str, num_new: int, window_: int | None,
         new_positions: jax.Array | None = None) -> Plan:
    """How a chunk of num_new tokens (at new_positions [B, T], -1 on padding) is written into
    the slots of `kind`: a ring chunk longer than the slack past the window (a prompt) would
    overwrite keys its own first queries need, so it is concatenated; a streaming group
    writes each row's tokens at the slots of their positions."""
    slots = cache.slots[kind]
    if slots.sinks is not None:
        return Plan(cache.index, num_new, slots.size, True, False, _stream_targets(slots, new_positions))
    concat = slots.ring and window_ is not None and num_new > slots.size - window_ + 1
    return Plan(cache.index, num_new, slots.size, slots.ring, concat)


def _stream_targets(slots: Slots, new_positions: jax.Array) -> jax.Array:
    """[B, T] positions -> slots of a streaming group: sinks in place, the rest a ring after
    them; padding (-1) goes to slot R, which writes drop."""
    s, w = slots.sinks, slots.size - slots.sinks
    ring = s + jnp.maximum(new_positions - s, 0) % w
    return jnp.where(new_positions < 0, slots.size, jnp.where(new_positions < s, new_positions, ring))


def stream_positions(cache: Cache, q_pos: jax.Array, k_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Query positions [B, T] and key positions [B, S] (of the tokens) -> the positions
    attention gives them: as they are, except in a streaming cache past sinks + window
    tokens, where the window's keys and the queries move down by the same shift so that
    the attended keys are ranked 0..sinks + window - 1 (StreamingLLM)."""
    if cache.stream is None:
        return q_pos, k_pos
    sinks, window_ = cache.stream
    shift = jnp.maximum(jnp.max(q_pos, axis=1, keepdims=True) - (sinks + window_ - 1), 0)
    return q_pos - shift, jnp.where(k_pos < sinks, k_pos, k_pos - shift)


# --- int8 -------------------------------------------------------------------------------
def quantize(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """x -> (int8 like x, fp32 scale without `axis`) with x ~= q * scale (absmax over axis)."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=axis) / 127.0
    q = jnp.round(xf / jnp.expand_dims(jnp.where(scale == 0, 1.0, scale), axis))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype: jnp.dtype, axis: int = -1) -> jax.Array:
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axis)).astype(dtype)


# --- writing ----------------------------------------------------------------------------
def _write(buf: jax.Array, new: jax.Array, p: Plan, axis: int) -> jax.Array:
    """buf <- new at the plan's slots along the slot axis (R in buf, T in new)."""
    t = new.shape[axis]
    if p.targets is not None:
        return _write_rows(buf, new, p.targets, axis)
    at = lambda idx: buf.at[(slice(None),) * axis + (idx,)]
    if p.concat:
        keep = min(t, p.size)
        slots = (p.index + t - keep + jnp.arange(keep)) % p.size
        return at(slots).set(jax.lax.slice_in_dim(new, t - keep, t, axis=axis))
    if not p.ring:
        return jax.lax.dynamic_update_slice_in_dim(buf, new, p.index, axis=axis)
    if t == 1:
        return jax.lax.dynamic_update_slice_in_dim(buf, new, p.index % p.size, axis=axis)
    return at((p.index + jnp.arange(t)) % p.size).set(new)


def _write_rows(buf: jax.Array, new: jax.Array, targets: jax.Array, axis: int) -> jax.Array:
    """buf [rows, ...] <- new at each row's own slots targets [B, T] (rows = B * K, row-major
    over (B, K); out-of-range targets are dropped)."""
    rows = buf.shape[0]
    slots = jnp.repeat(targets, rows // targets.shape[0], axis=0)
    r = jnp.arange(rows)[:, None]
    if axis == 1:
        return buf.at[r, slots].set(new, mode="drop")
    return buf.at[r, :, slots].set(jnp.swapaxes(new, 1, 2), mode="drop")  # values [rows, H, R]


def _store(layer: LayerKV, k: jax.Array, v: jax.Array, p: Plan) -> LayerKV:
    """k [B*K, T, H], v [B*K, H, T] into the layer's slots."""
    if layer.k_scale is None:
        return LayerKV(_write(layer.k, k.astype(layer.k.dtype), p, 1),
                       _write(layer.v, v.astype(layer.v.dtype), p, 2))
    (qk, sk), (qv, sv) = quantize(k), quantize(v, axis=1)
    return LayerKV(_write(layer.k, qk, p, 1), _write(layer.v, qv, p, 2),
                   _write(layer.k_scale, sk, p, 1), _write(layer.v_scale, sv, p, 1))


def _read(layer: LayerKV, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    if layer.k_scale is None:
        return layer.k.astype(dtype), layer.v.astype(dtype)
    return (dequantize(layer.k, layer.k_scale, dtype),
            dequantize(layer.v, layer.v_scale, dtype, axis=-2))


def cache_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys, values [B, T, K, H] -> keys [B*K, T, H], values [B*K, H, T]."""
    b, t, kv, h = k.shape
    return (jnp.swapaxes(k, 1, 2).reshape(b * kv, t, h),
            jnp.transpose(v, (0, 2, 3, 1)).reshape(b * kv, h, t))


def update(layer: LayerKV, k: jax.Array, v: jax.Array, p: Plan) -> tuple[jax.Array, jax.Array, LayerKV]:
    """Stores new keys/values k, v [B, T, K, H] of one layer.

    Returns keys [B*K, R, H] and values [B*K, H, R] to attend over (R + T slots for a
    concat plan) in k's dtype, and the updated layer cache."""
    k, v = cache_layout(k, v)
    stored = _store(layer, k, v, p)
    if p.concat:
        # The chunk's own keys are used at full precision; only what stays is quantized.
        old_k, old_v = _read(layer, k.dtype)
        return jnp.concatenate([old_k, k], axis=1), jnp.concatenate([old_v, v], axis=2), stored
    return (*_read(stored, k.dtype), stored)


def update_latent(layer: LatentKV, c: jax.Array, k_rope: jax.Array,
                  p: Plan) -> tuple[jax.Array, jax.Array, LatentKV]:
    """Stores an MLA chunk's latents c [B, T, C] and rotated keys k_rope [B, T, R_rope].

    Returns the latents and keys to attend over ([B, R, *], or [B, R + T, *] for a concat
    plan) in c's dtype, and the updated layer cache."""
    stored = LatentKV(_write(layer.c, c.astype(layer.c.dtype), p, 1),
                      _write(layer.k_rope, k_rope.astype(layer.k_rope.dtype), p, 1))
    if p.concat:
        return (jnp.concatenate([layer.c.astype(c.dtype), c], axis=1),
                jnp.concatenate([layer.k_rope.astype(c.dtype), k_rope], axis=1), stored)
    return stored.c.astype(c.dtype), stored.k_rope.astype(c.dtype), stored


def key_positions(slots: Slots, p: Plan, new_positions: jax.Array) -> tuple[jax.Array, Slots]:
    """new_positions [B, T] (-1 on padding) -> (positions of the keys attended over,
    [B, R] or [B, R + T], and the slots with the chunk written)."""
    stored = _write(slots.positions, new_positions, p, 1)
    keys = jnp.concatenate([slots.positions, new_positions], axis=1) if p.concat else stored
    return keys, slots.replace(positions=stored)


def advance(cache: Cache, kv: LayerKV | tuple[LayerKV, ...], slots: dict[str, Slots],
            num_new: int, valid: jax.Array | None) -> Cache:
    """The cache after a chunk of num_new tokens: new kv and slots, index and lengths moved
    on (lengths only by the real tokens, valid [B, T] bool)."""
    real = num_new if valid is None else jnp.sum(valid, axis=1, dtype=jnp.int32)
    return cache.replace(kv=kv, slots=slots, index=cache.index + num_new,
                         lengths=cache.lengths + real)


def rewind(cache: Cache, n: jax.Array) -> Cache:
    """Forgets the last n tokens of every row (all real): rejected speculative tokens."""
    return cache.replace(index=cache.index - n, lengths=cache.lengths - n)


def with_cross(cache: Cache, cross: LayerKV | tuple[LayerKV, ...], valid: jax.Array | None) -> Cache:
    """Adds encdec cross-attention keys/values (either layout; stored in the cache's) and
    the source mask [B, S]."""
    if valid is None:
        valid = jnp.ones((cache.batch, layer_kv(cross, 0).k.shape[-2]), bool)
    cross = stacked(cross) if is_stacked(cache.kv) else per_layer(cross)
    return cache.replace(cross=cross, cross_valid=valid)


def _map_rows(cache: Cache, fn) -> Cache:
    """Applies fn(array, batch_axis) to every per-row array."""
    def on_kv(kv: LayerKV | tuple[LayerKV, ...] | None) -> LayerKV | tuple[LayerKV, ...] | None:
        if kv is None:
            return None
        axis = 1 if is_stacked(kv) else 0

        def rows(a: jax.Array) -> jax.Array:  # the merged [B*K] axis, split to apply fn on B
            split = a.reshape(a.shape[:axis] + (cache.batch, -1) + a.shape[axis + 1:])
            out = fn(split, axis)
            return out.reshape(out.shape[:axis] + (-1,) + out.shape[axis + 2:])

        return jax.tree.map(rows, kv)

    return cache.replace(kv=on_kv(cache.kv), cross=on_kv(cache.cross),
                         slots={kind: s.replace(positions=fn(s.positions, 0)) for kind, s in cache.slots.items()},
                         lengths=fn(cache.lengths, 0),
                         cross_valid=None if cache.cross_valid is None else fn(cache.cross_valid, 0))


def repeat_rows(cache: Cache, n: int) -> Cache:
    """Each row n times in a row (rows b*n .. b*n + n-1 copy row b): beams of one prompt."""
    return _map_rows(cache, lambda a, axis: jnp.repeat(a, n, axis=axis))


def take_rows(cache: Cache, rows: jax.Array) -> Cache:
    """Rows [B'] int of the cache (beam reordering)."""
    return _map_rows(cache, lambda a, axis: jnp.take(a, rows, axis=axis))


def nbytes(cache: Cache) -> int:
    """Bytes of the self-attention keys, values and scales."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache.kv))
