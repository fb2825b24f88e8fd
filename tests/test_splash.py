"""The TPU path (zoo.nn.splash): what "auto" picks on a TPU, which calls the Pallas splash
kernel takes (the rest run blockwise), and the kernel itself in Pallas interpret mode on the
CPU against the XLA path. No TPU ran these."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from conftest import tiny
from zoo.nn import backend
from zoo.nn.attention import attend
from zoo.nn.masks import MaskParts, PositionBias
from zoo.nn.splash import splash_unfit


def arange(b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def test_auto_picks_splash_on_a_tpu():
    cfg = tiny("tiny-decoder")
    assert backend.choose_attention(cfg, "tpu", 1, (1, 128)) == "splash"
    assert backend.choose_attention(cfg, "tpu", 8, (8, 1 << 16)) == "splash"
    assert backend.choose_attention(cfg, "cpu", 1, (1, 128)) == "rows"


def test_splash_unfit_names_what_the_kernel_lacks():
    pos = arange(2, 256)
    shape = (2, 256, 4, 8)
    fits = lambda parts, bias=None, k_shape=shape: splash_unfit(parts, bias, shape, k_shape)
    seg = jnp.ones((2, 256), jnp.int32)
    assert fits(MaskParts.build(pos, pos, causal=True, q_segments=seg, k_segments=seg,
                                k_valid=seg > 0)) is None
    assert fits(MaskParts.build(pos, pos, causal=False, window=16)) is None
    assert fits(MaskParts.build(pos, pos, causal=True, prefix=pos < 3)) == "a prefix-LM mask"
    alibi = PositionBias(None, tiny("tiny-decoder", positions="alibi"), False)
    assert "bias" in fits(MaskParts.build(pos, pos, causal=True), alibi)
    assert fits(MaskParts.build(pos, arange(2, 256), causal=False)) == "not self-attention"
    short = arange(2, 100)
    assert "multiple of 128" in splash_unfit(MaskParts.build(short, short, causal=True), None,
                                             (2, 100, 4, 8), (2, 100, 4, 8))
    reasons = []  # a window passed as data, as a stack of local and global layers scans it
    jax.jit(lambda w: reasons.append(splash_unfit(MaskParts.build(pos, pos, causal=True, window=w),
                                                  None, shape, shape)) or 0)(3)
    assert "data" in reasons[0]


def test_splash_falls_back_to_blockwise():
    """A prefix LM runs blockwise under attention="splash": equal to xla (no Pallas)."""
    pos = arange(2, 13)
    parts = MaskParts.build(pos, pos, causal=True, prefix=pos < 4)
    q, k, v = (jax.random.normal(key, (2, 13, 4, 8)) for key in jax.random.split(jax.random.key(0), 3))
    got = attend(q, k, v, parts, None, 0.3, "splash", block=4)
    np.testing.assert_allclose(got, attend(q, k, v, parts.dense(), None, 0.3, "xla"), atol=1e-5)


@pytest.mark.slow  # half a minute in interpret mode; it checks a path only a TPU runs
@pytest.mark.parametrize("window", [None, 40], ids=["causal", "window"])
def test_splash_kernel_in_interpret_mode_matches_xla(window):
    """Row 0 packed (two documents), row 1 left-padded, GQA, soft-cap and sinks, causal or
    in a window, through the Pallas kernel (interpret mode): outputs of every real query and
    the gradients of q, k, v and the sinks (the loss reads real queries only) equal the XLA
    path's."""
    b, t, n, kv, h = 2, 256, 4, 2, 16
    seg = jnp.asarray(np.r_[[1] * 100 + [2] * 156, [1] * t].reshape(2, t), jnp.int32)
    valid = jnp.asarray(np.r_[[True] * t, [False] * 56 + [True] * 200].reshape(2, t))
    pos = jnp.asarray(np.r_[np.arange(100), np.arange(156), np.zeros(56), np.arange(200)].reshape(2, t),
                      jnp.int32)
    parts = MaskParts.build(pos, pos, causal=True, k_valid=valid, q_segments=seg, k_segments=seg,
                            window=window)
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k, v = (jax.random.normal(key, (b, t, kv, h)) for key in keys[1:3])
    w = jax.random.normal(keys[3], (b, t, n, h)) * valid[:, :, None, None]
    sinks = jax.random.normal(keys[4], (n,))

    def loss(implementation, q, k, v, sinks):
        mask = parts if implementation == "splash" else parts.dense()
        out = attend(q, k, v, mask, None, 0.25, implementation, softcap=3.0, sinks=sinks)
        return jnp.sum(out * w), out

    with pltpu.force_tpu_interpret_mode():
        got = jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True)("splash", q, k, v, sinks)
    want = jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True)("xla", q, k, v, sinks)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got[1])[real], np.asarray(want[1])[real], atol=1e-5, rtol=1e-5)
    for name, a, e in zip(("q", "k", "v", "sinks"), got[0], want[0]):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-4, err_msg=f"d{name}")
