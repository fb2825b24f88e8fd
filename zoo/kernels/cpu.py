"""CPU kernels built on first use: the product of activations with int8/int4 weights.

`qmatvec(x, q, scale, bits)` runs `qmatvec.cc` (an XLA FFI handler) where it can: the first
call compiles it with the system C++ compiler (`$CXX`, else `g++`/`c++`) for this machine
(`-O3 -march=native`) into a cache folder (`$ZOO_KERNEL_CACHE`, default
`~/.cache/zoo/kernels`; keyed by the source, the flags, jaxlib's version and the CPU), loads
it and registers it with XLA. The build takes the widest vector path the CPU has: AVX-512
VNNI, else AVX2 with FMA (`isa()` says which). `available()` says whether the kernel is in
use; where it is not, callers keep XLA's own products (`zoo.nn.linear._quantized`): with no
compiler (the reason is warned about once), and on CPUs with neither vector path (ARM, older
x86), where the kernel's plain C++ loop would be slower than XLA's. `ZOO_CPU_KERNELS=0`
turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("qmatvec.cc")
TARGET = "zoo_qmatvec"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")


def enabled() -> bool:
    """False when `ZOO_CPU_KERNELS` is 0 / false / off."""
    return os.environ.get("ZOO_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def available() -> bool:
    """Whether the kernel is enabled, built, has a vector path and is registered (building
    it on the first call)."""
    return enabled() and _registered() is not None


def isa(library: Path | None = None) -> str:
    """The path a built library runs (default: this machine's build): "avx512-vnni", "avx2"
    or "portable"."""
    lib = ctypes.cdll.LoadLibrary(str(library or build()))
    lib.ZooQMatvecIsa.restype = ctypes.c_char_p
    return lib.ZooQMatvecIsa().decode()


def qmatvec(x: jax.Array, q: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """x f32 [M, K] times the int8 rows q ([N, K]; int4: [N / 2, K], two rows per byte) with
    scale f32 [N, G] (per group of K / G inputs) -> f32 [M, N]. Call only where
    `available()`; CPU only."""
    if _registered() is None:
        raise RuntimeError("zoo.kernels.cpu.qmatvec: the kernel could not be built (see the warning)")
    n = scale.shape[0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), q, scale.astype(jnp.float32), bits=np.int32(bits))


_loaded: Path | None = None  # the library registered in this process: XLA keeps the first


@functools.cache
def _registered() -> Path | None:
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        library = build()
        if isa(library) == "portable":
            return None  # no vector unit the kernel knows: XLA's product is the faster one
        lib = ctypes.cdll.LoadLibrary(str(library))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.ZooQMatvec), platform="cpu")
        _loaded = library
        return library
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"zoo: the int8/int4 CPU kernel is not available ({e}); quantized "
                      "decoding uses XLA's fused loop, which is slower", RuntimeWarning, stacklevel=3)
        return None


def compiler() -> str:
    """The C++ compiler: $CXX, else g++ or c++ on PATH. RuntimeError when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")


def build(flags: tuple[str, ...] = FLAGS) -> Path:
    """The compiled library for this machine, compiling it when the cache lacks it (flags:
    the compiler's; tests build the AVX2 and portable paths with lower -march targets).
    RuntimeError (with the compiler's message) when compilation fails."""
    cxx = compiler()
    key = hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), " ".join(flags).encode(), cxx.encode(),
        _jaxlib_version().encode(), _cpu().encode(),
    ])).hexdigest()[:16]
    folder = Path(os.environ.get("ZOO_KERNEL_CACHE", Path.home() / ".cache" / "zoo" / "kernels"))
    library = folder / f"qmatvec-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    # Compile beside the target, then rename: concurrent first uses (test workers, hosts
    # sharing a home folder) each write their own file and the rename is atomic.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()[-2000:]}")
    os.replace(tmp, library)
    return library


def _jaxlib_version() -> str:
    import jaxlib

    return getattr(jaxlib, "__version__", "")


def _cpu() -> str:
    """What -march=native compiles for: the machine and its CPU's model and feature flags."""
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join([platform.machine(), platform.processor(), *lines])
