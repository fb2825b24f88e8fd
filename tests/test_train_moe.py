"""MoE training: a shrunk qwen3-30b-a3b (128 -> 4 experts, top-2 of them, a dense layer
before the MoE one) gives the same losses on one device and with its experts sharded over
expert=4,data=2, and its loss falls; (slow) the same through `python -m train`. DeepSeek-V3's
bias update (`score_bias_rate`): the selection bias moves by rate * sign(mean load - load)
of the loads the forward saw, and neither the optimizer nor the gradient clipping sees it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
import zoo
from test_parallel import HP, RTOL, V, _batches, _losses
from train.step import loss_sums
from train_util import losses_on_two_meshes

# 4 heads of 8 over 1 KV head (the preset's 32:4 ratio), experts of width 16.
SHRUNK = dict(d_model=32, num_heads=4, num_kv_heads=1, head_dim=8, d_ff=64, moe_d_ff=16, num_layers=2,
              num_experts=4, experts_per_token=2, dense_layers=[0])


def test_a_shrunk_qwen3_moe_trains_to_the_one_device_losses_with_expert_parallelism():
    cfg = zoo.preset("qwen3-30b-a3b", **SHRUNK, vocab_size=V.size, pad_id=V.pad_id, eos_id=V.eos_id, bos_id=None)
    batches = _batches(cfg, "clm")
    host = jax.device_get(train.init_state(cfg, HP, jax.random.key(0)))
    want, _ = _losses(cfg, HP, host, batches, {"data": 1})
    assert want[-1] < want[0], want  # it trains
    got, shardings = _losses(cfg, HP, host, batches, {"expert": 4, "data": 2})
    np.testing.assert_allclose(got, want, rtol=RTOL)
    experts = shardings.params["decoder"]["layers"]["1"]["moe"]
    assert all(experts[name].spec[1] == "expert" for name in ("wi", "wg", "wo"))


@pytest.mark.slow  # CI time: the check above runs the same model and mesh without the CLI
def test_a_shrunk_qwen3_moe_trains_through_the_cli_on_one_device_and_expert_parallel(tmp_path, tokenizer_path):
    one, on_mesh, saved = losses_on_two_meshes(tmp_path, tokenizer_path, "qwen3-30b-a3b", SHRUNK, "expert=4,data=2")
    assert (saved.num_experts, saved.moe_d_ff, saved.dense_layers, saved.qk_norm) == (4, 16, (0,), True)
    np.testing.assert_allclose(on_mesh, one, rtol=RTOL)


def test_score_bias_moves_by_the_sign_of_the_load_outside_the_optimizer():
    cfg = zoo.preset("tiny-moe", num_layers=1, router="sigmoid", router_score_bias=True, vocab_size=V.size,
                     pad_id=V.pad_id, eos_id=V.eos_id, bos_id=None)
    batch = jax.tree.map(jnp.asarray, _batches(cfg, "clm")[0])
    state = train.init_state(cfg, HP, jax.random.key(0))
    # The loads the forward reports for each layer: the share of the routed slots per expert.
    loads = jax.grad(lambda p: loss_sums(p, cfg, batch, None)["aux"])(state.params)
    load = loads["decoder"]["layers"]["moe"]["score_bias"]  # [L, E]
    np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
    rate = 0.01
    fresh = lambda hp: train.init_state(cfg, hp, jax.random.key(0))  # the step donates its state
    moved, metrics = train.step(fresh(dataclasses.replace(HP, score_bias_rate=rate)), batch)
    want = rate * np.sign(load.mean(-1, keepdims=True) - load)
    np.testing.assert_allclose(moved.params["decoder"]["layers"]["moe"]["score_bias"], want, atol=1e-7)
    still, metrics0 = train.step(fresh(HP), batch)  # rate 0: the bias stays, the rest of the step is the same
    assert not np.any(np.asarray(still.params["decoder"]["layers"]["moe"]["score_bias"]))
    assert float(metrics["grad_norm"]) == pytest.approx(float(metrics0["grad_norm"]))
    np.testing.assert_array_equal(moved.params["decoder"]["layers"]["attn"]["q"],
                                  still.params["decoder"]["layers"]["attn"]["q"])
