"""FLOP counts for MFU: 6 N per trained token (N = parameters in matmuls) plus attention
12 L T d_attn (PaLM's formula: scores and values, forward and backward, full T x T)."""

from __future__ import annotations

import zoo


def matmul_params(cfg: zoo.Config) -> int:
    """Parameters that take part in a matmul per token: everything but gathered tables
    (token, type and position embeddings), plus the vocabulary projection when tied.
    MoE counts only the experts a token visits."""
    spec = zoo.spec(cfg)
    total = zoo.param_count(cfg)
    embed = spec["embed"]["tokens"].shape
    gathered = embed[0] * embed[1]
    if "types" in spec["embed"]:
        gathered += spec["embed"]["types"].shape[0] * cfg.d_model
    for stack in ("encoder", "decoder"):
        if stack in spec and "positions" in spec[stack]:
            shape = spec[stack]["positions"].shape
            gathered += shape[0] * shape[1]
    n = total - gathered
    if cfg.tie_embeddings:
        n += embed[0] * embed[1]
    if cfg.moe:
        layers = cfg.num_layers
        per_expert = (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff
        n -= layers * per_expert * (cfg.num_experts - cfg.experts_per_token)
    return n


def attention_flops_per_token(cfg: zoo.Config, seq_len: int, layers: int) -> float:
    """Forward attention FLOPs per token: QK^T and PV over seq_len keys, 2 FLOPs per MAC."""
    return 4.0 * layers * seq_len * cfg.num_heads * cfg.head_size


def train_flops_per_token(cfg: zoo.Config, seq_len: int) -> float:
    layers = cfg.num_layers + (cfg.decoder_layers if cfg.family == "encdec" else 0)
    return 6.0 * matmul_params(cfg) + 3.0 * attention_flops_per_token(cfg, seq_len, layers)


def forward_flops_per_token(cfg: zoo.Config, seq_len: int) -> float:
    layers = cfg.num_layers + (cfg.decoder_layers if cfg.family == "encdec" else 0)
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, layers)
