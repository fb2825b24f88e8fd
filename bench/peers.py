"""Peers run on the same shapes in the same process run: transformers with PyTorch
(`hf`) and transformers 4.57.6's Flax models in their own virtualenv (`hf-flax`)."""

from __future__ import annotations

import argparse
from typing import Any

import zoo


def run(peer: str, args: argparse.Namespace, cfg: zoo.Config) -> dict[str, Any]:
    if peer == "hf":
        from bench import peer_torch
        try:
            return peer_torch.run(args.bench, cfg, args)
        except RuntimeError as e:  # torch.OutOfMemoryError on a GPU: report it, keep zoo's row
            if "out of memory" not in str(e).lower():
                raise
            return {"tokens_per_s": None, "error": f"out of memory: {str(e).splitlines()[0]}"}
        finally:
            peer_torch.release()
    from bench import peer_flax
    return peer_flax.run(args.bench, cfg, args)
