"""Context parallelism: a `context` mesh axis splits every row's sequence; attention keeps
its queries split and gathers keys and values. The same losses as one device, activation
bytes per device that fall with the axis, and clear errors before compiling."""

import functools
from unittest import mock

import jax
import numpy as np
import pytest

import train
import zoo
from conftest import tiny
from test_parallel import HP, RTOL, _batches, _losses
from train.loop import main
from train.parallel import build_mesh, check_context, make_runner
from train.step import abstract_state

# (preset, objective, attention): the decoder's clm rows are packed (two segments, causal);
# blockwise runs several blocks per context shard (32 tokens / 4 shards / block 4), under
# shard_map with the zig-zag order; xla is split by the partitioner alone.
CASES = [("tiny-decoder", "clm", "xla"), ("tiny-decoder", "clm", "blockwise"),
         ("tiny-encoder", "mlm", "blockwise")]


@functools.cache
def _one_device(name, objective):
    """(batches, initial host state, losses on one device with XLA attention): the reference
    of every attention implementation (blockwise equals it to ~1e-7, tests/test_blockwise.py)."""
    cfg = tiny(name, attention="xla")
    batches = _batches(cfg, objective)
    host = jax.device_get(train.init_state(cfg, HP, jax.random.key(0)))
    losses, _ = _losses(cfg, HP, host, batches, {"data": 1})
    return batches, host, losses


@pytest.mark.parametrize("name,objective,attention", CASES, ids=["-".join(c) for c in CASES])
def test_a_context_axis_gives_the_one_device_losses(name, objective, attention):
    batches, host, want = _one_device(name, objective)
    assert want[-1] < want[0]  # it trains
    cfg = tiny(name, attention=attention, attention_block=4)
    got, _ = _losses(cfg, HP, host.replace(cfg=cfg), batches, {"data": 2, "context": 4})
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_the_zigzag_order_gives_every_device_as_many_causal_pairs():
    """Blockwise attention skips the blocks a device's causal mask hides, so a device's work
    follows its visible (query, key) pairs: equal on every device in the zig-zag order, and
    in the plain order the last device has 2C-1 times the first's."""
    from zoo.nn.attention import _reorder, zigzag

    t, c = 64, 4
    order, back = zigzag(c)
    assert sorted(order) == list(range(2 * c)) and [order[i] for i in back] == list(range(2 * c))
    pos = np.arange(t)[None]
    for reorder, spread in [(lambda x: _reorder(x, order), 1.0), (lambda x: x, 2 * c - 1)]:
        shards = np.asarray(reorder(pos)).reshape(c, t // c)
        visible = (shards + 1).sum(axis=1)  # query at position p sees p + 1 keys
        assert visible.max() / visible.min() == pytest.approx(spread, rel=0.1), visible
    x = np.random.default_rng(0).normal(size=(2, t, 3)).astype(np.float32)
    np.testing.assert_array_equal(_reorder(_reorder(x, order), back), x)


def _step_temp_bytes(cfg, batch, context):
    """Temporary bytes per device of the compiled training step on data=2,context=C."""
    mesh = zoo.sharding.make_mesh({"data": 2, "context": context}, jax.devices()[:2 * context])
    runner = make_runner(cfg, HP, mesh, batch)
    abstract = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    state = jax.tree.map(abstract, abstract_state(cfg, HP), runner.state_sh)
    with zoo.sharding.use(mesh, runner.rules):
        compiled = runner._step.lower(state, jax.tree.map(abstract, batch, runner.batch_sh)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_activation_bytes_per_device_fall_with_the_context_axis():
    """Long rows, small weights: the step's temporaries (activations, scores) dominate."""
    cfg = tiny("tiny-decoder", attention="xla", max_len=512)
    batch = {k: jax.ShapeDtypeStruct((2, 256), v.dtype) for k, v in _batches(cfg, "clm")[0].items()}
    sizes = [_step_temp_bytes(cfg, batch, c) for c in (1, 2, 4)]
    assert sizes[1] < sizes[0] * 0.7 and sizes[2] < sizes[1] * 0.7, sizes


def test_context_mistakes_are_clear_errors_before_compiling(tmp_path, capsys):
    assert dict(build_mesh("data=2,context=4").shape) == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 1,
                                                          "context": 4}
    mesh = build_mesh("data=2,context=4")
    rows = {"inputs": jax.ShapeDtypeStruct((8, 30), np.int32)}
    with pytest.raises(ValueError, match=r"--mesh context=4 does not divide .* 30 tokens .* --seq-len"):
        check_context(tiny("tiny-decoder"), mesh, rows)
    even = {"inputs": jax.ShapeDtypeStruct((8, 32), np.int32)}
    for kernel in ("cudnn", "splash"):
        with pytest.raises(ValueError, match=f"attention='{kernel}' cannot run .* \\(context=4\\)"):
            check_context(tiny("tiny-decoder", attention=kernel, dtype="bfloat16"), mesh, even)
    with pytest.raises(ValueError, match="attention='cudnn' cannot run"):  # a forward traced on the mesh
        with zoo.sharding.use(mesh):
            cfg = tiny("tiny-decoder", attention="cudnn", dtype="bfloat16")
            jax.eval_shape(lambda p, t: zoo.decoder.forward(p, cfg, t), zoo.init(cfg, jax.random.key(0)),
                           even["inputs"])
    with pytest.raises(ValueError, match=r"30 queries per row do not split .* \(context=4\)"):
        with zoo.sharding.use(mesh):  # a forward called directly, outside make_runner's check
            cfg = tiny("tiny-decoder", attention="blockwise")
            jax.eval_shape(lambda p, t: zoo.decoder.forward(p, cfg, t), zoo.init(cfg, jax.random.key(0)),
                           rows["inputs"])
    with zoo.sharding.use(mesh):  # "auto" avoids the kernels that cannot split the queries
        with mock.patch.object(zoo.nn.backend, "platform", lambda: "tpu"):
            assert zoo.nn.backend.resolve(tiny("tiny-decoder")).attention == "blockwise"
    jax.devices()
    assert main(["--mesh", "data=2,context=4", "--seq-len", "30", "--run-dir", str(tmp_path / "r")]) == 2
    assert "--mesh context=4 does not divide --seq-len 30" in capsys.readouterr().err
