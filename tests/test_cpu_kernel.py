"""zoo.kernels.cpu: the int8/int4 product kernel that quantized weights run on a CPU."""

import platform
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.kernels import cpu
from zoo.nn.linear import matmul
from zoo.nn.quant import dequantized, quantize_weight

def test_the_kernel_builds_here():
    """The kernel builds and registers (the README's install line asks for g++; .ci/run
    installs it)."""
    assert cpu.available()


@pytest.mark.parametrize("bits,group", [(8, None), (8, 20), (4, 20), (4, None), (4, 4096)])
def test_kernel_equals_the_dequantized_product(bits, group):
    """Every row count (one, a 4-row tile and a remainder), output counts that leave a
    partial 8-row block, inputs that leave a partial 32-wide vector, one group or many, and
    a group longer than the int4 accumulation chunk: x @ dequantized(w).T to 1e-4 of the
    largest output (x is rounded to 16 bits)."""
    rng = np.random.default_rng(bits)
    for k, n in [(100, 36), (40, 18), (8192, 24), (20, 2)]:
        if group and k % group:
            continue
        w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32))
        qw = quantize_weight(w, bits, group, 1, False)
        q, scale = qw.q.reshape(-1, k), qw.scale.reshape(n, -1)
        for m in (1, 5):
            x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
            want = x @ dequantized(qw, jnp.float32).T
            got = jax.jit(lambda x: cpu.qmatvec(x, q, scale, bits))(x)
            assert got.shape == (m, n) and got.dtype == jnp.float32
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_a_nan_input_row_gives_nan_outputs_and_leaves_the_others():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32))
    qw = quantize_weight(w, 8, None, 1, False)
    x = jnp.ones((2, 64)).at[0, 3].set(jnp.nan)
    y = cpu.qmatvec(x, qw.q, qw.scale, 8)
    assert bool(jnp.isnan(y[0]).all()) and bool(jnp.isfinite(y[1]).all())


def _lowered(qw, n_in: int = 1) -> str:
    return jax.jit(lambda x: matmul(x, qw, n_in)).lower(jnp.ones((1, 1, 64))).as_text()


def test_quantized_matmul_runs_the_kernel_and_the_switch_turns_it_off(monkeypatch):
    """matmul on a QuantizedWeight lowers to the kernel's custom call on a CPU (a decoding
    step and a prompt alike); ZOO_CPU_KERNELS=0 gives XLA's own product, and the tokens
    zoo.generate makes with the kernel are those it makes without."""
    qw = quantize_weight(jnp.ones((64, 32)), 8, None, 1, False)
    assert cpu.TARGET in _lowered(qw)
    cfg = zoo.preset("tiny-decoder")
    qp = zoo.quantize(zoo.init(cfg, jax.random.key(0)), cfg, bits=8)
    prompt = jnp.array([[5, 17, 42, 9]])
    with_kernel = zoo.generate(qp, cfg, prompt, max_new_tokens=6, stop_tokens=())
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    assert cpu.TARGET not in _lowered(qw)
    np.testing.assert_array_equal(zoo.generate(qp, cfg, prompt, max_new_tokens=6, stop_tokens=()),
                                  with_kernel)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    """No compiler: a RuntimeWarning that says why, then XLA's own product; the build's own
    error names the compiler command."""
    monkeypatch.setenv("ZOO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # /bin/false: a "compiler" that always fails
    monkeypatch.setattr(shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    with pytest.raises(RuntimeError, match="false .*qmatvec.cc"):
        cpu.build()
    monkeypatch.setattr(cpu, "_loaded", None)  # as in a process that has not registered it
    cpu._registered.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="int8/int4 CPU kernel is not available"):
            assert not cpu.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not cpu.available()  # cached: warned once
        qw = quantize_weight(jnp.ones((64, 32)), 8, None, 1, False)
        assert cpu.TARGET not in _lowered(qw)
        np.testing.assert_allclose(matmul(jnp.ones((1, 64)), qw), jnp.full((1, 32), 64.0), rtol=1e-6)
    finally:
        cpu._registered.cache_clear()


def test_the_portable_path_equals_the_vector_path(tmp_path, monkeypatch):
    """Built for a CPU without AVX-512 (x86-64-v2; elsewhere the native build is already
    the plain loop), the kernel's plain C++ loop gives the vector path's results (same int16
    activations, integer sums): int8 and int4, two rows."""
    import ctypes

    monkeypatch.setenv("ZOO_KERNEL_CACHE", str(tmp_path))
    target = "-march=x86-64-v2" if platform.machine() in ("x86_64", "AMD64") else "-march=native"
    flags = tuple(target if f == "-march=native" else f for f in cpu.FLAGS)
    lib = ctypes.cdll.LoadLibrary(str(cpu.build(flags)))
    jax.ffi.register_ffi_target("zoo_qmatvec_portable", jax.ffi.pycapsule(lib.ZooQMatvec), platform="cpu")
    rng = np.random.default_rng(1)
    for bits, group in [(8, None), (4, 32)]:
        w = jnp.asarray(rng.normal(size=(96, 20)).astype(np.float32))
        qw = quantize_weight(w, bits, group, 1, False)
        x = jnp.asarray(rng.normal(size=(2, 96)).astype(np.float32))
        q, scale = qw.q.reshape(-1, 96), qw.scale.reshape(20, -1)
        call = jax.ffi.ffi_call("zoo_qmatvec_portable", jax.ShapeDtypeStruct((2, 20), jnp.float32))
        got = call(x, q, scale, bits=np.int32(bits))
        np.testing.assert_allclose(got, cpu.qmatvec(x, q, scale, bits), rtol=1e-5, atol=1e-5)
