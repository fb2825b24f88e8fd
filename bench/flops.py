"""FLOPs per token for the bench rows, from zoo's one counter (`zoo.flops`, the same that
gives `python -m train` its MFU). A bench row of seq_len tokens feeds seq_len tokens to each
stack (encdec: source and target both seq_len)."""

from __future__ import annotations

import zoo
from zoo import flops


def _lengths(cfg: zoo.Config, seq_len: int) -> tuple[int, int]:
    return seq_len, seq_len if cfg.family == "encdec" else 0


def train_flops_per_token(cfg: zoo.Config, seq_len: int) -> float:
    return flops.train_flops(cfg, *_lengths(cfg, seq_len)) / seq_len


def forward_flops_per_token(cfg: zoo.Config, seq_len: int, heads: bool = True) -> float:
    """heads=False: the hidden states only (`zoo.flops`), what `bench encode` runs."""
    return flops.forward_flops(cfg, *_lengths(cfg, seq_len), heads=heads) / seq_len
