"""Qwen3-MoE: Qwen3's attention (per-head query/key norms) with routed experts in place of
the MLP, read and written by zoo.hf.llama's and zoo.hf.qwen's shared code plus the experts.

Checkpoints (and transformers 5's save_pretrained) store each expert's gate_proj, up_proj
and down_proj as their own tensors (`mlp.experts.{e}.*`) and the router as `mlp.gate`.
A layer in `mlp_only_layers`, or off the `decoder_sparse_step` grid, keeps a dense MLP of
`intermediate_size` (zoo: `Config.dense_layers`); experts are `moe_intermediate_size` wide.
"""

from __future__ import annotations

from typing import Any

from zoo.config import Config
from zoo.hf.common import ModelType, positive, require
from zoo.hf.keymap import Rule, rule
from zoo.hf.llama import read_decoder
from zoo.hf.qwen import _layers, _rules as qwen_rules, _write as qwen_write
from zoo.nn.moe import expert_width

_L = "model.layers.{i}."
_LAYER = "decoder/layers/"
NAME = "qwen3_moe"


def _rules() -> list[Rule]:
    """Qwen3's map (dense MLP layers included) and the router and per-expert tensors."""
    expert = _L + "mlp.experts.{e}."
    return qwen_rules() + [
        rule(_L + "mlp.gate.weight", _LAYER + "moe/router", "linear"),
        rule(expert + "gate_proj.weight", _LAYER + "moe/wg", "linear"),
        rule(expert + "up_proj.weight", _LAYER + "moe/wi", "linear"),
        rule(expert + "down_proj.weight", _LAYER + "moe/wo", "linear_out")]


def _dense_layers(d: dict, num_layers: int) -> tuple[int, ...]:
    """The layers transformers builds with a dense MLP: mlp_only_layers, and the layers off
    the decoder_sparse_step grid ((i + 1) % step != 0)."""
    step = positive(d, NAME, "decoder_sparse_step") if "decoder_sparse_step" in d else 1
    only = d.get("mlp_only_layers") or []
    require(isinstance(only, list) and all(isinstance(i, int) and 0 <= i < num_layers for i in only),
            NAME, "mlp_only_layers", f"expected layer indices in [0, {num_layers}), got {only!r}")
    dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step)
    require(len(dense) < num_layers, NAME, "mlp_only_layers",
            "every layer is dense; zoo reads such a checkpoint as qwen3 only")
    return dense


def _read(d: dict, weights: Any) -> Config:
    num_layers = positive(d, NAME, "num_hidden_layers")
    moe_width = positive(d, NAME, "moe_intermediate_size")
    # Published configs say num_experts; transformers 5 writes its alias num_local_experts.
    experts = dict(num_experts=positive({"num_experts": d.get("num_experts", d.get("num_local_experts"))},
                                        NAME, "num_experts"),
                   experts_per_token=positive(d, NAME, "num_experts_per_tok"),
                   moe_d_ff=None if moe_width == d.get("intermediate_size") else moe_width,
                   router_norm_topk=bool(d.get("norm_topk_prob", False)),
                   dense_layers=_dense_layers(d, num_layers))
    return read_decoder(d, weights, NAME, attn_bias=bool(d.get("attention_bias", False)), qk_norm=True,
                        **_layers(d, NAME), **experts)


def _write(cfg: Config) -> dict:
    out = {**qwen_write(cfg, "qwen3"), "architectures": ["Qwen3MoeForCausalLM"]}
    out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               moe_intermediate_size=expert_width(cfg), norm_topk_prob=cfg.router_norm_topk,
               decoder_sparse_step=1, mlp_only_layers=list(cfg.dense_layers),
               output_router_logits=False)
    return out


QWEN3_MOE = ModelType(NAME, "decoder", _read, _write, _rules(), prefix="model.",
                      ignore=(r"rotary_emb\.inv_freq$",))
