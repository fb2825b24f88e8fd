"""Position schemes: learned and sinusoidal tables, RoPE (with linear, llama3, yarn, dynamic
and longrope scaling), ALiBi slopes and T5 relative-position buckets. Tables and biases are
functions of integer positions, so packed sequences and KV caches use the same code."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import Config


# --- sinusoidal -------------------------------------------------------------------------
def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """[length, dim]: sin on the first half, cos on the second (fairseq layout)."""
    half = dim // 2
    inv = np.exp(-math.log(10000.0) * np.arange(half) / max(half - 1, 1))
    angles = np.arange(length)[:, None] * inv[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        table = np.pad(table, ((0, 0), (0, 1)))
    return table.astype(np.float32)


# --- RoPE -------------------------------------------------------------------------------
# Scalings follow transformers' ROPE_INIT_FUNCTIONS and its per-call updates (dynamic,
# longrope), decided inside the traced function from the call's largest position, so they
# hold under jit and with a KV cache. transformers' dynamic update is stateful: after a long
# call, a shorter one still past max_len keeps the longer call's base; zoo recomputes per call.


def _rotated(cfg: Config) -> int:
    """Rotated dims per head: MLA's qk_rope_head_dim, else head_size * rope_fraction."""
    return cfg.qk_rope_head_dim if cfg.mla else int(cfg.head_size * cfg.rope_fraction)


def _exponents(rot: int) -> np.ndarray:
    """[rot/2] the exponents 2i/rot of the base in each frequency."""
    return np.arange(0, rot, 2, dtype=np.float64) / rot


def rope_inv_freq(cfg: Config, long: bool = False) -> np.ndarray:
    """[rot_dim // 2] inverse frequencies, with the config's static scaling applied.

    longrope: the short factors (`long=True`: the long ones); dynamic: unscaled, the base
    grows per call in `rope_tables`."""
    inv = 1.0 / cfg.rope_theta ** _exponents(_rotated(cfg))
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        inv = _llama3(cfg, inv)
    elif cfg.rope_scaling == "yarn":
        inv = _yarn(cfg, inv)
    elif cfg.rope_scaling == "longrope":
        inv = inv / np.asarray(cfg.rope_long_factor if long else cfg.rope_short_factor, np.float64)
    return inv.astype(np.float32)


def _llama3(cfg: Config, inv: np.ndarray) -> np.ndarray:
    # Long wavelengths are slowed by the factor, short ones kept, the band between
    # interpolated smoothly (Llama 3.1).
    old = cfg.rope_original_max_len
    low_wavelen = old / cfg.rope_low_freq_factor
    high_wavelen = old / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    mid = (1 - smooth) * inv / cfg.rope_scaling_factor + smooth * inv
    return np.where(wavelen < high_wavelen, inv,
                    np.where(wavelen > low_wavelen, inv / cfg.rope_scaling_factor, mid))


