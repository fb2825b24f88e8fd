"""Position schemes: learned and sinusoidal tables, RoPE (with linear / llama3 scaling),
ALiBi slopes and T5 relative-position buckets. Tables and biases are functions of integer
positions, so packed sequences and KV caches use the same code."""

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
def rope_inv_freq(cfg: Config) -> np.ndarray:
    """[rot_dim // 2] inverse frequencies, with the config's scaling applied."""
    rot = int(cfg.head_size * cfg.rope_fraction)
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        # Long wavelengths are slowed by the factor, short ones kept, the band between
        # interpolated smoothly (Llama 3.1).
        old = cfg.rope_original_max_len
        low_wavelen = old / cfg.rope_low_freq_factor
        high_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        mid = (1 - smooth) * inv / cfg.rope_scaling_factor + smooth * inv
        inv = np.where(wavelen < high_wavelen, inv,
                       np.where(wavelen > low_wavelen, inv / cfg.rope_scaling_factor, mid))
    return inv.astype(np.float32)


def longrope_attention_factor(stretch: float, original_len: int) -> float:
    """LongRoPE's cos/sin scale for a context stretched `stretch` times past `original_len`:
    sqrt(1 + ln(stretch) / ln(original_len)), 1 when not stretched."""
    return 1.0 if stretch <= 1.0 else math.sqrt(1.0 + math.log(stretch) / math.log(original_len))


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
    inv = rope_inv_freq(cfg)
    angles = positions.astype(jnp.float32)[..., None] * inv[None, None, :]  # [B, T, rot/2]
    return RopeTables(jnp.cos(angles), jnp.sin(angles))


def apply_rope(x: jax.Array, tables: RopeTables) -> jax.Array:
    """Rotates the first rot dims of x: [B, T, N, H] (rot = 2 * tables.cos.shape[-1]).

    Uses the half-split layout (rotate_half) of the Hugging Face Llama weights."""
    rot = 2 * tables.cos.shape[-1]
    cos, sin = tables.cos[:, :, None, :], tables.sin[:, :, None, :]
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
