"""ModernBERT trains with `mlm`: a shrunk modernbert-base gives the same losses on one device
and on data=2,fsdp=2,tensor=2 and its loss falls (test_parallel's packed random rows), and
(slow) it trains through `python -m train` with KEY=VALUE overrides to the same logged losses
on both. Four layers keep what the preset has: an unnormed first layer outside the scan, then
local, local, global layers whose two-sided window of 5 the 32-token rows cross."""

import json

import jax
import numpy as np
import pytest

import train
import zoo
from test_parallel import HP, RTOL, V, _batches, _losses
from train.loop import main
from train.report import read_metrics
from train_util import cli_args

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
    overrides = [f"{k}={json.dumps(v)}" for k, v in SHRUNK.items()]
    losses = {}
    for mesh in ("data=1", ",".join(f"{k}={v}" for k, v in MESH.items())):
        run_dir = tmp_path / mesh.replace(",", "_").replace("=", "")
        argv = cli_args(run_dir, tokenizer_path, "--model", "modernbert-base", "--objective", "mlm",
                        "--steps", "4", "--lr", "1e-2", "--warmup", "0", "--eval-every", "4",
                        "--eval-batches", "1", "--mesh", mesh, *overrides)
        assert main(argv) == 0, mesh
        losses[mesh] = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    saved = zoo.Config.from_json((run_dir / "config.json").read_text())
    assert (saved.d_model, saved.num_layers, saved.sliding_window) == (32, 4, 5)
    assert not saved.first_attn_norm and saved.layer_pattern == ("global", "local", "local")
    one, mesh = losses.values()
    assert len(one) == 4 and one[-1] < one[0], one
    np.testing.assert_allclose(mesh, one, rtol=RTOL)
