"""LayerNorm (with or without bias) and RMSNorm; statistics in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.param import Spec, param


def norm_spec(cfg: Config, dim: int | None = None) -> Spec:
    dim = dim or cfg.d_model
    # Stored as the checkpoint stores it: Gemma's weight is the scale minus norm_offset.
    spec = {"scale": param((dim,), ("norm",), "zeros" if cfg.norm_offset == 1.0 else "ones")}
    if cfg.norm == "layernorm" and cfg.norm_bias:
        spec["bias"] = param((dim,), ("norm",), "zeros")
    return spec


def apply_norm(p: dict, x: jax.Array, cfg: Config) -> jax.Array:
    """x: [..., D] -> [..., D] in x's dtype; the scale is norm_offset + p["scale"]."""
    xf = x.astype(jnp.float32)
    if cfg.norm == "rmsnorm":
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
    else:
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    scale = p["scale"].astype(jnp.float32)
    y = y * (scale + cfg.norm_offset if cfg.norm_offset else scale)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)
