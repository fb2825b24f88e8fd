"""Tests run on CPU with 8 fake devices, so every sharding path runs without accelerators."""

import contextlib
import os
from pathlib import Path

_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The suite's programs are tiny and each runs a few times, so LLVM's optimisation of the CPU
# code costs more than it saves: at level 0 the training and generation tests take about 40%
# less CPU time (XLA's own HLO passes, fusion included, still run). A run that sets the level
# itself keeps its own. Subprocesses inherit it (notebook kernels and README blocks
# start from a clean XLA_FLAGS and add it back).
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + FAST_CPU_COMPILE
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Real data (../shared/data beside the checkout; ZOO_DATA_DIR overrides). Tests that read it
# fail with a clear message when it is missing rather than skip.
_CANDIDATES = [Path(os.environ["ZOO_DATA_DIR"])] if "ZOO_DATA_DIR" in os.environ else []
_CANDIDATES += [Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")]
DATA_DIR = next((p for p in _CANDIDATES if (p / "tinyshakespeare.txt").is_file()), _CANDIDATES[0])
os.environ["ZOO_DATA_DIR"] = str(DATA_DIR)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import zoo  # noqa: E402

# fp32 matmuls at full precision on every backend: GPUs default to TF32 and TPUs to bf16
# passes, which the suite's fp32 comparisons (numpy, loops, Hugging Face at 1e-4..1e-5)
# would report as bugs. On the CPU fp32 matmuls are exact either way.
jax.config.update("jax_default_matmul_precision", "highest")


def _compile_cache_dir() -> str | None:
    """An opt-in persistent XLA compilation cache for the test processes:
    ZOO_TEST_COMPILE_CACHE=DIR keeps every compiled program in DIR, so a second run of the
    same tests skips most compiling (test_generate: a fifth of the CPU time). Off by default:
    a cold cache costs a run more than the few programs it shares between modules save."""
    return os.environ.get("ZOO_TEST_COMPILE_CACHE") or None


COMPILE_CACHE_DIR = _compile_cache_dir()
if COMPILE_CACHE_DIR:
    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


TINY = ("tiny-encoder", "tiny-decoder", "tiny-encdec")


@pytest.fixture(params=TINY)
def tiny_name(request) -> str:
    return request.param


def tiny(name: str, **overrides) -> zoo.Config:
    """A tiny preset with overrides: the one place tests get model shapes from."""
    return zoo.preset(name, **overrides)


def tokens(key: jax.Array, batch: int, length: int, vocab: int = 128, low: int = 3) -> jax.Array:
    return jax.random.randint(key, (batch, length), low, vocab, dtype=jnp.int32)


# Jitted forwards: tests call them many times with the same shapes, and one compiled
# program is much faster than op-by-op dispatch. Input checks still run at trace time.
forward = jax.jit(zoo.forward, static_argnums=(1,))
encode = jax.jit(zoo.encdec.encode, static_argnums=(1,))


def run(params, cfg: zoo.Config, toks: jax.Array, mask=None, **kw) -> zoo.Output:
    """Forward of any family; encdec uses toks as source and its first half as target."""
    if cfg.family == "encdec":
        return forward(params, cfg, toks, toks[:, : toks.shape[1] // 2], src_mask=mask, **kw)
    return forward(params, cfg, toks, mask=mask, **kw)


@contextlib.contextmanager
def compiles():
    """Counts XLA compilations inside the block: `with compiles() as n: ...; n[0]`."""
    count = [0]

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A small BPE tokenizer trained on Tiny Shakespeare, saved as a .model file."""
    from train_util import small_tokenizer
    path = tmp_path_factory.mktemp("tok") / "shakespeare.model"
    small_tokenizer().save(path)
    return path


@pytest.fixture(scope="session")
def compile_cache_env(tmp_path_factory) -> dict[str, str]:
    """Environment variables for JAX subprocesses (README blocks, notebook kernels): the
    run's persistent compilation cache (`COMPILE_CACHE_DIR`), every program kept, so what each
    fresh process compiles again (a tiny model's init, its forward) compiles once per run."""
    return {"JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE_DIR or str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drops compiled programs after each test module. Every XLA:CPU executable keeps its
    own memory mappings of JIT code; a whole run's worth reached the kernel's per-process
    map limit (vm.max_map_count, 65530) and crashed the compiler."""
    yield
    jax.clear_caches()


# The suite runs on two xdist workers (`pytest -n 2`), which take tests in collection order.
# Started last, a one-minute notebook or multi-process test leaves the other worker idle at
# the end; started first, the short tests fill in around it. (Same tests, same outcomes.)
LONG_FIRST = ("test_notebooks.py::test_notebook_runs", "test_multihost.py", "test_train_cli.py::test_killed",
              "test_parallel.py::test_every_mesh")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(name in item.nodeid for name in LONG_FIRST))
