"""Dense projections as one 2-D matmul over the flattened token axes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from zoo.kernels import cpu as cpu_kernel
from zoo.nn.quant import QuantizedWeight, dequantized, kernel_matmul, matvec


def matmul(x: jax.Array, w: jax.Array, n_in: int = 1, mode: str = "xla") -> jax.Array:
    """x [..., *w.shape[:n_in]] times w -> [..., *w.shape[n_in:]], in x's dtype; mode is
    `Config.matmul` (see `_dot`).

    The leading (batch, length) axes are flattened into one, so the weight gradient
    contracts a single token axis. Over two contracting axes XLA's CPU backend first
    transposes an activation into a copy (and fuses that copy into its producer, where it
    is slower still); a 2-D matmul it runs in place. Other backends see the same matmul.
    A `zoo.nn.quant.QuantizedWeight` w is dequantized inside the product (`_quantized`)."""
    k = math.prod(w.shape[:n_in])
    if isinstance(w, QuantizedWeight):
        y = _quantized(x.reshape(-1, k), w, mode)
        return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:])
    y = _dot(x.reshape(-1, k), w.reshape(k, -1).astype(x.dtype), ((1,), (0,)), mode)
    return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:])


def matmul_transposed(x: jax.Array, w: jax.Array, mode: str = "xla") -> jax.Array:
    """x [..., D] times w [V, D] transposed -> [..., V] (tied embedding logits), 2-D as `matmul`."""
    if isinstance(w, QuantizedWeight):
        return _quantized(x.reshape(-1, w.shape[1]), w, mode).reshape(*x.shape[:-1], w.shape[0])
    y = _dot(x.reshape(-1, w.shape[1]), w.astype(x.dtype), ((1,), (1,)), mode)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _dot(x: jax.Array, w: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]],
         mode: str) -> jax.Array:
    """x [M, K], w contracted over `contract` -> [M, N] in x's dtype. mode "f32_accumulate":
    a bf16 product accumulates to fp32, then rounds, the form XLA:CPU hands to the
    AMX/AVX-512 bf16 units, several times faster there than a bf16 -> bf16 product
    (bench/RESULTS.md, "bf16 on this CPU"); `zoo.nn.backend.resolve` picks it on a CPU.
    Accelerators accumulate in fp32 whatever the output type, so they get the plain
    product ("xla"; "auto" here is the same)."""
    dims = (contract, ((), ()))
    if x.dtype == jnp.bfloat16 and mode == "f32_accumulate":
        return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(x.dtype)
    return jax.lax.dot_general(x, w, dims)


def _quantized(x: jax.Array, w: QuantizedWeight, mode: str) -> jax.Array:
    """x [M, K] times a quantized weight ([N, K] rows) -> [M, N] in x's dtype. On a CPU with
    `zoo.kernels.cpu`'s kernel built: that kernel, for any M (it reads each int8 byte once
    and multiplies it into up to 4 rows). Otherwise one row (batch-1 decoding):
    `zoo.nn.quant.matvec`, which reads the int8 weight in place; more rows dequantize the
    weight once into x's dtype and run the ordinary product."""
    def xla(x: jax.Array) -> jax.Array:
        if x.shape[0] == 1:
            return matvec(x, w).astype(x.dtype)
        return _dot(x, dequantized(w, x.dtype), ((1,), (1,)), mode)

    if cpu_kernel.available():
        return kernel_matmul(x, w, xla).astype(x.dtype)
    return xla(x)
