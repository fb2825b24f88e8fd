"""Dense and gated feed-forward blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.config import ACTIVATIONS, Config
from zoo.nn.linear import matmul
from zoo.nn.param import Spec, init_std, param
from zoo.nn.quant import concatenate
from zoo.sharding import constrain

_FUNCTIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def activation(name: str):
    """The elementwise function behind an activation name (gated names give their gate's)."""
    return _FUNCTIONS[ACTIVATIONS[name][0]] if name in ACTIVATIONS else _FUNCTIONS[name]


def mlp_spec(cfg: Config) -> Spec:
    d, f = cfg.d_model, cfg.d_ff
    std_in = init_std(cfg, "in", d)
    spec = {"wi": param((d, f), ("embed", "mlp"), std=std_in),
            "wo": param((f, d), ("mlp", "embed"), std=init_std(cfg, "out", f))}
    if cfg.gated:
        spec["wg"] = param((d, f), ("embed", "mlp"), std=std_in)
    if cfg.mlp_bias:
        spec["bi"] = param((f,), ("mlp",), "zeros")
        spec["bo"] = param((d,), ("embed",), "zeros")
        if cfg.gated:
            spec["bg"] = param((f,), ("mlp",), "zeros")
    return spec


def fuse_gate(p: dict) -> dict:
    """Gated MLP params in the decoding layout (`Config.layout="decoding"`): the gate and
    input matrices side by side, `wgi` [D, 2F] (and `bgi`), one matmul instead of two, which
    at batch 1 reads the weights in one pass. A dense MLP is returned as is."""
    if "wg" not in p:
        return p
    out = {k: v for k, v in p.items() if k not in ("wg", "wi", "bg", "bi")}
    out["wgi"] = concatenate([p["wg"], p["wi"]], axis=1)  # arrays or QuantizedWeights
    if "bi" in p:
        out["bgi"] = jnp.concatenate([p["bg"], p["bi"]])
    return out


def apply_mlp(p: dict, x: jax.Array, cfg: Config) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]. Gated: act(x Wg) * (x Wi), as in SwiGLU/GeGLU."""
    act = activation(cfg.activation)
    if cfg.gated and cfg.layout == "decoding":
        g, h = jnp.split(_project(p, x, "wgi", "bgi", cfg), 2, axis=-1)
        h = act(g) * h
    elif cfg.gated:
        h = act(_project(p, x, "wg", "bg", cfg)) * _project(p, x, "wi", "bi", cfg)
    else:
        h = act(_project(p, x, "wi", "bi", cfg))
    return _project(p, constrain(h, ("batch", "length", "mlp")), "wo", "bo", cfg)


def _project(p: dict, x: jax.Array, weight: str, bias: str, cfg: Config) -> jax.Array:
    y = matmul(x, p[weight], mode=cfg.matmul)
    return y + p[bias].astype(x.dtype) if cfg.mlp_bias else y


def dense(x: jax.Array, p: dict, mode: str = "xla") -> jax.Array:
    """x [..., Din] @ kernel (+ bias) in x's dtype; p = {"kernel": [Din, Dout], "bias"?: [Dout]}
    (a task head's own declaration; mode: `Config.matmul`)."""
    y = matmul(x, p["kernel"], mode=mode)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def dense_spec(din: int, dout: int, axes: tuple[str, str], bias: bool = True,
               std: float = 0.02) -> Spec:
    """kernel [din, dout] ~ N(0, std) (`init_std(cfg, "dense", din)`), bias [dout] zeros."""
    spec = {"kernel": param((din, dout), axes, std=std)}
    if bias:
        spec["bias"] = param((dout,), (axes[1],), "zeros")
    return spec
