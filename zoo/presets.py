"""Named shapes of published models, and tiny ones for tests.

Parameter counts equal those of the published checkpoints (tests/test_presets.py)."""

from __future__ import annotations

from typing import Any

from zoo.config import Config

_BERT = dict(family="encoder", vocab_size=30522, activation="gelu", norm="layernorm",
             norm_eps=1e-12, norm_position="post", embed_norm=True, final_norm=False,
             positions="learned", max_len=512, type_vocab_size=2, tie_embeddings=True,
             logits_bias=True, mlm_transform=True, pooler=True, pad_id=0, eos_id=None)
_GPT2 = dict(family="decoder", vocab_size=50257, activation="gelu_tanh", norm="layernorm",
             positions="learned", max_len=1024, tie_embeddings=True, initializer="gpt2",
             pad_id=50256, bos_id=50256, eos_id=50256)
_LLAMA = dict(family="decoder", activation="swiglu", norm="rmsnorm", norm_bias=False,
              attn_bias=False, mlp_bias=False, positions="rope")
_LLAMA3 = dict(_LLAMA, vocab_size=128256, rope_theta=500000.0, rope_scaling="llama3",
               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
               max_len=131072, num_heads=32, num_kv_heads=8,
               pad_id=128004, bos_id=128000, eos_id=128001)
_MISTRAL = dict(_LLAMA, vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                num_kv_heads=8, d_ff=14336, max_len=32768, tie_embeddings=False,
                pad_id=0, bos_id=1, eos_id=2)
_T5 = dict(family="encdec", vocab_size=32128, activation="relu", norm="rmsnorm", norm_bias=False,
           norm_eps=1e-6, attn_bias=False, mlp_bias=False, positions="relative", max_len=512,
           relative_buckets=32, relative_max_distance=128, attn_scale=1.0, tie_embeddings=True,
           initializer="t5", pad_id=0, eos_id=1, decoder_start_id=0)
_BART = dict(family="encdec", vocab_size=50265, activation="gelu", norm="layernorm",
             norm_position="post", embed_norm=True, final_norm=False, positions="learned",
             max_len=1024, position_offset=2, tie_embeddings=True, logits_bias=True,
             pad_id=1, bos_id=0, eos_id=2, decoder_start_id=2)
# Whisper: log-mel features through a conv stem into a pre-norm encoder with sinusoidal
# positions over 1500 positions (3000 frames, 30 s); learned decoder positions over 448.
_WHISPER = dict(family="encdec", vocab_size=51865, activation="gelu", norm="layernorm",
                attn_key_bias=False, positions="learned", max_len=448, encoder_positions="sinusoidal",
                encoder_max_len=1500, num_mel_bins=80, tie_embeddings=True,
                pad_id=50257, bos_id=50257, eos_id=50257, decoder_start_id=50258)

# Gemma 2/3: (1 + w) RMSNorms on both sides of each sub-layer, embeddings scaled by sqrt(d_model)
# (set again when a shrunk preset changes d_model), local/global layer patterns.
_GEMMA = dict(family="decoder", activation="geglu_tanh", norm="rmsnorm", norm_bias=False, norm_eps=1e-6,
              norm_position="sandwich", norm_offset=1.0, attn_bias=False, mlp_bias=False,
              positions="rope", head_dim=256, tie_embeddings=True, pad_id=0, bos_id=2, eos_id=1)

# Qwen2.5 / Qwen3: Llama's shape; Qwen2 adds q/k/v biases, Qwen3 per-head query/key norms.
_QWEN = dict(_LLAMA, vocab_size=151936, norm_eps=1e-6, rope_theta=1e6, pad_id=151643, bos_id=151643,
             eos_id=151645)

# DeepSeek-V2/V3: multi-head latent attention (512-dim latent, 128 + 64 query/key dims per head,
# interleaved rope pairs, YaRN x40 from 4k), dense first layers, then routed + shared experts.
_DEEPSEEK = dict(_LLAMA, norm_eps=1e-6, max_len=163840, rope_theta=10000.0, rope_scaling="yarn",
                 rope_scaling_factor=40.0, rope_original_max_len=4096, kv_lora_rank=512,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, head_dim=192,
                 rope_interleave=True, tie_embeddings=False, pad_id=None)

