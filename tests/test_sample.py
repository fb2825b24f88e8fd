"""`python -m train sample`: loads a run dir as `python -m train` leaves it (config.json,
tokenizer.model, orbax checkpoints written by train's Checkpointer) and prints completions
equal to zoo.generate on the saved params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
import zoo
from train import sample
from train.checkpoint import Checkpointer
from train.tokens import train_tokenizer

CORPUS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
          "for i in range(10):\n    print(i * i)\n"] * 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A decoder run dir with one checkpoint at step 3 (params perturbed away from init)."""
    path = tmp_path_factory.mktemp("run")
    tok = train_tokenizer(CORPUS, vocab_size=320)
    tok.save(path / "tokenizer.model")
    v = tok.vocab
    cfg = zoo.preset("tiny-decoder", vocab_size=v.size, pad_id=v.pad_id, eos_id=v.eos_id, bos_id=v.bos_id)
    (path / "config.json").write_text(cfg.to_json())
    mesh = zoo.sharding.make_mesh({"data": 1}, jax.devices()[:1])
    state = train.create_state(cfg, train.Hparams(), 0, mesh)
    state = state.replace(params=jax.tree.map(lambda p: p * 3.0, state.params))
    ckpt = Checkpointer(path / "checkpoints", every=1, use_async=False)
    ckpt.save(3, state, {"config": cfg.to_dict()}, force=True)
    ckpt.close()
    return path, cfg, jax.device_get(state.params), tok


def test_sample_prints_what_generate_gives(run_dir, capsys):
    path, cfg, params, tok = run_dir
    assert sample.main(["--run", str(path), "--prompt", "def add", "--prompt", "import",
                        "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    tokens, mask = sample.encode_prompts(tok, cfg, ["def add", "import"])
    want = zoo.generate(params, cfg, jnp.asarray(tokens), 6, prompt_mask=jnp.asarray(mask))
    for prompt, text in zip(["def add", "import"], sample.completions(tok, cfg, np.asarray(want))):
        assert f">>> {prompt}\n{text}\n" in printed


def test_sample_restores_params_only(run_dir):
    path, cfg, params, _ = run_dir
    restored, step = sample.restore_params(path / "checkpoints", cfg)
    assert step == 3
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, params)


def test_sample_errors(run_dir, tmp_path, capsys):
    path = run_dir[0]
    assert sample.main(["--run", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert sample.main(["--run", str(path), "--prompt", "x", "--step", "99"]) == 2
    assert "no checkpoint 99" in capsys.readouterr().err
    assert sample.main(["--run", str(path), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert sample.main(["--run", str(path), "--prompt", "x", "--sink-tokens", "4"]) == 2
    assert "needs cache_window" in capsys.readouterr().err
