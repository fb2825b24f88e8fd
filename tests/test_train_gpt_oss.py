"""gpt-oss trains: a shrunk gpt-oss-20b (attention sinks, q/k/v/o biases, a sliding and a full
layer, 4 biased experts top-2 with the clamped SwiGLU) gives the same losses on one device and
with its experts sharded over expert=4,data=2, and its loss falls; (slow) the same through
`python -m train` with KEY=VALUE overrides."""


import jax
import numpy as np
import pytest

import train
import zoo
from test_parallel import HP, RTOL, V, _batches, _losses
from train_util import losses_on_two_meshes

# gpt-oss-20b at test size: 4 heads of 8 over 2 KV heads, a window of 8 that the 32-token
# rows cross, 4 experts of width 16 (one per device of the expert axis).
SHRUNK = dict(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=16, num_layers=2, sliding_window=8,
              num_experts=4, experts_per_token=2)


def test_a_shrunk_gpt_oss_trains_to_the_one_device_losses_with_expert_parallelism():
    cfg = zoo.preset("gpt-oss-20b", **SHRUNK, vocab_size=V.size, pad_id=V.pad_id, eos_id=V.eos_id)
    batches = _batches(cfg, "clm")
    host = jax.device_get(train.init_state(cfg, HP, jax.random.key(0)))
    want, _ = _losses(cfg, HP, host, batches, {"data": 1})
    assert want[-1] < want[0], want  # it trains
    got, shardings = _losses(cfg, HP, host, batches, {"expert": 4, "data": 2})
    np.testing.assert_allclose(got, want, rtol=RTOL)
    experts = shardings.params["decoder"]["layers"]["moe"]
    assert all(experts[name].spec[1] == "expert" for name in ("wi", "wg", "wo", "bi", "bg", "bo"))


@pytest.mark.slow  # CI time: the check above runs the same model and mesh without the CLI
def test_a_shrunk_gpt_oss_trains_through_the_cli_on_one_device_and_expert_parallel(tmp_path, tokenizer_path):
    one, on_mesh, saved = losses_on_two_meshes(tmp_path, tokenizer_path, "gpt-oss-20b", SHRUNK, "expert=4,data=2")
    assert (saved.d_model, saved.num_experts, saved.sliding_window) == (32, 4, 8)
    assert saved.attn_sinks and saved.router_bias and saved.swiglu_limit == 7.0
    assert saved.layer_pattern == ("local", "global")
    np.testing.assert_allclose(on_mesh, one, rtol=RTOL)