# gpt-oss: mixture-of-experts layers (biased router, biased experts with a clamped SwiGLU),
# attention sinks, q/k/v/o biases, sliding (128) and full layers alternating, YaRN x32.
_GPT_OSS = dict(family="decoder", vocab_size=201088, activation="swiglu", norm="rmsnorm", norm_bias=False,
                norm_eps=1e-5, attn_bias=True, mlp_bias=True, attn_sinks=True, positions="rope",
                rope_theta=150000.0, rope_scaling="yarn", rope_scaling_factor=32.0,
                rope_original_max_len=4096, rope_truncate=False, max_len=131072, head_dim=64,
                num_heads=64, num_kv_heads=8, sliding_window=128, layer_pattern=("local", "global"),
                router_bias=True, swiglu_limit=7.0, tie_embeddings=False, pad_id=199999, eos_id=200002)

# ModernBERT: pre-LayerNorm without biases (layer 0's attention reads the embedding norm),
# GeGLU, RoPE with a global and a local base, a global layer every third and two-sided local
# windows of +-64 (local_attention 128); GPT-2's scaled init of the residual projections.
_MODERNBERT = dict(family="encoder", vocab_size=50368, activation="geglu", norm="layernorm",
                   norm_bias=False, norm_eps=1e-5, norm_position="pre", embed_norm=True,
                   final_norm=True, first_attn_norm=False, attn_bias=False, mlp_bias=False,
                   positions="rope", max_len=8192, rope_theta=160000.0, local_rope_theta=10000.0,
                   sliding_window=65, layer_pattern=("global", "local", "local"), tie_embeddings=True,
                   logits_bias=True, mlm_transform=True, initializer="gpt2",
                   pad_id=50283, bos_id=50281, eos_id=50282)

