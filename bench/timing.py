"""Timing helpers: warm up, block on results, take the median."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def times(fn: Callable[[], Any], iters: int = 5, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of `iters` calls after `warmup` calls, each blocked until ready."""
    for _ in range(warmup):
        block(fn())
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        block(fn())
        out.append(time.perf_counter() - start)
    return out


def median_time(fn: Callable[[], Any], iters: int = 5, warmup: int = 2) -> float:
    return statistics.median(times(fn, iters, warmup))


def compile_seconds(jitted: Any, *args: Any) -> tuple[Any, float]:
    """(compiled executable, seconds to lower and compile). The arguments are finished first:
    jax dispatches their computation (parameter init) asynchronously, and left running it
    competes with the compiler for the cores, inflating the figure by its own depth."""
    block(args)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def memory_bytes(compiled: Any) -> int | None:
    """Peak device bytes: the allocator's peak on accelerators (over the whole process), else
    `program_bytes`."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return program_bytes(compiled)


def program_bytes(compiled: Any) -> int | None:
    """XLA's estimate of one compiled program's footprint: arguments, outputs and
    temporaries, donated outputs counted once. Unlike the allocator's peak it does not carry
    over from earlier programs of the process, so it compares variants run side by side."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # memory_analysis is not implemented on every backend
        return None
