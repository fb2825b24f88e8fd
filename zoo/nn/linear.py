"""Dense projections as one 2-D matmul over the flattened token axes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def matmul(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., *w.shape[:n_in]] times w -> [..., *w.shape[n_in:]], in x's dtype.

    The leading (batch, length) axes are flattened into one, so the weight gradient
    contracts a single token axis. Over two contracting axes XLA's CPU backend first
    transposes an activation into a copy (and fuses that copy into its producer, where it
    is slower still); a 2-D matmul it runs in place. Other backends see the same matmul."""
    k = math.prod(w.shape[:n_in])
    y = _dot(x.reshape(-1, k), w.reshape(k, -1).astype(x.dtype), ((1,), (0,)))
    return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:])


def matmul_transposed(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D] times w [V, D] transposed -> [..., V] (tied embedding logits), 2-D as `matmul`."""
    y = _dot(x.reshape(-1, w.shape[1]), w.astype(x.dtype), ((1,), (1,)))
    return y.reshape(*x.shape[:-1], w.shape[0])


def _dot(x: jax.Array, w: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]]) -> jax.Array:
    """x [M, K], w contracted over `contract` -> [M, N] in x's dtype. bf16 on the CPU backend
    accumulates to an fp32 product, then rounds: that is the form XLA:CPU hands to the
    AMX/AVX-512 bf16 units, several times faster than a bf16 -> bf16 product (measured in
    bench/RESULTS.md, "bf16 on this CPU"). Accelerators accumulate in fp32 whatever the
    output type, so they get the plain product."""
    dims = (contract, ((), ()))
    if x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(x.dtype)
    return jax.lax.dot_general(x, w, dims)
