"""The one place that looks at the device: `resolve` turns a Config's "auto" kernel choices
into explicit ones, once, at a model's entry (`zoo.apply` and the family forwards).

Everything below the entry reads `cfg.attention` and `cfg.matmul` as data, so a call traces
to the same program wherever it runs once those fields are set, and a user (or a test) can
pin either choice by setting the field: "auto" is the only value that depends on the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import Config
from zoo.sharding import active_devices, context_size


def platform() -> str:
    """"cuda", "rocm", "tpu" or "cpu": the platform of the first device."""
    device = jax.devices()[0]
    if device.platform == "gpu":  # CUDA and ROCm both report "gpu"; the client knows which
        return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"
    return device.platform


# attention="auto" takes the blockwise path (zoo.nn.blockwise) where one layer's fp32 scores
# [B, N, T, T] would pass this many bytes: the XLA paths hold them whole, and a training step
# keeps every layer's probabilities for the backward pass (bench/RESULTS.md, "Long context").
BLOCKWISE_ABOVE_BYTES = 1 << 28
# ... and on a CPU from this many tokens per row, where it measured faster than the rows path
# (the causal blocks it skips, scores that stay in the cache; bench/RESULTS.md).
BLOCKWISE_CPU_FROM_LENGTH = 2048


def choose_attention(cfg: Config, where: str, devices: int,
                     shape: tuple[int, int] | None = None) -> str:
    """What attention="auto" runs on platform `where` with `devices` active devices, for
    inputs of `shape` (batch, length; None: unknown): cuDNN's fused kernel on an NVIDIA GPU
    in bf16/fp16 (falling back to xla per call where the kernel does not fit,
    `zoo.nn.attention.cudnn_fits`); the Pallas splash kernel on a TPU (falling back to
    blockwise per call, `zoo.nn.splash.splash_unfit`); blockwise where one layer's scores
    would pass BLOCKWISE_ABOVE_BYTES, or on a CPU for rows of BLOCKWISE_CPU_FROM_LENGTH
    tokens or more; row by row on one CPU device (a row's scores stay in
    the core's cache; with several devices XLA's SPMD partitioner should see one batched
    op); the plain einsums elsewhere."""
    if where == "cuda" and jnp.dtype(cfg.dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if where == "tpu":
        return "splash"
    if shape is not None and (shape[0] * cfg.num_heads * shape[1] ** 2 * 4 > BLOCKWISE_ABOVE_BYTES
                              or (where == "cpu" and shape[1] >= BLOCKWISE_CPU_FROM_LENGTH)):
        return "blockwise"
    if where == "cpu" and devices == 1:
        return "rows"
    return "xla"


def choose_matmul(where: str) -> str:
    """What matmul="auto" runs: fp32 accumulation of bf16 products on a CPU, plain elsewhere."""
    return "f32_accumulate" if where == "cpu" else "xla"


def choose_grouped_matmul(where: str) -> str:
    """What grouped_matmul="auto" runs: XLA's CPU backend expands jax.lax.ragged_dot into
    every group over every row (the cost of the dense experts), so a CPU gets the tile scan."""
    return "tiles" if where == "cpu" else "ragged"


def resolve(cfg: Config, *inputs: jax.Array | None) -> Config:
    """cfg with attention, matmul and grouped_matmul "auto" replaced by this device's choice
    (the same cfg when none is "auto"); inputs: the model's token arrays [B, L] or
    hidden states [B, L, D] (None skipped), whose batch and longest length the attention
    choice weighs. Call at trace
    time: it reads the active mesh."""
    if "auto" not in (cfg.attention, cfg.matmul, cfg.grouped_matmul):
        return cfg
    where = platform()
    changes = {}
    if cfg.attention == "auto":
        shapes = [np.shape(x) for x in inputs if x is not None and np.ndim(x) >= 2]
        shape = (shapes[0][0], max(s[1] for s in shapes)) if shapes else None
        changes["attention"] = choose_attention(cfg, where, active_devices(), shape)
        if context_size() > 1 and changes["attention"] in ("cudnn", "splash"):
            changes["attention"] = "blockwise"  # the kernels cannot split the queries (zoo.nn.attention)
    if cfg.matmul == "auto":
        changes["matmul"] = choose_matmul(where)
    if cfg.grouped_matmul == "auto":
        changes["grouped_matmul"] = choose_grouped_matmul(where)
    return cfg.replace(**changes)
