"""zoo.kernels.cpu: the int8/int4 product kernel that quantized weights run on a CPU."""

import ctypes
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


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


X86 = platform.machine() in ("x86_64", "AMD64")
# Each path of the kernel below the native one, by the -march that selects it: the portable
# loop (x86-64-v2 on x86; elsewhere the native build is that loop) and AVX2 (x86-64-v3,
# which only a CPU with AVX2 and FMA can run: every x86 CI machine has them).
_PATHS = [("x86-64-v2" if X86 else "native", "portable", set()), ("x86-64-v3", "avx2", {"avx2", "fma"})]


@pytest.mark.parametrize("march,path,needs", _PATHS, ids=[p for _, p, _ in _PATHS])
def test_every_path_equals_the_dequantized_product(tmp_path, monkeypatch, march, path, needs):
    """The kernel built for a lower target than this CPU's (AVX2; the plain C++ loop used
    on CPUs with no vector path) gives x @ dequantized(w) too, to the same 1e-4 of the largest
    output: int8 and int4, per channel and grouped, inputs that leave a partial vector, 1 and 5
    x rows, and a partial row block. The native build (the other tests) is AVX-512 VNNI or
    AVX2 by machine."""
    if needs and not (X86 and needs <= _cpu_flags()):
        pytest.skip(f"the AVX2 path cannot run on this CPU ({platform.machine()}, lacks "
                    f"{sorted(needs - _cpu_flags())})")
    monkeypatch.setenv("ZOO_KERNEL_CACHE", str(tmp_path))
    flags = tuple(f"-march={march}" if f == "-march=native" else f for f in cpu.FLAGS)
    library = cpu.build(flags)
    assert cpu.isa(library) == path
    target = f"zoo_qmatvec_{path}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(str(library)).ZooQMatvec),
                                platform="cpu")
    rng = np.random.default_rng(1)
    for bits, group, k in [(8, None, 100), (8, 32, 96), (4, 32, 96), (4, None, 100), (4, 20, 100)]:
        w = jnp.asarray(rng.normal(size=(k, 20)).astype(np.float32))
        qw = quantize_weight(w, bits, group, 1, False)
        q, scale = qw.q.reshape(-1, k), qw.scale.reshape(20, -1)
        for m in (1, 5):
            x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
            want = x @ dequantized(qw, jnp.float32).T
            got = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, 20), jnp.float32))(
                x, q, scale, bits=np.int32(bits))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_a_build_with_no_vector_path_is_not_used(monkeypatch, tmp_path):
    """Where the kernel would run its plain loop (no AVX2 / AVX-512 VNNI), zoo keeps XLA's
    product, without a warning (nothing failed)."""
    monkeypatch.setattr(cpu, "isa", lambda library=None: "portable")
    monkeypatch.setattr(cpu, "_loaded", None)
    cpu._registered.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not cpu.available()
        qw = quantize_weight(jnp.ones((64, 32)), 8, None, 1, False)
        assert cpu.TARGET not in _lowered(qw)
    finally:
        cpu._registered.cache_clear()
