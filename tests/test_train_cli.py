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

import jax
import numpy as np
import optax

import train
import zoo
from train.cli import MAIN_MODEL_OVERRIDES, SUBCOMMANDS, parser, resolve
from train.loop import main
from train.objectives import FAMILY_OF, check_objective
from train.parallel import build_mesh, check_fit
from train.report import read_metrics
from train_util import SHAKESPEARE, cli_args, ordinary, small_tokenizer, vocab
from zoo.nn.transformer import REMAT_POLICIES

ROOT = Path(__file__).resolve().parents[1]


def _args(run_dir, tokenizer_path, *extra):
    return cli_args(run_dir, tokenizer_path, *extra)


# --- settings ---------------------------------------------------------------------------------

def test_no_arguments_is_the_main_job():
    rc = resolve([])
    assert rc.model == "tiny-decoder" and rc.overrides == MAIN_MODEL_OVERRIDES
    assert rc.objective == "clm" and rc.data == [] and rc.log_interval == 1


def test_precedence_file_flags_overrides(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model": "tiny-encdec", "steps": 7, "lr": 0.5,
                                                 "overrides": {"dropout": 0.1}}))
    rc = resolve(["--config", str(tmp_path / "c.json"), "--steps", "9", "d_model=64",
                  "model.num_heads=2", "batch_size=4", "remat=true"])
    assert (rc.model, rc.steps, rc.hparams.learning_rate, rc.batch_size) == ("tiny-encdec", 9, 0.5, 4)
    assert rc.hparams.remat is True
    assert rc.overrides == {"dropout": 0.1, "d_model": 64, "num_heads": 2}  # no main-job shape
    (tmp_path / "c.yaml").write_text("model: tiny-encoder\nobjective: mlm\ndata: [a.txt]\n")
    rc = resolve(["--config", str(tmp_path / "c.yaml")])
    assert (rc.model, rc.objective, rc.data) == ("tiny-encoder", "mlm", ["a.txt"])


def test_overrides_mix_freely_with_flags():
    rc = resolve(["d_model=64", "--steps", "3", "dtype=bfloat16", "--data", "a.txt", "b.txt", "seed=5"])
    assert rc.overrides["d_model"] == 64 and rc.overrides["dtype"] == "bfloat16"
    assert (rc.steps, rc.seed, rc.data) == (3, 5, ["a.txt", "b.txt"])
    assert resolve(["--loss-chunk", "64"]).hparams.loss_chunk == 64
    assert resolve(["hparams.b2=0.99", "--remat"]).hparams == train.Hparams(
        learning_rate=2e-3, total_steps=300, b2=0.99, remat="full")


def test_resume_reads_the_saved_run_settings(tmp_path):
    saved = resolve(["--model", "tiny-encoder", "--steps", "5", "--run-dir", str(tmp_path)])
    (tmp_path / "run.json").write_text(json.dumps(saved.to_dict()))
    rc = resolve(["--resume", "--run-dir", str(tmp_path), "--steps", "8"])
    assert (rc.model, rc.steps, rc.resume, rc.overrides) == ("tiny-encoder", 8, True, {})


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt9"], "model (--model): expected one of ('albert-base-v2', 'bart-base'"),
    (["wat=1"], "unknown setting 'wat'"),
    (["steps"], "expected KEY=VALUE"),
    (["--steps", "0"], "total_steps (--total-steps, --steps): expected a positive integer, got 0"),
    (["--batch-size", "0"], "batch_size (--batch-size): expected a positive integer, got 0"),
    (["--loss-chunk", "-8"], "loss_chunk (--loss-chunk): expected a non-negative integer"),
    (["b1=1.5"], "b1 (--b1): expected a number in [0, 1), got 1.5"),
    (["hparams=3"], "'hparams' must be a mapping"),
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


def test_the_main_job_keeps_its_numbers():
    rc = resolve([])
    assert (rc.steps, rc.batch_size, rc.seq_len, rc.seed) == (300, 16, 128, 0)
    assert rc.hparams == train.Hparams(learning_rate=2e-3, warmup_steps=30, total_steps=300,
                                       end_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                                       clip_norm=1.0, z_loss=0.0, aux_weight=0.01, accum_steps=1,
                                       remat=False, loss_chunk=0)
    # warmup defaults from the run's length, once: resuming with more steps keeps it
    assert resolve(["--steps", "50"]).hparams.warmup_steps == 5


@pytest.mark.parametrize("name", zoo.presets.names())
def test_the_default_seq_len_fits_every_preset(name):
    rc = resolve(["--model", name])  # raises if the length does not fit the model
    assert rc.seq_len == min(128, zoo.preset(name).max_len)


def test_an_encoder_trains_with_the_default_seq_len(tmp_path, tokenizer_path):
    argv = ["--model", "tiny-encoder", "--objective", "mlm", "--data", str(SHAKESPEARE),
            "--tokenizer", str(tokenizer_path), "--run-dir", str(tmp_path), "--steps", "1",
            "--batch-size", "2", "--mesh", "data=1", "--eval-batches", "1"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "run.json").read_text())["seq_len"] == 64


