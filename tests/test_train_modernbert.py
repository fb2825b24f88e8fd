"""ModernBERT trains with `mlm`: a shrunk modernbert-base gives the same losses on one device
and on data=2,fsdp=2,tensor=2 and its loss falls (test_parallel's packed random rows), and
(slow) it trains through `python -m train` with KEY=VALUE overrides to the same logged losses
on both. Four layers keep what the preset has: an unnormed first layer outside the scan, then
local, local, global layers whose two-sided window of 5 the 32-token rows cross."""


import jax
import numpy as np
import pytest

import train
import zoo
from test_parallel import HP, RTOL, V, _batches, _losses
from train_util import losses_on_two_meshes

SHRUNK = dict(d_model=32, num_heads=4, d_ff=48, num_layers=4, sliding_window=5)
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def test_a_shrunk_modernbert_trains_to_the_one_device_losses_on_a_mesh():
    cfg = zoo.preset("modernbert-base", **SHRUNK, vocab_size=V.size, pad_id=V.pad_id, eos_id=V.eos_id,
                     bos_id=None)
    batches = _batches(cfg, "mlm")
    host = jax.device_get(train.init_state(cfg, HP, jax.random.key(0)))
    assert "attn_norm" not in host.params["encoder"]["first_layer"]
    want, _ = _losses(cfg, HP, host, batches, {"data": 1})
    assert want[-1] < want[0], want
    got, _ = _losses(cfg, HP, host, batches, MESH)
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.slow
def test_a_shrunk_modernbert_trains_through_the_cli_on_one_device_and_a_mesh(tmp_path, tokenizer_path):
    one, on_mesh, saved = losses_on_two_meshes(tmp_path, tokenizer_path, "modernbert-base", SHRUNK, ",".join(f"{k}={v}" for k, v in MESH.items()), "--objective", "mlm")
    assert (saved.d_model, saved.num_layers, saved.sliding_window) == (32, 4, 5)
    assert not saved.first_attn_norm and saved.layer_pattern == ("global", "local", "local")
    np.testing.assert_allclose(on_mesh, one, rtol=RTOL)