_PRESETS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": dict(_BERT, d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "modernbert-base": dict(_MODERNBERT, d_model=768, num_layers=22, num_heads=12, d_ff=1152),
    "bert-large-uncased": dict(_BERT, d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
    # ALBERT: BERT's layer, 128-wide embeddings projected to the width, one layer's
    # parameters run 12 times; [CLS] 2, [SEP] 3.
    "albert-base-v2": dict(_BERT, vocab_size=30000, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
                           activation="gelu_tanh", embed_dim=128, shared_layers=1, bos_id=2, eos_id=3),
    # DistilBERT: BERT-base's layer, half the depth, no token types, no pooler.
    "distilbert-base-uncased": dict(_BERT, d_model=768, num_layers=6, num_heads=12, d_ff=3072,
                                    type_vocab_size=0, pooler=False),
    "roberta-base": dict(_BERT, vocab_size=50265, norm_eps=1e-5, type_vocab_size=1,
                         position_offset=2, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
                         pad_id=1, bos_id=0, eos_id=2),
    "gpt2": dict(_GPT2, d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "gpt2-medium": dict(_GPT2, d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
    "llama-3.2-1b": dict(_LLAMA3, d_model=2048, num_layers=16, head_dim=64, d_ff=8192,
                         rope_scaling_factor=32.0, tie_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA3, d_model=4096, num_layers=32, head_dim=128, d_ff=14336,
                         rope_scaling_factor=8.0, tie_embeddings=False),
    "mistral-7b": dict(_MISTRAL, rope_theta=10000.0, sliding_window=4096),
    "mixtral-8x7b": dict(_MISTRAL, rope_theta=1e6, num_experts=8, experts_per_token=2),
    "t5-small": dict(_T5, d_model=512, num_layers=6, num_heads=8, d_ff=2048, logit_scale=512 ** -0.5),
    "t5-base": dict(_T5, d_model=768, num_layers=12, num_heads=12, d_ff=3072, logit_scale=768 ** -0.5),
    "flan-t5-base": dict(_T5, d_model=768, num_layers=12, num_heads=12, head_dim=64, d_ff=2048,
                         activation="geglu_tanh", tie_embeddings=False),
    "bart-base": dict(_BART, d_model=768, num_layers=6, num_heads=12, d_ff=3072),
    "whisper-tiny": dict(_WHISPER, d_model=384, num_layers=4, num_heads=6, d_ff=1536),
    "whisper-base": dict(_WHISPER, d_model=512, num_layers=6, num_heads=8, d_ff=2048),
    "whisper-large-v3": dict(_WHISPER, vocab_size=51866, num_mel_bins=128, d_model=1280, num_layers=32,
                             num_heads=20, d_ff=5120, pad_id=50256),
    "qwen2.5-7b": dict(_QWEN, vocab_size=152064, attn_bias=True, attn_out_bias=False, d_model=3584,
                       num_layers=28, num_heads=28, num_kv_heads=4, d_ff=18944, max_len=131072,
                       tie_embeddings=False, eos_id=151643),
    "qwen3-0.6b": dict(_QWEN, qk_norm=True, d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, d_ff=3072, max_len=40960, tie_embeddings=True),
    "qwen3-8b": dict(_QWEN, qk_norm=True, d_model=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                     d_ff=12288, max_len=40960, tie_embeddings=False),
    # Qwen3-30B-A3B: 128 experts of width 768, 8 routed per token (renormalised), no dense layer.
    "qwen3-30b-a3b": dict(_QWEN, qk_norm=True, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                          head_dim=128, d_ff=6144, moe_d_ff=768, num_experts=128, experts_per_token=8,
                          max_len=40960, tie_embeddings=False),
    # Phi-3-mini-4k: q/k/v and gate/up fused in its checkpoints, every layer sliding.
    "phi-3-mini": dict(_LLAMA, vocab_size=32064, d_model=3072, num_layers=32, num_heads=32,
                       num_kv_heads=32, d_ff=8192, max_len=4096, sliding_window=2047,
                       tie_embeddings=False, pad_id=32000, bos_id=1, eos_id=32000),
    "gemma-2-2b": dict(_GEMMA, vocab_size=256000, d_model=2304, num_layers=26, num_heads=8,
                       num_kv_heads=4, d_ff=9216, max_len=8192, rope_theta=10000.0,
                       sliding_window=4096, layer_pattern=("local", "global"),
                       attn_softcap=50.0, final_softcap=30.0, embed_scale=2304 ** 0.5),
    "gemma-3-1b": dict(_GEMMA, vocab_size=262144, d_model=1152, num_layers=26, num_heads=4,
                       num_kv_heads=1, d_ff=6912, max_len=32768, rope_theta=1e6,
                       local_rope_theta=1e4, sliding_window=512,
                       layer_pattern=("local",) * 5 + ("global",), qk_norm=True,
                       embed_scale=1152 ** 0.5),
    "gpt-oss-20b": dict(_GPT_OSS, d_model=2880, num_layers=24, d_ff=2880, num_experts=32, experts_per_token=4),
    # DeepSeek-V3 without its multi-token-prediction layer; V3's sigmoid router with the
    # selection bias over 8 groups of 32 experts, 4 groups per token.
    "deepseek-v3": dict(_DEEPSEEK, vocab_size=129280, d_model=7168, num_layers=61, num_heads=128, d_ff=18432,
                        q_lora_rank=1536, num_experts=256, experts_per_token=8, moe_d_ff=2048, shared_experts=1,
                        dense_layers=(0, 1, 2), router="sigmoid", router_score_bias=True, router_groups=8,
                        router_topk_groups=4, routed_scaling=2.5, rope_mscale=1.0, rope_mscale_all_dim=1.0,
                        bos_id=0, eos_id=1),
    "deepseek-v2-lite": dict(_DEEPSEEK, vocab_size=102400, d_model=2048, num_layers=27, num_heads=16, d_ff=10944,
                             num_experts=64, experts_per_token=6, moe_d_ff=1408, shared_experts=2, dense_layers=(0,),
                             router_norm_topk=False, rope_mscale=0.707, rope_mscale_all_dim=0.707,
                             bos_id=100000, eos_id=100001),
    # Tiny shapes for tests and demos: same code paths, seconds on a CPU.
    "tiny-encoder": dict(_BERT, vocab_size=128, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                         max_len=64, norm_eps=1e-5),
    "tiny-decoder": dict(_LLAMA, vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, d_ff=64, max_len=128, tie_embeddings=False,
                         pad_id=0, bos_id=2, eos_id=1),
    "tiny-encdec": dict(_T5, vocab_size=128, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                        max_len=128, relative_buckets=8, relative_max_distance=16,
                        activation="geglu_tanh", tie_embeddings=False),
    "tiny-moe": dict(_LLAMA, vocab_size=128, d_model=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, d_ff=64, max_len=128, tie_embeddings=False,
                     num_experts=4, experts_per_token=2, pad_id=0, bos_id=2, eos_id=1),
}


def names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str, **overrides: Any) -> Config:
    """The Config of a named model (`zoo.presets.names()` lists them); overrides replace
    fields, e.g. `preset("gpt2", dtype="bfloat16")`."""
    if name not in _PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; expected one of {names()}")
    return Config(**{**_PRESETS[name], **overrides})
