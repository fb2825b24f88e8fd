"""Input checks at the public boundary. Shapes and dtypes are static, so they are checked
at trace time for free; token-id ranges are checked only when the values are concrete
(outside jit), so no check adds a host sync to a compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import Config


def _is_concrete(x: jax.Array) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_tokens(name: str, tokens: jax.Array, cfg: Config, max_len: int | None = None) -> None:
    """tokens: int [B, T] with ids in [0, vocab_size) and T <= max_len."""
    shape = getattr(tokens, "shape", None)
    if shape is None:
        raise ValueError(f"{name}: expected an int array [batch, length], got {type(tokens).__name__}")
    if len(shape) != 2:
        raise ValueError(f"{name}: expected rank 2 [batch, length], got shape {tuple(shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer dtype (int32), got {tokens.dtype}")
    if shape[1] == 0:
        raise ValueError(f"{name}: expected at least one token, got length 0")
    limit = cfg.max_len if max_len is None else max_len
    if shape[1] > limit and cfg.positions in ("learned", "sinusoidal"):
        raise ValueError(f"{name}: length {shape[1]} exceeds the model's max_len {limit}")
    if _is_concrete(tokens):
        values = np.asarray(tokens)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")


def _check_like(name: str, x: jax.Array, like_name: str, like: jax.Array) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or tuple(shape) != tuple(like.shape):
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} (same as {like_name}), "
                         f"got {None if shape is None else tuple(shape)}")


def check_mask(name: str, mask: jax.Array | None, like_name: str, like: jax.Array) -> None:
    """mask: bool [B, T] of the same shape as the tokens it describes."""
    if mask is None:
        return
    _check_like(name, mask, like_name, like)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"{name}: expected dtype bool (True where a real token stands), got {mask.dtype}")


def check_same_shape(name: str, x: jax.Array | None, like_name: str, like: jax.Array) -> None:
    """An int [B, T] side input (positions, segment ids, token types)."""
    if x is None:
        return
    _check_like(name, x, like_name, like)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {x.dtype}")
