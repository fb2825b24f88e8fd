"""Shared building blocks of the three families."""

from zoo.nn.attention import Context, attend, attention_mask
from zoo.nn.output import Output

__all__ = ["Context", "Output", "attend", "attention_mask"]
