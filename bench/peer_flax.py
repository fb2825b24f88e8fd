"""The transformers Flax peer (`--vs hf-flax`): transformers 4.57.6, the last release with
Flax models, cannot share a virtualenv with transformers 5, so the bench builds it one
(~/.cache/zoo/hf-flax-venv, once) and runs `flax_worker.py` there on the same shapes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax

import zoo

VENV = Path(os.environ.get("ZOO_HF_FLAX_VENV", Path.home() / ".cache" / "zoo" / "hf-flax-venv"))
PINS = ["transformers==4.57.6", f"jax=={jax.__version__}", f"jaxlib=={jax.__version__}", "flax", "optax"]


def python() -> Path:
    """The peer's interpreter, creating the virtualenv on first use."""
    exe = VENV / "bin" / "python"
    if not exe.exists():
        print(f"bench: building the Flax peer's virtualenv in {VENV} ({', '.join(PINS)})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", *PINS], check=True)
    return exe


def run(bench: str, cfg: zoo.Config, args: argparse.Namespace) -> dict[str, Any]:
    job = {"bench": bench, "family": cfg.family, "vocab_size": cfg.vocab_size,
           "d_model": cfg.d_model, "num_layers": cfg.num_layers, "num_decoder_layers": cfg.decoder_layers,
           "num_heads": cfg.num_heads, "head_dim": cfg.head_size, "d_ff": cfg.d_ff,
           "batch_size": args.batch_size, "seq_len": args.seq_len, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "iters": args.iters}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python()), str(Path(__file__).with_name("flax_worker.py")), json.dumps(job)],
                          check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])
