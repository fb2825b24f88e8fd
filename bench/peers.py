"""Peers run on the same shapes in the same process run: transformers with PyTorch
(`hf`) and transformers 4.57.6's Flax models in their own virtualenv (`hf-flax`)."""

from __future__ import annotations

import argparse
from typing import Any

import zoo


def run(peer: str, args: argparse.Namespace, cfg: zoo.Config) -> dict[str, Any]:
    if peer == "hf":
        from bench import peer_torch
        return peer_torch.run(args.bench, cfg, args)
    from bench import peer_flax
    return peer_flax.run(args.bench, cfg, args)
