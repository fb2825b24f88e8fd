"""`python -m train` scaled out, end to end: pmap equals the mesh run, a checkpoint restores
onto another mesh and continues the same run, and two processes (4 CPU devices each, gloo
on 127.0.0.1) train like one process with 8 devices and save a checkpoint one process reads."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from conftest import FAST_CPU_COMPILE

import train
import zoo
from train.checkpoint import Checkpointer
from train.cli import resolve
from train.hosts import Launch, launch_from
from train.loop import main
from train.report import read_metrics
from train_util import SHAKESPEARE, small_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
STEPS = 10


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small corpus and a trained tokenizer, shared by every run here."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "corpus.txt").write_text(SHAKESPEARE.read_text()[:60_000])
    small_tokenizer().save(d / "tok.model")
    return d


def _args(inputs, run_dir, *extra):
    return ["--model", "tiny-decoder", "--data", str(inputs / "corpus.txt"), "--tokenizer",
            str(inputs / "tok.model"), "--run-dir", str(run_dir), "--batch-size", "8",
            "--seq-len", "32", "--steps", str(STEPS), "--checkpoint-every", "5", "--eval-every",
            str(STEPS), "eval_batches=1", "--lr", "1e-2", *extra]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def _assert_same(got, want):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=RTOL)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The uninterrupted run: one process, 8 devices, --mesh data=8, checkpoints at 5 and 10."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert main(_args(inputs, run_dir, "--mesh", "data=8")) == 0
    return run_dir


def test_pmap_run_equals_the_mesh_run(inputs, reference, tmp_path):
    run_dir = tmp_path / "pmap"
    assert main(_args(inputs, run_dir, "--parallel", "pmap")) == 0
    _assert_same(_losses(run_dir), _losses(reference))
    ref_eval = read_metrics(reference / "metrics.jsonl")[-1]["eval_loss"]
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["eval_loss"] == pytest.approx(ref_eval, rel=RTOL)


def test_a_checkpoint_restores_onto_another_mesh_and_continues_the_run(inputs, reference, tmp_path, capsys):
    """Saved on data=8 at step 5, resumed on data=2,tensor=4: steps 6..10 as uninterrupted."""
    run_dir = tmp_path / "moved"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "10")
    assert main(_args(inputs, run_dir, "--resume", "--mesh", "data=2,tensor=4")) == 0
    assert f"resumed {run_dir} at step 5" in capsys.readouterr().out
    _assert_same(_losses(run_dir), _losses(reference))


def test_launch_settings_come_from_flags_or_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert launch_from({}, env) == Launch("127.0.0.1:1234", 2, 1, None)
    assert launch_from({"process_id": 0, "local_devices": 4}, env) == Launch("127.0.0.1:1234", 2, 0, 4)
    assert not launch_from({}, {}).distributed and launch_from({"coordinator": "auto"}, {}).distributed
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one'"):
        launch_from({}, {**env, "JAX_PROCESS_ID": "one"})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, process_id, port, log):
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    # Only --local-devices' 4 devices (no inherited device count); XLA's fast CPU compile, as
    # the rest of the suite runs.
    env.update(PYTHONPATH=str(ROOT), XLA_FLAGS=FAST_CPU_COMPILE, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "train", *args, "--local-devices", "4", "--coordinator",
           f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def test_two_processes_train_like_one_and_share_a_checkpoint(inputs, reference, tmp_path):
    run_dir = tmp_path / "two"
    args = _args(inputs, run_dir, "--mesh", "data=2,fsdp=2,tensor=2")
    port = _free_port()
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [_launch(args, i, port, logs[i]) for i in range(2)]
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in out)
    # Each process loads only its half of every batch (data=2 splits it across processes).
    assert "process 0 of 2: 4 devices, loads rows 0..3 of each global batch of 8" in out[0]
    assert "process 1 of 2: 4 devices, loads rows 4..7 of each global batch of 8" in out[1]
    assert "done at step 10" in out[0] and "done at step" not in out[1]  # process 0 reports
    _assert_same(_losses(run_dir), _losses(reference))

    # One process (this one, on one device) restores what the two saved together.
    rc = resolve(["--resume", "--run-dir", str(run_dir)])
    cfg = zoo.Config.from_json((run_dir / "config.json").read_text())
    like = train.abstract_state(cfg, rc.hparams)
    one = zoo.sharding.make_mesh({"data": 1}, jax.devices()[:1])
    restored = []
    for directory in (run_dir, reference):
        ckpt = Checkpointer(directory / "checkpoints", every=5)
        try:
            assert ckpt.all_steps() == [5, 10]
            restored.append(ckpt.restore(like, one, 10))
        finally:
            ckpt.close()
    assert int(restored[0].step) == 10
    # Ten AdamW steps at lr 1e-2 from gradients equal to ~1e-7: Adam's normalisation can turn
    # a last-bit difference in a near-zero gradient into a visible one in its parameter.
    chex.assert_trees_all_close((restored[0].params, restored[0].opt_state),
                                (restored[1].params, restored[1].opt_state), rtol=1e-3, atol=2e-4)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(inputs, tmp_path):
    """JAX's preemption service agrees on a step; all save it and exit 128 + SIGTERM."""
    run_dir = tmp_path / "stop"
    args = [*_args(inputs, run_dir, "--mesh", "data=8"), "--steps", "5000", "--checkpoint-every", "1000"]
    port = _free_port()
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [_launch(args, i, port, logs[i]) for i in range(2)]
    try:
        deadline = time.time() + 300
        while not any(s >= 6 for s in _losses(run_dir)):
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert codes == [128 + signal.SIGTERM] * 2, "\n\n".join(o[-3000:] for o in out)
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 6 <= saved[0] < 5000
    assert f"stopped by SIGTERM; checkpoint saved at step {saved[0]}" in out[0]
