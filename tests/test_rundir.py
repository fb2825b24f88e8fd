"""A run directory that survives damage (train/rundir.py, and run() in train/loop.py): each
fault ends in an exact resume from the newest intact checkpoint, or one clear line and a
documented exit status; never a silent wrong state, lost history or a deleted good checkpoint."""

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_checkpoint import _stale_arrays, _truncate
from train import check
from train.loop import main
from train.report import MetricsLog, read_metrics
from train.rundir import (EXIT_DAMAGED, EXIT_LOCKED, EXIT_NOT_FINITE, EXIT_USAGE, EXIT_WRITE, Damaged,
                          Locked, RunLock, read_json, write_atomic)
from train_util import cli_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _args(run_dir, tokenizer_path, *extra):
    return cli_args(run_dir, tokenizer_path, "--steps", "6", "--checkpoint-every", "2", "--eval-every", "6",
                    "eval_batches=1", *extra)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def _steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _snapshot(run_dir):
    """{relative path: sha256} of every file under run_dir."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _lines(text, prefix):
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def finished(tokenizer_path, tmp_path_factory):
    """A finished 6-step run with checkpoints 2, 4 and 6 (keep 3)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(_args(run_dir, tokenizer_path)) == 0
    assert _steps(run_dir) == ["2", "4", "6"]
    return run_dir


