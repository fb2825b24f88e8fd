"""Ceilings measured in the same run as the benchmark: matmul FLOP/s and streaming
bandwidth on the device the benchmark uses, so MFU and decode bounds are against this
machine, not a datasheet."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.timing import median_time
from zoo.nn.linear import matmul


def device_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{jax.device_count()}x {kind} ({d.platform})"


def on_accelerator() -> bool:
    return jax.devices()[0].platform in ("gpu", "tpu")


def matmul_peak(dtype: str = "float32", n: int | None = None) -> float:
    """FLOP/s of a large matmul, median of 7: n x n x n on CPU (n = 2048); on accelerators
    [4n, n] x [n, n] (n = 8192), several milliseconds, so the host's dispatch and timer
    are a small part of each timing."""
    accel = on_accelerator()
    n = n or (8192 if accel else 2048)
    m = 4 * n if accel else n
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, n), jnp.float32).astype(dtype)  # random, never zeros
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(matmul)  # the product the models run (bf16 on a CPU accumulates to fp32)
    seconds = median_time(lambda: f(a, b), iters=7, warmup=2)
    return 2.0 * m * n * n / seconds


def stream_bandwidth(megabytes: int | None = None) -> float:
    """Bytes/s read from memory by the fastest of two streaming reads over an array far larger
    than the caches: a full reduction, and a matrix-vector product (what batch-1 decoding
    does with every weight). Median of 7 each; decode bounds divide by this."""
    mb = megabytes or (4096 if on_accelerator() else 512)
    rows = 8192
    w = jax.random.normal(jax.random.key(1), (rows, mb * 2 ** 20 // 4 // rows), jnp.float32)
    v = jnp.ones((1, rows), jnp.float32)
    reduce = jax.jit(lambda a: jnp.sum(a))
    matvec = jax.jit(lambda x, a: x @ a)
    seconds = min(median_time(lambda: reduce(w), iters=7, warmup=2),
                  median_time(lambda: matvec(v, w), iters=7, warmup=2))
    return w.nbytes / seconds
