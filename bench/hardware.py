"""Ceilings measured in the same run as the benchmark: matmul FLOP/s and streaming
bandwidth on the device the benchmark uses, so MFU and decode bounds are against this
machine, not a datasheet."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.timing import median_time


def device_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{jax.device_count()}x {kind} ({d.platform})"


def on_accelerator() -> bool:
    return jax.devices()[0].platform in ("gpu", "tpu")


def matmul_peak(dtype: str = "float32", n: int | None = None) -> float:
    """FLOP/s of an n x n x n matmul (n: 2048 on CPU, 8192 on accelerators), median of 5."""
    n = n or (8192 if on_accelerator() else 2048)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)  # random, never zeros
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    seconds = median_time(lambda: f(a, b), iters=5, warmup=2)
    return 2.0 * n ** 3 / seconds


def stream_bandwidth(megabytes: int | None = None) -> float:
    """Bytes/s of a streaming read+write over an array far larger than the caches."""
    mb = megabytes or (4096 if on_accelerator() else 512)
    x = jax.random.normal(jax.random.key(1), (mb * 2 ** 20 // 4,), jnp.float32)
    f = jax.jit(lambda v: v * 1.0001 + 1.0)
    seconds = median_time(lambda: f(x), iters=7, warmup=2)
    return 2.0 * x.nbytes / seconds
