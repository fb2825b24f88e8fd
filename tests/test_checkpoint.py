"""Checkpoints (train/checkpoint.py): round trip, retention, another mesh, bad checkpoints:
every kind of damage is found and passed over for the newest intact checkpoint."""

import contextlib
import gc
import re
import shutil

import jax
import numpy as np
import pytest

import train
import zoo
from conftest import tiny
from train.checkpoint import Checkpointer, CheckpointDamaged, CheckpointError, check_record
from train.rundir import NotFinite

# orbax leaves the reads of a failed restore to the garbage collector: the tests that make
# one collect it themselves, and its complaints are not this module's failures.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
HP = train.Hparams(warmup_steps=0)
ONE = zoo.sharding.make_mesh({"data": 1}, jax.devices()[:1])
RECORD = {"config": {"d_model": 32}, "objective": "clm", "seq_len": 32, "batch_size": 8, "seed": 0,
          "tokenizer": "abc", "data_fingerprint": "def",
          "hparams": {"learning_rate": 1e-3, "total_steps": 10}}


@contextlib.contextmanager
def _opened(directory, **kw):
    ckpt = Checkpointer(directory, every=1, **kw)
    try:
        yield ckpt
    finally:
        ckpt.close()


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A decoder state advanced one step and saved at steps 1..4 with keep=2."""
    cfg = tiny("tiny-decoder")
    state = train.create_state(cfg, HP, 0, ONE)
    batch = {"inputs": np.full((2, 8), 5, np.int32), "targets": np.full((2, 8), 6, np.int32),
             "weights": np.ones((2, 8), np.float32)}
    state, _ = train.step(state, batch)
    directory = tmp_path_factory.mktemp("ckpt")
    ckpt = Checkpointer(directory, every=1, keep=2)
    for s in range(1, 5):
        ckpt.save(s, state, {**RECORD, "data": {"epoch": 0, "index": 8 * s}}, force=True)
    ckpt.close()
    return cfg, state, directory


def test_round_trip_keeps_the_last_k(saved):
    cfg, state, directory = saved
    with _opened(directory, keep=2) as ckpt:
        assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
        step, record = ckpt.read_record()
        restored = ckpt.restore(train.abstract_state(cfg, HP), ONE)
    assert step == 4 and record["data"] == {"epoch": 0, "index": 32} and record["objective"] == "clm"
    assert _equal(restored.params, state.params) and _equal(restored.opt_state, state.opt_state)
    assert int(restored.step) == 1 and np.array_equal(restored.rng, state.rng)
    # The optimizer state comes back with its optax types, ready for the next step.
    train.step(restored, {"inputs": np.full((2, 8), 5, np.int32), "targets": np.full((2, 8), 6, np.int32),
                          "weights": np.ones((2, 8), np.float32)})


def test_restore_onto_another_mesh(saved):
    cfg, state, directory = saved
    mesh = zoo.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with _opened(directory) as ckpt:
        restored = ckpt.restore(train.abstract_state(cfg, HP), mesh)
    wi = restored.params["decoder"]["layers"]["mlp"]["wi"]
    assert len(wi.sharding.device_set) == 8 and tuple(wi.sharding.spec) == (None, "fsdp", "tensor")
    assert _equal(restored.params, state.params)


def test_a_checkpoint_of_another_model_is_a_clear_error(saved):
    _, _, directory = saved
    other = tiny("tiny-decoder", d_model=64, num_heads=4)
    with _opened(directory) as ckpt, pytest.raises(CheckpointError, match="different model"):
        ckpt.restore(train.abstract_state(other, HP), ONE)
    gc.collect()


def test_record_mismatch_lists_every_difference():
    now = {**RECORD, "seq_len": 64, "config": {"d_model": 48},
           "hparams": {"learning_rate": 1e-3, "total_steps": 99}}
    with pytest.raises(CheckpointError) as e:
        check_record({"format": 1, **RECORD}, now, "ckpt/4")
    msg = str(e.value)
    assert "seq_len: checkpoint 32, now 64" in msg and "config.d_model: checkpoint 32, now 48" in msg
    assert "total_steps" not in msg  # a resumed run may be extended
    longer = {**RECORD, "hparams": {"learning_rate": 1e-3, "total_steps": 99}}
    check_record({"format": 1, **RECORD}, longer, "x")


def test_a_record_from_before_new_config_fields_still_resumes():
    """A run saved by an older zoo lacks the Config fields added since (they take their
    defaults, the model had none of them) and JSON gives tuples back as lists."""
    import json

    cfg = tiny("tiny-decoder")
    now = {**RECORD, "config": json.loads(cfg.to_json())}
    old = {k: v for k, v in json.loads(cfg.to_json()).items()
           if k not in ("qk_norm", "layer_pattern", "norm_offset", "rope_long_factor")}
    check_record({"format": 1, **RECORD, "config": old}, now, "x")
    changed = {**RECORD, "config": json.loads(cfg.replace(qk_norm=True).to_json())}
    with pytest.raises(CheckpointError, match="config.qk_norm: checkpoint False, now True"):
        check_record({"format": 1, **RECORD, "config": old}, changed, "x")


def test_a_record_from_before_new_hparams_fields_still_resumes():
    """A checkpoint saved before an Hparams field existed ran at its default: it resumes
    under the default and is refused under another value."""
    import dataclasses
    import json

    now = {**RECORD, "hparams": json.loads(json.dumps(dataclasses.asdict(HP)))}
    old = {k: v for k, v in now["hparams"].items() if k not in ("label_smoothing", "distill_alpha")}
    check_record({"format": 1, **RECORD, "hparams": old}, now, "x")
    smoothed = {**now, "hparams": {**now["hparams"], "label_smoothing": 0.1}}
    with pytest.raises(CheckpointError, match="hparams.label_smoothing: checkpoint 0.0, now 0.1"):
        check_record({"format": 1, **RECORD, "hparams": old}, smoothed, "x")


def _largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bytes(step_dir):
    """64 bytes overwritten mid-file, size unchanged: mostly orbax reads it back without a word
    (the digest catches it); where the bytes hit a zstd frame's structure (about one save in
    sixteen, by where the frames fall) the read itself fails. `_stale_arrays` is the
    deterministic silent corruption."""
    path = _largest_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def _stale_arrays(step_dir):
    """Silent corruption, deterministically: the step's arrays replaced by the oldest other
    step's (intact files orbax reads back without a word; different values where the steps'
    states differ)."""
    other = min((p for p in step_dir.parent.iterdir() if p.is_dir() and p.name.isdigit() and p != step_dir),
                key=lambda p: int(p.name))
    shutil.rmtree(step_dir / "state")
    shutil.copytree(other / "state", step_dir / "state")


def _truncate(step_dir):
    path = _largest_file(step_dir)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGE = {"a corrupted byte": (_flip_bytes, "(digest mismatch|arrays cannot be read)"),
          "a deleted file": (lambda d: _largest_file(d).unlink(), "arrays cannot be read"),
          "a truncated file": (_truncate, "arrays cannot be read"),
          "garbage metadata": (lambda d: (d / "state" / "_METADATA").write_text("garbage{"), "arrays cannot be read"),
          "a garbage record": (lambda d: (d / "record" / "metadata").write_text("[1,"), "record cannot be read")}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_falls_back_to_the_newest_intact_checkpoint(saved, tmp_path, damage):
    cfg, state, directory = saved
    broken = tmp_path / "ckpt"
    shutil.copytree(directory, broken)
    hurt, why = DAMAGE[damage]
    hurt(broken / "4")
    with _opened(broken, keep=2) as ckpt:
        with pytest.raises(CheckpointDamaged, match=f"checkpoint .*4 is damaged: .*{why}"):
            ckpt.restore(train.abstract_state(cfg, HP), ONE, step=4)
        restored, step, record, damaged = ckpt.restore_intact(train.abstract_state(cfg, HP), ONE)
        assert step == 3 and record["data"]["index"] == 24
        assert [s for s, _ in damaged] == [4] and re.search(why, damaged[0][1]) and "\n" not in damaged[0][1]
        assert _equal(restored.params, state.params)
        # Set aside, the damaged step leaves room to save step 4 again, and rotation
        # (keep=2) deletes nothing good for it.
        assert ckpt.set_aside(4).name == "4.damaged" and ckpt.all_steps() == [3]
        ckpt.save(4, restored, {**RECORD, "data": {"epoch": 0, "index": 32}}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    gc.collect()


def test_no_intact_checkpoint_is_one_clear_error(saved, tmp_path):
    cfg, _, directory = saved
    broken = tmp_path / "ckpt"
    shutil.copytree(directory, broken)
    _flip_bytes(broken / "4")
    _truncate(broken / "3")
    with _opened(broken) as ckpt, pytest.raises(CheckpointDamaged) as e:
        ckpt.restore_intact(train.abstract_state(cfg, HP), ONE)
    msg = str(e.value)
    assert msg.startswith(f"no intact checkpoint in {broken}: 4: ") and "3: its arrays cannot be read" in msg
    assert "\n" not in msg and "python -m train check" in msg
    with _opened(tmp_path / "empty") as ckpt, pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.read_record()
    with _opened(broken) as ckpt, pytest.raises(CheckpointError, match="no step 7"):
        ckpt.read_record(7)
    assert not (tmp_path / "empty").exists()  # reading creates nothing
    gc.collect()


def test_a_non_finite_state_is_never_saved(saved, tmp_path):
    cfg, state, _ = saved
    bad = state.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(np.nan), state.params))
    with _opened(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, {**RECORD, "data": {}}, force=True)
        with pytest.raises(NotFinite, match=r"state at step 2 holds NaN or inf \(params/.*checkpoint 1 is intact"):
            ckpt.save(2, bad, {**RECORD, "data": {}}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [1]