def _yarn(cfg: Config, inv: np.ndarray) -> np.ndarray:
    """YaRN: dims that turn more than beta_fast times over the original context keep their
    speed, those turning under beta_slow times are slowed by the factor, a linear ramp
    over the dim index blends between."""
    rot, base = _rotated(cfg), cfg.rope_theta

    def dim_of(turns: float) -> float:  # the (fractional) dim that turns `turns` times
        return rot * math.log(cfg.rope_original_max_len / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    if low == high:
        high += 0.001  # as transformers: avoids a zero-width ramp
    slowed = np.clip((np.arange(rot // 2) - low) / (high - low), 0.0, 1.0)
    return inv / cfg.rope_scaling_factor * slowed + inv * (1.0 - slowed)


def longrope_attention_factor(stretch: float, original_len: int) -> float:
    """LongRoPE's cos/sin scale for a context stretched `stretch` times past `original_len`:
    sqrt(1 + ln(stretch) / ln(original_len)), 1 when not stretched."""
    return 1.0 if stretch <= 1.0 else math.sqrt(1.0 + math.log(stretch) / math.log(original_len))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 mscale ln(scale) + 1 (1 when not stretched)."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(cfg: Config) -> float:
    """The scale yarn and longrope put on cos and sin (so on q.k, squared); 1 otherwise.

    yarn: 0.1 ln(factor) + 1, or DeepSeek's mscale / mscale_all_dim ratio of that form;
    longrope: `longrope_attention_factor(max_len / rope_original_max_len)`. An explicit
    `rope_attention_factor` wins over both."""
    if cfg.rope_scaling not in ("yarn", "longrope"):
        return 1.0
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    if cfg.rope_scaling == "longrope":
        return longrope_attention_factor(cfg.max_len / cfg.rope_original_max_len, cfg.rope_original_max_len)
    factor = cfg.rope_scaling_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim)
    return yarn_mscale(factor)


def _dynamic_inv_freq(cfg: Config, length: jax.Array) -> jax.Array:
    """[rot/2] dynamic-NTK frequencies for a call reaching `length` (a traced scalar): past
    max_len (transformers' max_position_embeddings) the base grows as
    theta * (factor * length / max_len - (factor - 1)) ** (rot / (rot - 2))."""
    rot, factor = _rotated(cfg), cfg.rope_scaling_factor
    length = jnp.maximum(length, cfg.max_len).astype(jnp.float32)
    base = cfg.rope_theta * (factor * length / cfg.max_len - (factor - 1.0)) ** (rot / (rot - 2))
    return 1.0 / base ** jnp.asarray(_exponents(rot), jnp.float32)


def _call_inv_freq(cfg: Config, positions: jax.Array) -> jax.Array:
    """[rot/2] the frequencies of one call over positions [B, T]: the scalings that depend on
    the call's length (dynamic, longrope) read it as transformers does, max(positions) + 1."""
    if cfg.rope_scaling not in ("dynamic", "longrope"):
        return jnp.asarray(rope_inv_freq(cfg))
    length = jnp.max(positions) + 1
    if cfg.rope_scaling == "dynamic":
        return _dynamic_inv_freq(cfg, length)
    return jnp.where(length > cfg.rope_original_max_len, rope_inv_freq(cfg, long=True), rope_inv_freq(cfg))


class RopeTables(NamedTuple):
    """cos and sin [B, T, rot/2] fp32 of the rotation at each position, with the scaling's
    attention factor (yarn, longrope) folded in. Built once per forward and layer kind."""

    cos: jax.Array
    sin: jax.Array


def rope_tables(cfg: Config, kind: str, positions: jax.Array) -> RopeTables:
    """The rotation of a layer of `kind` ("global" | "local", `Config.layer_kind`) at
    positions [B, T]. "local" layers use `cfg.local_rope_theta` unscaled when it is set."""
    if kind == "local" and cfg.local_rope_theta is not None:
        cfg = cfg.replace(rope_theta=cfg.local_rope_theta, rope_scaling=None, rope_scaling_factor=1.0)
    inv = _call_inv_freq(cfg, positions)
    angles = positions.astype(jnp.float32)[..., None] * inv[None, None, :]  # [B, T, rot/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    scale = rope_attention_factor(cfg)
    return RopeTables(cos, sin) if scale == 1.0 else RopeTables(cos * scale, sin * scale)


def apply_rope(x: jax.Array, tables: RopeTables) -> jax.Array:
    """Rotates the first rot dims of x: [B, T, N, H] (rot = 2 * tables.cos.shape[-1]).

    Uses the half-split layout (rotate_half) of the Hugging Face Llama weights."""
    return _rotate(x, tables.cos[:, :, None, :], tables.sin[:, :, None, :])


def apply_rope_cached(k: jax.Array, tables: RopeTables) -> jax.Array:
    """Rotates keys in a KV cache's layout, k [B*K, S, H], by tables at positions [B, S]."""
    b = tables.cos.shape[0]
    x = k.reshape(b, -1, *k.shape[1:])  # [B, K, S, H]
    return _rotate(x, tables.cos[:, None], tables.sin[:, None]).reshape(k.shape)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., H] with cos, sin [..., rot/2] broadcasting against it: the first rot dims
    rotated, the rest kept."""
    rot = 2 * cos.shape[-1]
    xr = x[..., :rot].astype(jnp.float32)
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return out if rot == x.shape[-1] else jnp.concatenate([out, x[..., rot:]], axis=-1)


# --- ALiBi ------------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> np.ndarray:
    """[num_heads] geometric slopes 2^(-8i/n); for n not a power of two, the slopes of the
    next lower power of two followed by every other slope of the next higher one."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    low = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(low)
    if low != num_heads:
        slopes += power_of_two(2 * low)[0::2][: num_heads - low]
    return np.asarray(slopes, np.float32)


def alibi_bias(q_pos: jax.Array, k_pos: jax.Array, num_heads: int) -> jax.Array:
    """[B, N, Tq, Tk] = -slope * |q - k|."""
    dist = jnp.abs(q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)
    return -alibi_slopes(num_heads)[None, :, None, None] * dist[:, None]


# --- T5 relative buckets ----------------------------------------------------------------
def relative_bucket(relative: jax.Array, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> jax.Array:
    """Bucket of each (key - query) offset: exact for small offsets, logarithmic up to
    max_distance, one bucket beyond. Bidirectional splits the buckets by sign."""
    bucket = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).astype(relative.dtype) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = jnp.maximum(-relative, 0)
    exact = num_buckets // 2
    log_part = exact + (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact)
        / math.log(max_distance / exact) * (num_buckets - exact)
    ).astype(relative.dtype)
    log_part = jnp.minimum(log_part, num_buckets - 1)
    return bucket + jnp.where(distance < exact, distance, log_part)


def relative_bias(table: jax.Array, q_pos: jax.Array, k_pos: jax.Array, bidirectional: bool,
                  cfg: Config) -> jax.Array:
    """table: [buckets, N]; positions [B, Tq], [B, Tk] -> bias [B, N, Tq, Tk] (fp32)."""
    rel = k_pos[:, None, :] - q_pos[:, :, None]
    buckets = relative_bucket(rel, bidirectional, cfg.relative_buckets, cfg.relative_max_distance)
    return jnp.moveaxis(table.astype(jnp.float32)[buckets], -1, 1)
