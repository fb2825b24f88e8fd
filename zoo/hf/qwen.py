"""Qwen2 (Qwen2.5) and Qwen3: Llama-shaped decoders, read and written by zoo.hf.llama's
shared code plus what differs.

Qwen2 has q/k/v biases and no output bias. Qwen3 has no biases (or, with `attention_bias`,
q/k/v and o ones) and RMS-normalises each query and key head over head_dim before RoPE
(q_norm / k_norm). Both may slide a window over some layers: `layer_types`, or in older
configs `use_sliding_window` with the layers from `max_window_layers` on sliding.
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import (ModelType, layer_pattern, positive, read_layer_kinds, require,
                           write_layer_types)
from zoo.hf.heads import decoder_heads
from zoo.hf.keymap import Rule, rule
from zoo.hf.llama import decoder_rules, read_decoder, write_decoder

_L = "model.layers.{i}."
_LAYER = "decoder/layers/"


def _rules() -> list[Rule]:
    """Llama's key map and Qwen3's per-head query/key norms (skipped where a config has none)."""
    return decoder_rules() + [rule(f"{_L}self_attn.{x}_norm.weight", f"{_LAYER}attn/{x}_norm/scale")
                              for x in "qk"]


def _layers(d: dict, name: str) -> dict[str, Any]:
    """sliding_window and layer_pattern, as transformers 5 reads them: the window exists only
    with use_sliding_window; layer_types says which layers use it."""
    num_layers = positive(d, name, "num_hidden_layers")
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    first = d.get("max_window_layers", 28)  # Qwen2Config's default
    default = ["sliding_attention" if window is not None and i >= first else "full_attention"
               for i in range(num_layers)]
    kinds = read_layer_kinds(d, name, num_layers, default)
    if "local" not in kinds:
        return dict(sliding_window=None, layer_pattern=())
    require(window is not None, name, "layer_types",
            "has sliding_attention layers but use_sliding_window is false (no window to slide)")
    require(isinstance(window, int) and window > 0, name, "sliding_window",
            f"expected a positive int, got {window!r}")
    return dict(sliding_window=window, layer_pattern=layer_pattern(kinds))


def _read(d: dict, weights: Any, name: str) -> Config:
    if name == "qwen2":
        attention = dict(attn_bias=True, attn_out_bias=False)
    else:
        attention = dict(attn_bias=bool(d.get("attention_bias", False)), qk_norm=True)
    return read_decoder(d, weights, name, **attention, **_layers(d, name))


def _write(cfg: Config, name: str) -> dict:
    out = write_decoder(cfg, name)
    kinds = [cfg.layer_kind(i) for i in range(cfg.num_layers)]
    sliding = "local" in kinds
    out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window if sliding else None,
               # transformers 4.x slides the layers from max_window_layers on; 5.x reads layer_types
               max_window_layers=kinds.index("local") if sliding else cfg.num_layers,
               layer_types=write_layer_types(cfg))
    if name == "qwen3":
        out["attention_bias"] = cfg.attn_bias
    return out


def _model_type(name: str) -> ModelType:
    return ModelType(name, "decoder", lambda d, w: _read(d, w, name), lambda cfg: _write(cfg, name),
                     _rules(), prefix="model.", ignore=(r"rotary_emb\.inv_freq$",),
                     heads=decoder_heads(name.capitalize()))  # their QA keeps the body under "transformer."


QWEN2 = _model_type("qwen2")
QWEN3 = _model_type("qwen3")