def _copy(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


# --- damaged checkpoints ------------------------------------------------------------------------

def test_a_corrupted_checkpoint_resumes_exactly_from_the_previous_one(finished, tokenizer_path, tmp_path,
                                                                      capfd):
    """64 bytes overwritten in the newest checkpoint's largest file: `check` finds it, and
    --resume warns once, trains on from checkpoint 4 with the uninterrupted run's losses, and
    deletes no good checkpoint."""
    run_dir = _copy(finished, tmp_path)
    _stale_arrays(run_dir / "checkpoints" / "6")
    capfd.readouterr()
    assert check.main(["--run", str(run_dir)]) == EXIT_DAMAGED
    out = capfd.readouterr().out
    assert "checkpoint 4: intact" in out and "checkpoint 6: DAMAGED:" in out and "digest mismatch" in out
    assert "2 of 3 checkpoints intact" in out

    assert main(_args(run_dir, tokenizer_path, "--resume")) == 0
    captured = capfd.readouterr()
    warnings = _lines(captured.err, "warning:")
    assert len(warnings) == 1 and "checkpoint 6 is damaged" in warnings[0]
    assert "digest mismatch" in warnings[0]
    assert "resuming from checkpoint 4" in warnings[0]
    assert "Traceback" not in captured.err and "Exception ignored" not in captured.err
    assert f"resumed {run_dir} at step 4" in captured.out
    assert _losses(run_dir) == _losses(finished)  # exact, step by step
    assert _steps(run_dir) == ["2", "4", "6", "6.damaged"]


def test_no_intact_checkpoint_is_one_error_and_changes_nothing(finished, tokenizer_path, tmp_path, capfd):
    run_dir = _copy(finished, tmp_path)
    for step in ("2", "4", "6"):
        _truncate(run_dir / "checkpoints" / step)
    before = _snapshot(run_dir)
    capfd.readouterr()
    assert main(_args(run_dir, tokenizer_path, "--resume")) == EXIT_DAMAGED
    err = capfd.readouterr().err
    assert _lines(err, "error:") == [line for line in err.splitlines() if line.strip()]
    assert len(_lines(err, "error:")) == 1 and "no intact checkpoint in" in err
    assert _snapshot(run_dir) == before


def test_a_refused_resume_changes_nothing(finished, tokenizer_path, tmp_path, capsys):
    """A resume with another seed is refused before anything in the run dir is written, so
    the plain --resume still works (run.json keeps the run's own seed)."""
    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    assert main(_args(run_dir, tokenizer_path, "--resume", "--seed", "1")) == EXIT_USAGE
    assert "belongs to a different run" in capsys.readouterr().err
    assert _snapshot(run_dir) == before
    assert read_json(run_dir / "run.json")["seed"] == 0


@pytest.mark.parametrize("argv,message", [
    (["--data", "/nonexistent/*.txt"], "matches no file"),
    (["--tokenizer", "/nonexistent.model"], "no SentencePiece model"),
])
def test_a_usage_error_leaves_no_run_dir(argv, message, tmp_path, capsys):
    run_dir = tmp_path / "new" / "run"
    assert main([*argv, "--run-dir", str(run_dir)]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


# --- the lock ---------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(finished, tokenizer_path, tmp_path, capsys):
    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    with RunLock(run_dir):
        assert main(_args(run_dir, tokenizer_path, "--resume")) == EXIT_LOCKED
    err = capsys.readouterr().err
    assert f"process {os.getpid()} on host {socket.gethostname()}" in err and len(_lines(err, "error:")) == 1
    assert _snapshot(run_dir) == before  # and the lock is gone again


def test_a_lock_held_by_another_process_then_left_by_a_dead_one(tmp_path):
    """A real second process holds the lock: refused, naming it; killed (no cleanup runs),
    its lock is taken over."""
    code = ("import sys, time; from train.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Locked, match=f"in use by process {holder.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == holder.pid  # left behind
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "lock").exists()


def test_without_flock_the_holder_pid_decides(tmp_path, monkeypatch):
    """Where the file system has no flock: a live holder on this host is refused, a dead
    one's lock is taken over."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    live = {"host": socket.gethostname(), "pid": os.getppid(), "since": 0}
    (tmp_path / "lock").write_text(json.dumps(live))
    with pytest.raises(Locked, match=f"process {os.getppid()} on host"):
        RunLock(tmp_path).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "lock").write_text(json.dumps({**live, "pid": int(dead)}))
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


# --- disk full --------------------------------------------------------------------------------

def test_disk_full_is_one_line_and_its_own_exit_status(tokenizer_path, tmp_path, capfd, monkeypatch):
    """ENOSPC while writing checkpoint 4: one line naming it, the intact one and what to do;
    the half-written step directory is removed; --resume then goes on from checkpoint 2."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

    real = handler.JsonCheckpointHandler._save_fn

    async def full_at_step_4(self, x, directory):
        if "4.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
        return await real(self, x, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", full_at_step_4)
    run_dir = tmp_path / "run"
    assert main(_args(run_dir, tokenizer_path)) == EXIT_WRITE
    err = capfd.readouterr().err
    assert len(_lines(err, "error:")) == 1 and "Traceback" not in err
    assert (f"error: no space left on device while saving checkpoint 4 in {run_dir / 'checkpoints'}; "
            f"checkpoint 2 is intact; free space and --resume") in err
    assert _steps(run_dir) == ["2"]  # no partial step directory left
    assert max(_losses(run_dir)) >= 4  # the metrics of the steps run are kept


def test_the_command_line_drops_orbax_noise_and_nothing_else(monkeypatch):
    """After a failed write TensorStore's callbacks print "Event loop is closed" tracebacks
    through sys.excepthook (seen on a full tmpfs); the command line drops only those."""
    import logging

    from train.checkpoint import quiet_libraries

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: seen.append(exc[1]))
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    absl = logging.getLogger("absl")
    monkeypatch.setattr(absl, "level", absl.level)
    quiet_libraries()
    closed, other = RuntimeError("Event loop is closed"), ValueError("a real bug")
    sys.excepthook(RuntimeError, closed, None)
    sys.excepthook(ValueError, other, None)
    assert seen == [other] and absl.level == logging.CRITICAL


# --- non-finite loss ------------------------------------------------------------------------

def test_a_non_finite_loss_stops_the_run_naming_the_step(tokenizer_path, tmp_path, capsys):
    """--resume on an empty run dir says so; a huge learning rate blows the loss up: the run
    stops at that step, saves nothing after it, and the last checkpoint is finite."""
    run_dir = tmp_path / "run"
    code = main(_args(run_dir, tokenizer_path, "--resume", "--lr", "1e30", "--checkpoint-every", "1",
                      "--warmup", "0"))
    err = capsys.readouterr().err
    assert len(_lines(err, "warning: --resume: no checkpoint in")) == 1
    assert code == EXIT_NOT_FINITE, err
    rows = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}
    bad = next(s for s, r in rows.items() if not all(abs(r[k]) < float("inf") for k in ("loss", "grad_norm")))
    assert (f"is nan at step {bad}: stopped without saving it; checkpoint {bad - 1} holds the last "
            f"finite state") in err
    assert _steps(run_dir) == [str(s) for s in range(1, bad)][-3:]  # the row is kept, the state is not


# --- run files --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("", "run.json is empty"),
    ('{"seed": 0, "steps": ', "run.json line 1: Expecting value"),
    ("{\n  \"seed\": 0,\n  oops\n}", "run.json line 3: Expecting property name"),
    ("[1, 2]", "run.json line 1: expected a JSON object, got list"),
])
def test_a_damaged_run_json_is_one_line_naming_it(text, message, tmp_path, capsys):
    (tmp_path / "run.json").write_text(text)
    assert main(["--resume", "--run-dir", str(tmp_path)]) == EXIT_DAMAGED
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(Damaged, match="damaged"):
        read_json(tmp_path / "run.json")


