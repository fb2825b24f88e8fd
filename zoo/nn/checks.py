"""Input checks at the public boundary. Shapes and dtypes are static, so they are checked
at trace time for free; token-id ranges are checked only when the values are concrete
(outside jit), so no check adds a host sync to a compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import Config


# Position schemes with one embedding per position up to max_len: a longer sequence is an
# error. rope, alibi, relative (T5) and none compute positions, so max_len is only the
# length the model was trained at and longer sequences run.
TABLE_POSITIONS = ("learned", "sinusoidal")


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
    if shape[1] > limit and cfg.positions in TABLE_POSITIONS:
        raise ValueError(f"{name}: length {shape[1]} exceeds the model's max_len {limit} "
                         f"({cfg.positions} positions have no embedding beyond it)")
    if _is_concrete(tokens):
        values = np.asarray(tokens)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")


def check_positions(positions: jax.Array, cfg: Config) -> None:
    """positions int [B, T] (given, or continuing a cache) inside a position table: every
    value < max_len. Checked when concrete; under jit a table lookup clamps."""
    if cfg.positions in TABLE_POSITIONS and _is_concrete(positions) and positions.size:
        last = int(np.max(np.asarray(positions)))
        if last >= cfg.max_len:
            raise ValueError(f"positions: position {last} is beyond the model's max_len "
                             f"{cfg.max_len} ({cfg.positions} positions have no embedding there)")


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
