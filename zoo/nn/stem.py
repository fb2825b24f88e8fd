"""The convolutional stem of a feature encoder (Whisper): float features [B, M, F] (M mel
bins, F frames) -> [B, F / 2, D], through two 1-D convolutions of kernel 3 and padding 1
(the second with stride 2), each followed by the exact GELU.

Kernels are stored [3, in, out] (window, input channels, output channels), the layout of a
dense kernel with a window axis in front; torch's Conv1d stores [out, in, 3].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import Config
from zoo.nn.mlp import activation
from zoo.nn.param import Spec, param

WIDTH = 3  # kernel width of both convolutions
STRIDE = 2  # of the second: the encoder sees half as many positions as there are frames


def stem_spec(cfg: Config) -> Spec:
    """conv1 [3, M, D] and conv2 [3, D, D] kernels with biases [D]."""
    m, d = cfg.num_mel_bins, cfg.d_model
    conv = lambda n_in: {"kernel": param((WIDTH, n_in, d), (None, None, "embed"),
                                         std=float(np.sqrt(1.0 / (WIDTH * n_in)))),
                         "bias": param((d,), ("embed",), "zeros")}
    return {"conv1": conv(m), "conv2": conv(d)}


def frames(cfg: Config) -> int:
    """Frames a feature encoder reads: STRIDE x its positions (encoder_max_len or max_len)."""
    return STRIDE * cfg.encoder_stack.max_len


def check_features(name: str, feats: jax.Array, cfg: Config) -> None:
    """feats: float [B, num_mel_bins, frames(cfg)]; anything else is a ValueError naming it."""
    shape = getattr(feats, "shape", None)
    if shape is None:
        raise ValueError(f"{name}: expected float features [batch, {cfg.num_mel_bins} mel bins, "
                         f"{frames(cfg)} frames], got {type(feats).__name__}")
    if not jnp.issubdtype(feats.dtype, jnp.floating):
        raise ValueError(f"{name}: this encoder reads float log-mel features [batch, {cfg.num_mel_bins}, "
                         f"{frames(cfg)}] (Config.num_mel_bins={cfg.num_mel_bins}), got {feats.dtype} "
                         f"of shape {tuple(shape)} (token ids?); compute them with zoo.audio.log_mel")
    if len(shape) != 3 or shape[1] != cfg.num_mel_bins or shape[2] != frames(cfg):
        raise ValueError(f"{name}: expected features [batch, {cfg.num_mel_bins} mel bins, {frames(cfg)} "
                         f"frames] (Config.num_mel_bins, 2 x encoder_max_len), got shape {tuple(shape)}")


def _conv(x: jax.Array, p: dict, stride: int, lhs: str) -> jax.Array:
    """One convolution over the frames axis, padding 1 each side -> [B, T', D]."""
    dt = x.dtype
    y = jax.lax.conv_general_dilated(x, p["kernel"].astype(dt), window_strides=(stride,),
                                     padding=((1, 1),), dimension_numbers=(lhs, "HIO", "NHC"),
                                     preferred_element_type=jnp.float32)
    return (y + p["bias"].astype(jnp.float32)).astype(dt)


def apply_stem(p: dict, feats: jax.Array, cfg: Config) -> jax.Array:
    """feats [B, M, F] -> [B, F / 2, D] in the compute dtype."""
    gelu = activation("gelu")  # exact (erf) GELU, as Whisper
    x = gelu(_conv(feats.astype(jnp.dtype(cfg.dtype)), p["conv1"], 1, "NCH"))  # [B, F, D]
    return gelu(_conv(x, p["conv2"], STRIDE, "NHC"))