def test_help_explains_every_flag_and_lists_the_choices():
    p = parser()
    missing = [a.option_strings for a in p._actions if a.option_strings and not a.help]
    assert not missing
    text = " ".join(p.format_help().split())
    for name in [*zoo.presets.names(), *FAMILY_OF, "none", *REMAT_POLICIES, "python -m train sample"]:
        assert name in text, name
    # every command train/__main__.py dispatches is listed (SUBCOMMANDS feeds the help)
    dispatched = re.findall(r'sys.argv\[1:2\] == \["(\w+)"\]', (ROOT / "train" / "__main__.py").read_text())
    assert set(dispatched) <= set(SUBCOMMANDS) and "python -m train check" in text
    remat = next(a for a in p._actions if "--remat" in a.option_strings)
    assert tuple(remat.choices) == ("none", *REMAT_POLICIES)
    for flag in ("--b1", "--b2", "--eps", "--learning-rate", "--lr", "--warmup-steps", "--steps"):
        assert flag in text, flag


def test_an_objective_for_another_family_names_both():
    with pytest.raises(ValueError) as e:
        check_objective("mlm", "decoder")
    assert str(e.value) == ("objective: 'mlm' trains encoder models, but the model's family is "
                            "'decoder'; use one of ['clm', 'prefix_lm']")


def test_adam_betas_and_eps_reach_optax(tmp_path):
    (tmp_path / "c.yaml").write_text("b1: 0.5\n")
    rc = resolve(["--config", str(tmp_path / "c.yaml"), "--b2", "0.6", "eps=1e-3", "--lr", "0.01"])
    hp = rc.hparams
    assert (hp.b1, hp.b2, hp.eps, hp.learning_rate) == (0.5, 0.6, 1e-3, 0.01)
    cfg = zoo.preset("tiny-decoder", num_layers=1)
    params = zoo.init(cfg, jax.random.key(0))
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.key(1), p.shape), params)
    mine = train.make_optimizer(cfg, hp)
    ref = optax.chain(optax.clip_by_global_norm(hp.clip_norm),
                      optax.adamw(train.schedule(hp), b1=0.5, b2=0.6, eps=1e-3,
                                  weight_decay=hp.weight_decay, mask=train.decay_mask(cfg)))
    a_state, b_state = mine.init(params), ref.init(params)
    for _ in range(2):
        a, a_state = mine.update(grads, a_state, params)
        b, b_state = ref.update(grads, b_state, params)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-12)


