"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share `model_type` phi3): a Llama-shaped decoder
whose checkpoints fuse q, k and v into one qkv_proj and the gate and up projections into one
gate_up_proj (each stacked on the torch output axis).

No biases. A `sliding_window` applies to every layer (Phi-3-mini-4k: 2047). RoPE may rotate a
leading share of each head (`partial_rotary_factor`, Phi-4-mini) and may be `longrope`
(the 128k models: short/long factors, `original_max_position_embeddings` at the top level).
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import ModelType, dropout_of, read_rope, require
from zoo.hf.heads import decoder_heads
from zoo.hf.llama import decoder_rules, read_decoder, write_decoder

_NAME = "phi3"


def _read(d: dict, weights: Any) -> Config:
    rope = read_rope(d, _NAME)
    # Phi3Config refuses the other scalings (and reads its legacy "su" / "yarn" as longrope).
    require(rope.get("rope_scaling") in (None, "longrope"), _NAME, "rope_parameters.rope_type",
            f"value {rope.get('rope_scaling')!r} is not supported by phi3 (supported: ['default', 'longrope'])")
    window = d.get("sliding_window")
    require(window is None or (isinstance(window, int) and window > 0), _NAME, "sliding_window",
            f"expected None or a positive int, got {window!r}")
    return read_decoder(d, weights, _NAME, rope=rope, sliding_window=window,
                        dropout=dropout_of(d, "resid_pdrop", "attention_dropout"))


def _write(cfg: Config) -> dict:
    out = write_decoder(cfg, _NAME)
    out.update(sliding_window=cfg.sliding_window, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout)
    return out


PHI3 = ModelType(_NAME, "decoder", _read, _write, decoder_rules(fused=True), prefix="model.",
                 ignore=(r"rotary_emb\.inv_freq$",), heads=decoder_heads("Phi3", ("sequence", "token")))
