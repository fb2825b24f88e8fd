"""Extending a trained decoder's context (issue 22): linear RoPE scaling is position
interpolation (position p of the extended model rotates as p / factor did in the trained
one), and `python -m train --init-from RUN` starts a new run from RUN's params, model and
tokenizer with model fields changed (max_len, rope_scaling), refusing fields that change
the params' shapes. The recipe at full size: bench/context_extension.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import forward, tiny, tokens
from train.cli import resolve
from train.loop import main
from train.sample import restore_params
from train_util import SHAKESPEARE, cli_args
import zoo
from zoo.nn.positions import rope_tables

FACTOR = 4


def test_linear_scaling_is_position_interpolation():
    """The extended model at position FACTOR * q is the trained one at q: rotations equal
    (exactly: dividing by a power of two is exact), and so are the logits of a whole forward."""
    cfg = tiny("tiny-decoder")
    longer = cfg.replace(max_len=FACTOR * cfg.max_len, rope_scaling="linear", rope_scaling_factor=float(FACTOR))
    q = jnp.arange(cfg.max_len)[None, :]
    for got, want in zip(rope_tables(longer, "global", FACTOR * q), rope_tables(cfg, "global", q)):
        np.testing.assert_array_equal(got, want)
    params = zoo.init(cfg, jax.random.key(0))
    toks = tokens(jax.random.key(1), 2, 24)
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    stretched = forward(params, longer, toks, positions=FACTOR * pos).logits
    np.testing.assert_allclose(stretched, forward(params, cfg, toks, positions=pos).logits, atol=1e-5)
    # ... and the scaling is not a no-op: at the same positions the two models differ
    assert not np.allclose(forward(params, longer, toks, positions=pos).logits, stretched, atol=1e-3)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A slice of Tiny Shakespeare: a few hundred rows, quick to tokenize."""
    path = tmp_path_factory.mktemp("ctx") / "text.txt"
    path.write_text(SHAKESPEARE.read_text()[:60_000])
    return path


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tokenizer_path, text):
    """One step of the tiny decoder on rows of 32 tokens (one layer and a d_model of its own,
    which the extended run must inherit)."""
    run_dir = tmp_path_factory.mktemp("ctx") / "short"
    argv = cli_args(run_dir, tokenizer_path, "--data", str(text), "--steps", "1", "--eval-batches", "1",
                    "--mesh", "data=1", "max_len=32", "num_layers=1", "d_model=48")
    assert main(argv) == 0
    return run_dir


def test_init_from_starts_from_the_runs_params(source_run, text, tmp_path, capsys):
    run_dir = tmp_path / "long"
    argv = ["--init-from", str(source_run), "--data", str(text), "--run-dir", str(run_dir),
            "--batch-size", "2", "--seq-len", "128", "--steps", "2", "--warmup", "1", "--checkpoint-every", "1",
            "--eval-batches", "1", "--mesh", "data=1",
            "max_len=128", "rope_scaling=yarn", f"rope_scaling_factor={FACTOR}"]
    rc = resolve(argv)  # the source's model, model fields and tokenizer, under the ones given
    assert rc.model == "tiny-decoder" and rc.tokenizer == str(source_run / "tokenizer.model")
    assert rc.overrides == {"max_len": 128, "num_layers": 1, "d_model": 48, "rope_scaling": "yarn",
                            "rope_scaling_factor": FACTOR}
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "set rope_original_max_len=32" in err, err  # yarn stretches from the trained length
    cfg = zoo.Config.from_json((run_dir / "config.json").read_text())
    assert (cfg.max_len, cfg.rope_scaling, cfg.num_layers, cfg.d_model) == (128, "yarn", 1, 48)
    assert (run_dir / "tokenizer.model").read_bytes() == (source_run / "tokenizer.model").read_bytes()
    # Step 1's learning rate is 0 (warmup from 0), so its checkpoint holds the params the run
    # started from: the source's, exactly.
    started, _ = restore_params(run_dir / "checkpoints", cfg, step=1)
    source, _ = restore_params(source_run / "checkpoints", cfg)
    jax.tree.map(np.testing.assert_array_equal, started, source)


@pytest.mark.parametrize("extra,message", [
    (["d_model=64"], "has shape (48,), cfg expects (64,)"),
    (["--init-from", "nowhere"], "--init-from nowhere: no run.json there"),
])
def test_init_from_refuses_what_cannot_start_from_the_run(source_run, text, tmp_path, capsys, extra, message):
    argv = ["--init-from", str(source_run), "--data", str(text),
            "--run-dir", str(tmp_path / "run"), "--batch-size", "2", "--seq-len", "64", "--mesh", "data=1", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run dir was written
