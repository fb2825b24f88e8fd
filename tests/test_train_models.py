"""The decoders of issue 17 train: every new model type's preset (qwen2, qwen3, gemma2,
gemma3_text, phi3), shrunk by Config overrides, gives the same losses on one device and on
a test mesh and its loss falls; a shrunk gemma-3-1b trains through `python -m train` with
KEY=VALUE overrides to the same logged losses on one device and on a mesh."""

import json
import warnings

import jax
import numpy as np
import pytest

import train
import zoo
from test_parallel import HP, RTOL, V, _batches, _losses
from train_util import losses_on_two_meshes
from zoo.hf import MODEL_TYPES

# One preset per model type added with them.
NEW_TYPES = {"qwen2.5-7b": "qwen2", "qwen3-0.6b": "qwen3", "gemma-2-2b": "gemma2",
             "gemma-3-1b": "gemma3_text", "phi-3-mini": "phi3"}
# Where each trains besides one device (between them, test_parallel's PLACES), and any
# overrides over `shrink` (8 query heads split over tensor=8; its 2 KV heads replicate with
# a warning). gemma-3-1b trains on data=2,fsdp=2,tensor=2 through the CLI below.
MESHES = {"qwen2.5-7b": ({"data": 2, "fsdp": 2, "tensor": 2}, "jit", {}),
          "qwen3-0.6b": ({"data": 8}, "pmap", {}),
          "gemma-2-2b": ({"tensor": 8}, "jit", {"num_heads": 8}),
          "phi-3-mini": ({"data": 8}, "jit", {})}
D_MODEL = 32


def shrink(name: str) -> dict:
    """Config overrides that keep a preset's mechanisms at a test's size: 4 heads of size 8 (the
    preset's query/KV head ratio, at least one KV head); a local/global pattern as one
    period of (local, global) and a layer after it (gemma-3's five local layers per global
    one shortened to one: the same scan over periods, a third of the compile); a sliding
    window of 8 that a 32-token row crosses; and Gemma's embedding scale sqrt(d_model) of
    the new width (the preset's holds the published width's: a shrunk model would otherwise
    scale by sqrt(1152))."""
    cfg = zoo.preset(name)
    out = dict(d_model=D_MODEL, num_heads=4, num_kv_heads=max(1, 4 * cfg.kv_heads // cfg.num_heads),
               head_dim=8, d_ff=64, num_layers=2)
    if cfg.layer_pattern:
        out.update(layer_pattern=["local", "global"], num_layers=3)
    if cfg.sliding_window is not None:
        out["sliding_window"] = 8
    if cfg.embed_scale != 1.0:
        assert cfg.embed_scale == cfg.d_model ** 0.5, name
        out["embed_scale"] = D_MODEL ** 0.5
    return out


def test_every_new_type_trains_here():
    assert set(NEW_TYPES.values()) <= set(MODEL_TYPES)
    assert set(MESHES) | {"gemma-3-1b"} == set(NEW_TYPES)


# phi-3 (Llama's layer with a window, on plain data parallelism) runs with -m slow: CI time.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "phi-3-mini" else n
                                  for n in MESHES])
def test_a_shrunk_preset_trains_to_the_one_device_losses_on_a_mesh(name):
    shape, parallel, extra = MESHES[name]
    cfg = zoo.preset(name, **{**shrink(name), **extra}, vocab_size=V.size, pad_id=V.pad_id, eos_id=V.eos_id,
                     bos_id=None)
    batches = _batches(cfg, "clm")
    host = jax.device_get(train.init_state(cfg, HP, jax.random.key(0)))
    want, _ = _losses(cfg, HP, host, batches, {"data": 1})
    assert want[-1] < want[0], want  # it trains
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "sharding: dim .* does not divide", UserWarning)
        got, _ = _losses(cfg, HP, host, batches, shape, parallel)
    np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{name} on {shape} {parallel}")


def test_a_shrunk_gemma_3_trains_through_the_cli_on_one_device_and_a_mesh(tmp_path, tokenizer_path):
    """`python -m train --model gemma-3-1b d_model=32 ...`: the KEY=VALUE overrides reach
    the model (config.json), and a mesh logs the one-device losses."""
    one, on_mesh, saved = losses_on_two_meshes(tmp_path, tokenizer_path, "gemma-3-1b", shrink("gemma-3-1b"), "data=2,fsdp=2,tensor=2")
    assert (saved.d_model, saved.num_layers, saved.sliding_window, saved.embed_scale) == (
        D_MODEL, 3, 8, D_MODEL ** 0.5)
    assert saved.layer_pattern == ("local", "global") and saved.qk_norm and saved.norm_position == "sandwich"
    np.testing.assert_allclose(on_mesh, one, rtol=RTOL)


# deepseek-v3 at test size: MLA with a query bottleneck, one dense layer, then 8 routed
# experts in 4 groups (2 picked per token) and a shared expert. Slow (minutes on 2 shared cores).
DEEPSEEK_V3_SHRUNK = dict(d_model=D_MODEL, num_heads=4, head_dim=12, q_lora_rank=12, kv_lora_rank=16,
                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, d_ff=64, moe_d_ff=16,
                          num_layers=2, dense_layers=[0], num_experts=8, experts_per_token=2,
                          router_groups=4, router_topk_groups=2)


@pytest.mark.slow
def test_a_shrunk_deepseek_v3_trains_through_the_cli_on_one_device_and_expert_parallel(tmp_path, tokenizer_path):
    """`python -m train --model deepseek-v3 ...` logs the same losses on one device and with
    the experts sharded over `--mesh expert=4,data=2`, and its loss falls."""
    one, on_mesh, saved = losses_on_two_meshes(tmp_path, tokenizer_path, "deepseek-v3", DEEPSEEK_V3_SHRUNK, "expert=4,data=2")
    assert saved.mla and saved.router == "sigmoid" and saved.dense_layers == (0,)
    np.testing.assert_allclose(on_mesh, one, rtol=RTOL)