def test_accum_steps_that_do_not_split_the_batch_give_one_message(tmp_path, capsys):
    with pytest.raises(ValueError) as e:
        check_fit(6, build_mesh("data=1"), zoo.sharding.DEFAULT_RULES, "jit", 4)
    expected = str(e.value)
    assert expected.startswith("--batch-size 6 does not split over the 1 data-parallel device x "
                               "accum_steps 4") and "use a multiple of 4" in expected
    assert main(["--batch-size", "6", "accum_steps=4", "--mesh", "data=1", "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {expected}"
    cfg = zoo.preset("tiny-decoder", num_layers=1)
    state = train.init_state(cfg, train.Hparams(accum_steps=4), jax.random.key(0))
    rows = ordinary(np.random.default_rng(0), (6, 16), vocab())
    batch = {"inputs": rows, "targets": rows, "weights": np.ones(rows.shape, np.float32)}
    with pytest.raises(ValueError) as e:
        train.step(state, batch)
    assert str(e.value).startswith("--batch-size 6 does not split over the 1 data-parallel device x "
                                   "accum_steps 4")


def test_an_old_run_json_still_resumes(tmp_path):
    """run.json files written before the settings were declared once use lr/warmup/steps."""
    old = {"model": "tiny-encoder", "overrides": {}, "objective": "mlm", "steps": 20,
           "batch_size": 8, "seq_len": 32, "lr": 0.01, "warmup": 3, "end_lr_ratio": 0.1,
           "weight_decay": 0.1, "clip_norm": 1.0, "z_loss": 0.0, "aux_weight": 0.01,
           "accum_steps": 2, "remat": "dots", "loss_chunk": 0, "seed": 4, "data": [],
           "tokenizer": None, "vocab_size": 2048, "checkpoint_every": 100, "keep": 3,
           "eval_every": None, "eval_batches": 4, "log_every": None, "run_dir": str(tmp_path),
           "resume": False, "mesh": "data=-1", "parallel": "jit", "rules": {}, "peak_flops": None}
    (tmp_path / "run.json").write_text(json.dumps(old))
    rc = resolve(["--resume", "--run-dir", str(tmp_path), "--steps", "40"])
    hp = rc.hparams
    assert (hp.learning_rate, hp.warmup_steps, hp.total_steps, hp.accum_steps, hp.remat) == (0.01, 3, 40, 2, "dots")
    assert (rc.model, rc.seq_len, rc.seed) == ("tiny-encoder", 32, 4)


def test_notebook_work_dirs_are_not_tracked():
    """Notebooks run from the repository root or from notebooks/ write zoo_work/ there."""
    for path in ("zoo_work/generation/x.txt", "notebooks/zoo_work/x.txt"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


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


def _launch(run_dir, tokenizer_path, *extra, cache_env=None):
    # cache_env (conftest's compile_cache_env): the runs after the first compile nothing.
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(cache_env or {})}
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


def test_killed_and_resumed_run_gives_exactly_the_same_losses(tmp_path, tokenizer_path, compile_cache_env):
    """SIGKILL mid-run (maybe mid-save), then --resume: every loss equals the run that was
    never interrupted, bit for bit. SIGTERM first stops cleanly with a checkpoint."""
    steps = ["--steps", "40", "--checkpoint-every", "5", "d_model=64", "--seq-len", "64"]

    def launch(run_dir, *extra):  # the four runs share one compilation cache
        return _launch(run_dir, tokenizer_path, *extra, cache_env=compile_cache_env)

    whole = launch(tmp_path / "whole", *steps)
    cut = launch(tmp_path / "cut", *steps)
    _wait_for_step(cut, tmp_path / "cut", 7)
    cut.send_signal(signal.SIGTERM)
    out = cut.communicate(timeout=120)[0]
    assert cut.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out
    stopped = max(_losses(tmp_path / "cut"))
    assert (tmp_path / "cut" / "checkpoints" / str(stopped)).is_dir()

    resumed = launch(tmp_path / "cut", *steps, "--resume")
    _wait_for_step(resumed, tmp_path / "cut", stopped + 12)
    resumed.kill()  # SIGKILL: no handler runs
    resumed.wait()
    assert resumed.returncode == -signal.SIGKILL
    last = resumed.communicate()[0] if resumed.stdout and not resumed.stdout.closed else ""
    final = launch(tmp_path / "cut", *steps, "--resume")
    out = final.communicate(timeout=240)[0]
    assert final.returncode == 0, out + last
    resumed_at = int(re.search(r"resumed .* at step (\d+)", out).group(1))
    assert stopped < resumed_at < 40  # from a checkpoint the killed run saved
    assert whole.wait(timeout=240) == 0, whole.communicate()[0]
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert a == b  # exact float equality, step by step
