"""`python -m train`: settings resolution, errors, the run dir, and kill-and-resume exactness
with real subprocesses."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.cli import MAIN_MODEL_OVERRIDES, resolve
from train.loop import main
from train.report import read_metrics
from train_util import SHAKESPEARE, small_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "shakespeare.model"
    small_tokenizer().save(path)
    return path


def _args(run_dir, tokenizer_path, *extra):
    return ["--model", "tiny-decoder", "--data", str(SHAKESPEARE), "--tokenizer", str(tokenizer_path),
            "--run-dir", str(run_dir), "--batch-size", "8", "--seq-len", "32", *extra]


# --- settings ---------------------------------------------------------------------------------

def test_no_arguments_is_the_main_job():
    rc = resolve([])
    assert rc.model == "tiny-decoder" and rc.overrides == MAIN_MODEL_OVERRIDES
    assert rc.objective is None and rc.data == [] and rc.log_interval == 1


def test_precedence_file_flags_overrides(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model": "tiny-encdec", "steps": 7, "lr": 0.5,
                                                 "overrides": {"dropout": 0.1}}))
    rc = resolve(["--config", str(tmp_path / "c.json"), "--steps", "9", "d_model=64",
                  "model.num_heads=2", "batch_size=4", "remat=true"])
    assert (rc.model, rc.steps, rc.lr, rc.batch_size, rc.remat) == ("tiny-encdec", 9, 0.5, 4, True)
    assert rc.overrides == {"dropout": 0.1, "d_model": 64, "num_heads": 2}  # no main-job shape
    (tmp_path / "c.yaml").write_text("model: tiny-encoder\nobjective: mlm\ndata: [a.txt]\n")
    rc = resolve(["--config", str(tmp_path / "c.yaml")])
    assert (rc.model, rc.objective, rc.data) == ("tiny-encoder", "mlm", ["a.txt"])


def test_overrides_mix_freely_with_flags():
    rc = resolve(["d_model=64", "--steps", "3", "dtype=bfloat16", "--data", "a.txt", "b.txt", "seed=5"])
    assert rc.overrides["d_model"] == 64 and rc.overrides["dtype"] == "bfloat16"
    assert (rc.steps, rc.seed, rc.data) == (3, 5, ["a.txt", "b.txt"])
    assert resolve(["--loss-chunk", "64"]).loss_chunk == 64


def test_resume_reads_the_saved_run_settings(tmp_path):
    saved = resolve(["--model", "tiny-encoder", "--steps", "5", "--run-dir", str(tmp_path)])
    (tmp_path / "run.json").write_text(json.dumps(saved.to_dict()))
    rc = resolve(["--resume", "--run-dir", str(tmp_path), "--steps", "8"])
    assert (rc.model, rc.steps, rc.resume, rc.overrides) == ("tiny-encoder", 8, True, {})


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt9"], "unknown preset 'gpt9'"),
    (["wat=1"], "unknown setting 'wat'"),
    (["steps"], "expected KEY=VALUE"),
    (["--steps", "0"], "--steps: expected a positive integer"),
    (["--batch-size", "6", "accum_steps=4"], "must divide --batch-size"),
    (["--loss-chunk", "-8"], "--loss-chunk: expected a non-negative integer"),
    (["d_model=33"], "d_model=33 is not divisible"),
    (["--config", "/nonexistent.json"], "no file"),
    (["--model", "tiny-decoder", "--objective", "mlm"], "'mlm' trains encoder models"),
    (["--model", "tiny-encdec", "--objective", "clm"], "'clm' trains decoder models"),
    (["--data", "/nonexistent/*.txt"], "matches no file"),
    (["--seq-len", "500", "--model", "tiny-encoder"], "exceeds the model's max_len"),
    (["--mesh", "data=two"], "--mesh"),
])
def test_bad_input_is_a_clear_error_before_compiling(argv, message, tmp_path, capsys):
    assert main([*argv, "--run-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


# --- runs ---------------------------------------------------------------------------------------

def test_a_short_run_fills_the_run_dir(tmp_path, tokenizer_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(run_dir, tokenizer_path, "--steps", "6", "--checkpoint-every", "3")) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "tok/s" in out and "MFU" in out and "done at step 6" in out
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(r["loss"], float) for r in rows) and "eval_loss" in rows[-1]
    for name in ("tokenizer.model", "run.json", "config.json", "loss.png"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert json.loads((run_dir / "config.json").read_text())["vocab_size"] == small_tokenizer().vocab.size
    # The run dir holds a run now: starting again without --resume is refused, and resuming
    # with settings the checkpoint was not saved with names each difference.
    assert main(_args(run_dir, tokenizer_path, "--steps", "6")) == 2
    assert "--resume" in capsys.readouterr().err
    changed = ("--steps", "8", "--resume", "--seq-len", "16", "--lr", "0.1")
    assert main(_args(run_dir, tokenizer_path, *changed)) == 2
    err = capsys.readouterr().err
    assert "seq_len: checkpoint 32, now 16" in err and "hparams.learning_rate" in err


def _launch(run_dir, tokenizer_path, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "train", *_args(run_dir, tokenizer_path, *extra)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, run_dir, step, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        rows = read_metrics(run_dir / "metrics.jsonl")
        if rows and rows[-1]["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout}s")


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def test_killed_and_resumed_run_gives_exactly_the_same_losses(tmp_path, tokenizer_path):
    """SIGKILL mid-run (maybe mid-save), then --resume: every loss equals the run that was
    never interrupted, bit for bit. SIGTERM first stops cleanly with a checkpoint."""
    steps = ["--steps", "40", "--checkpoint-every", "5", "d_model=64", "--seq-len", "64"]
    whole = _launch(tmp_path / "whole", tokenizer_path, *steps)
    cut = _launch(tmp_path / "cut", tokenizer_path, *steps)
    _wait_for_step(cut, tmp_path / "cut", 7)
    cut.send_signal(signal.SIGTERM)
    out = cut.communicate(timeout=120)[0]
    assert cut.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out
    stopped = max(_losses(tmp_path / "cut"))
    assert (tmp_path / "cut" / "checkpoints" / str(stopped)).is_dir()

    resumed = _launch(tmp_path / "cut", tokenizer_path, *steps, "--resume")
    _wait_for_step(resumed, tmp_path / "cut", stopped + 12)
    resumed.kill()  # SIGKILL: no handler runs
    resumed.wait()
    assert resumed.returncode == -signal.SIGKILL
    last = resumed.communicate()[0] if resumed.stdout and not resumed.stdout.closed else ""
    final = _launch(tmp_path / "cut", tokenizer_path, *steps, "--resume")
    out = final.communicate(timeout=240)[0]
    assert final.returncode == 0, out + last
    resumed_at = int(re.search(r"resumed .* at step (\d+)", out).group(1))
    assert stopped < resumed_at < 40  # from a checkpoint the killed run saved
    assert whole.wait(timeout=240) == 0, whole.communicate()[0]
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert a == b  # exact float equality, step by step
