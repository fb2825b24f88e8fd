"""Ceilings measured in the same run as the benchmark: matmul FLOP/s and streaming
bandwidth on the device the benchmark uses, so MFU and decode bounds are against this
machine; and, on accelerators, the datasheet's dense bf16 peak as well (`spec_fields`, the
figure MaxText and most papers report MFU against)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bench.timing import median_time
from train.report import spec_peak  # the table of published dense bf16 peaks (train.report.PEAK_FLOPS)
from zoo.nn.linear import matmul

SPEC_DTYPES = ("bfloat16", "float16")  # the table's peaks are for 16-bit matmuls


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


def spec_fields(mfu: float | None, measured_peak: float, dtype: str, device: Any = None) -> dict[str, Any]:
    """`mfu_spec` (the row's model FLOP/s over the published dense peak of `device`, default
    the first), `spec_tflops` and, where there is no figure, `spec_note` saying why. mfu is
    against `measured_peak` (FLOP/s, the same run's matmul)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak, note = None, None
    if device.platform not in ("gpu", "tpu"):
        note = f"{device.platform}: no published dense peak; mfu is against the matmul peak measured in this run"
    elif dtype not in SPEC_DTYPES:
        note = f"the published peaks are for bf16 matmuls; this row computes in {dtype}"
    elif (peak := spec_peak(kind)) is None:
        note = f"{kind!r} is not in train.report.PEAK_FLOPS"
    return {"spec_tflops": peak / 1e12 if peak else None,
            "mfu_spec": mfu * measured_peak / peak if peak and mfu is not None else None,
            **({"spec_note": note} if note else {})}
