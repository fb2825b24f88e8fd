"""zoo.flops, the one FLOP counter behind the MFU of `python -m train` and `python -m bench`,
against counts written out by hand from the tiny presets' shapes."""

import pytest

import zoo
from bench import flops as bench_flops
from conftest import tiny
from train.report import train_flops

T = 16  # tokens per row


def _decoder_by_hand(moe: bool) -> float:
    """tiny-decoder / tiny-moe: d 32, 2 layers, 4 heads of 8, 2 kv heads, SwiGLU d_ff 64,
    untied head over 128 ids; tiny-moe: 4 experts, 2 per token."""
    attn = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32  # q, k, v (2 kv heads x 8), o
    swiglu = 3 * 32 * 64  # gate, up, down
    mlp = 32 * 4 + 2 * swiglu if moe else swiglu  # router + the 2 experts a token visits
    per_token = 2 * (2 * (attn + mlp) + 32 * 128)  # 2 FLOPs per multiply-add; the head
    attention = 2 * 4 * T * T * 32  # 2 layers x (QK^T + PV) x T queries x T keys x 4 heads x 8
    return 3 * (per_token * T + attention)


def _encdec_by_hand(src: int, tgt: int) -> float:
    """tiny-encdec (T5 v1.1 style): 4 heads of 8 (no GQA), GeGLU d_ff 64, untied head; the
    decoder's cross keys/values project the src encoder outputs."""
    attn, geglu = 4 * 32 * 32, 3 * 32 * 64
    encoder = 2 * (attn + geglu) * src
    decoder = 2 * (attn + 2 * 32 * 32 + geglu) * tgt + 2 * (2 * 32 * 32) * src + 32 * 128 * tgt
    attention = 2 * 4 * 32 * (src * src + tgt * tgt + tgt * src)
    return 3 * (2 * (encoder + decoder) + attention)


def test_mla_flops_match_a_hand_count():
    """Multi-head latent attention (tests/test_mla.py's shape: 4 heads, query bottleneck 12,
    latent 16, 8 + 4 query/key dims and 6 value dims per head): its five projections, and
    scores over 12 dims plus values over 6."""
    cfg = tiny("tiny-decoder", kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
               v_head_dim=6, head_dim=12)
    attn = 32 * 12 + 12 * 4 * 12 + 32 * (16 + 4) + 16 * 4 * (8 + 6) + 4 * 6 * 32  # q_a, q_b, kv_a, kv_b, o
    per_token = 2 * (2 * (attn + 3 * 32 * 64) + 32 * 128)
    attention = 2 * 2 * T * T * 4 * (8 + 4 + 6)  # 2 layers x 2 FLOPs x T x T x heads x dims
    assert zoo.flops.train_flops(cfg, T) == 3 * (per_token * T + attention)


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-moe"])
def test_decoder_flops_match_a_hand_count(name):
    cfg = tiny(name)
    want = _decoder_by_hand(moe=cfg.moe)
    assert zoo.flops.train_flops(cfg, T) == want
    # The MoE count is that of the active experts: less than every expert would give.
    if cfg.moe:
        every = zoo.flops.train_flops(cfg.replace(experts_per_token=cfg.num_experts), T)
        assert every - want == 3 * 2 * 2 * (2 * 3 * 32 * 64) * T


def test_encdec_flops_match_a_hand_count():
    assert zoo.flops.train_flops(tiny("tiny-encdec"), 12, 5) == _encdec_by_hand(12, 5)


def test_gathered_tables_and_tied_heads():
    """Position tables cost nothing; a tied token table is the head's matmul."""
    cfg = tiny("tiny-decoder")
    untied = zoo.flops.matmul_flops(cfg, T)
    assert zoo.flops.matmul_flops(cfg.replace(positions="learned"), T) == untied
    assert zoo.flops.matmul_flops(cfg.replace(tie_embeddings=True), T) == untied


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-moe", "tiny-encdec"])
def test_train_and_bench_count_the_same(name):
    cfg = tiny(name)
    targets = T if cfg.family == "encdec" else 0
    assert bench_flops.train_flops_per_token(cfg, T) * T == train_flops(cfg, T, targets)
    assert bench_flops.forward_flops_per_token(cfg, T) * T * 3 == train_flops(cfg, T, targets)


def test_hidden_states_only_leave_out_the_heads():
    """heads=False (bench encode; fine-tuning a task head): tiny-encoder's 2 layers (q, k, v,
    o of 32 x 32, a 32 x 64 MLP both ways) and attention, without the MLM transform, the
    pooler and the tied vocabulary projection that the full count adds."""
    cfg = tiny("tiny-encoder")
    layers = 2 * (4 * 32 * 32 + 2 * 32 * 64) * T
    attention = 2 * 2 * 4 * T * T * 8 * 2  # 2 layers x 2 FLOPs x T x T x 4 heads x (8 + 8) dims
    assert zoo.flops.forward_flops(cfg, T, heads=False) == 2 * layers + attention
    heads = 32 * 32 * T + 32 * 32 + 128 * 32 * T  # MLM transform, pooler (one row), tied head
    assert zoo.flops.forward_flops(cfg, T) == 2 * (layers + heads) + attention
    assert bench_flops.forward_flops_per_token(cfg, T, heads=False) * T == 2 * layers + attention