def test_write_atomic_leaves_the_old_file_or_the_new(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_atomic(path, "old")

    def killed(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run.json"]
    monkeypatch.undo()
    write_atomic(path, "new")
    assert path.read_text() == "new"


GOOD = [{"step": s, "loss": 5.0 - s / 10, "accuracy": 0.1} for s in range(1, 6)]


def test_bad_metrics_lines_are_kept_aside_with_one_warning(tmp_path):
    lines = [json.dumps(GOOD[0]), json.dumps(GOOD[1]), "garbage", json.dumps({**GOOD[2], "step": "3"}),
             json.dumps(GOOD[2]), json.dumps(GOOD[3]), json.dumps(GOOD[1]), json.dumps(GOOD[4])[:20]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))  # the last one cut off by a kill
    bad = []
    assert read_metrics(tmp_path / "metrics.jsonl", bad) == GOOD[:4]
    firsts = [(n, why.split(" ")[0]) for n, why, _ in bad]
    assert firsts == [(3, "not"), (4, '"step"'), (7, "step"), (8, "cut")]
    assert "out of order" in bad[2][1] and "expected a positive integer" in bad[1][1]

    warnings = []
    MetricsLog(tmp_path, 3, warn=warnings.append).close()  # resuming at step 3
    assert len(warnings) == 1 and "lines 3, 4, 7, 8 cannot be read" in warnings[0]
    assert "metrics.jsonl.bad" in warnings[0]
    assert read_metrics(tmp_path / "metrics.jsonl") == GOOD[:3]
    assert (tmp_path / "metrics.jsonl.bad").read_text().splitlines() == [lines[i] for i in (2, 3, 6, 7)]


def test_a_metrics_file_of_garbage_loses_no_history(tmp_path):
    """Garbage is not history: it is kept aside, and the file restarts empty."""
    (tmp_path / "metrics.jsonl").write_text("\x00\x01garbage\nmore garbage\n")
    warnings = []
    MetricsLog(tmp_path, 24, warn=warnings.append).close()
    assert len(warnings) == 1 and "lines 1, 2" in warnings[0]
    assert (tmp_path / "metrics.jsonl.bad").read_text() == "\x00\x01garbage\nmore garbage\n"
    assert (tmp_path / "metrics.jsonl").read_text() == ""
