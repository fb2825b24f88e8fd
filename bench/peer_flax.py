"""The transformers Flax peer (`--vs hf-flax`): transformers 5 has no Flax models (it dropped
them); 4.57.6, the last release with them, cannot share a virtualenv with transformers 5, so
the bench builds it one (~/.cache/zoo/hf-flax-venv, once) and runs `flax_worker.py` there, a
fresh process per run, on the job `bench.peers` gives (zoo's architecture as a transformers
config, its dtypes and shapes). Where this JAX has CUDA plugins, the virtualenv gets the
same ones (delete it to rebuild after installing them)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax


VENV = Path(os.environ.get("ZOO_HF_FLAX_VENV", Path.home() / ".cache" / "zoo" / "hf-flax-venv"))
PINS = ["transformers==4.57.6", f"jax=={jax.__version__}", f"jaxlib=={jax.__version__}", "flax", "optax"]


def cuda_pins() -> list[str]:
    """This environment's JAX CUDA plugins, pinned, so the peer runs on the same GPU."""
    names = [d.metadata["Name"] for d in importlib.metadata.distributions()]
    return [f"{n}=={importlib.metadata.version(n)}" for n in sorted(set(names))
            if n and n.startswith("jax-cuda") and ("plugin" in n or "pjrt" in n)]


def python() -> Path:
    """The peer's interpreter, creating the virtualenv on first use."""
    exe = VENV / "bin" / "python"
    if not exe.exists():
        pins = PINS + cuda_pins()
        print(f"bench: building the Flax peer's virtualenv in {VENV} ({', '.join(pins)})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", *pins], check=True)
    return exe


def run(job: dict[str, Any]) -> dict[str, Any]:
    """The worker's row for `job` (`bench.peers.job`)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python()), str(Path(__file__).with_name("flax_worker.py")), json.dumps(job)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"--vs hf-flax: the Flax peer failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
