"""`python -m bench` end to end on a tiny model: the JSON rows carry the fields the issue
names, with the PyTorch peer beside zoo. Correctness of the plumbing only: no time is
asserted."""

import json

import pytest

from bench import __main__ as bench_cli
from bench import profile, sweep

TINY = ["--preset", "tiny-decoder", "--iters", "1"]


def _rows(tmp_path, *argv):
    out = tmp_path / "rows.json"
    assert bench_cli.main([*argv, *TINY, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_train_rows_name_the_peer_and_the_ratio(tmp_path):
    rows = _rows(tmp_path, "train", "--batch-size", "2", "--seq-len", "16", "--vs", "hf",
                 "--no-scan-layers", "--loss-chunk", "8")
    zoo_row, peer_row = rows
    for row in rows:
        assert row["bench"] == "train" and row["family"] == "decoder"
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["peak_tflops"] > 0
        assert row["scan_layers"] is False and row["loss_chunk"] == 8
    assert "peer" not in zoo_row
    assert peer_row["peer"] == "hf" and peer_row["peer_tokens_per_s"] > 0
    assert peer_row["ratio"] == pytest.approx(peer_row["tokens_per_s"] / peer_row["peer_tokens_per_s"])
    assert peer_row["peer_detail"]["library"].endswith("cpu")


def test_decode_rows_report_the_bandwidth_bound(tmp_path):
    rows = _rows(tmp_path, "decode", "--new-tokens", "4", "--prompt-len", "4", "--vs", "hf")
    for row in rows:
        assert row["bench"] == "decode" and row["bound_tokens_per_s"] > 0
        assert row["tokens_per_s"] > 0 and row["mfu"] is None
    assert rows[1]["peer"] == "hf" and rows[1]["ratio"] > 0


def test_profile_lists_the_ops_of_a_step(capsys):
    import jax.numpy as jnp
    result = profile.profile(lambda: jnp.tanh(jnp.ones((64, 64))) @ jnp.ones((64, 64)), calls=2, top=5)
    assert result["kernels"] > 0 and result["wall_s"] > 0 and result["top"]
    assert "kernels per call" in capsys.readouterr().out


def test_profile_runs_each_bench(tmp_path, capsys):
    for bench, preset in (("encode", "tiny-encoder"), ("decode", "tiny-decoder")):
        out = tmp_path / f"{bench}.json"
        profile.main([bench, "--preset", preset, "--batch-size", "2", "--seq-len", "16",
                      "--prompt-len", "4", "--new-tokens", "4", "--calls", "1", "--top", "3",
                      "--json", str(out)])
        assert json.loads(out.read_text())["kernels"] > 0
    assert "encode tiny-encoder" in capsys.readouterr().out


def test_sweep_measures_each_variant_with_its_own_program_memory(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = ["--preset", "tiny-decoder", "--iters", "1", "--batch-size", "2", "--seq-len", "16",
            "--variants", "none:scan,dots:unrolled", "--json", str(out)]
    assert sweep.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["none:scan", "dots:unrolled"]
    assert [r["scan_layers"] for r in rows] == [True, False] and rows[1]["remat"] == "dots"
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["program_bytes"] > 0
    assert "dots:unrolled" in capsys.readouterr().out


def test_sweep_names_a_bad_variant():
    with pytest.raises(ValueError, match="'dots:sideways' is not REMAT:LAYOUT"):
        sweep.parse_variants("none:scan,dots:sideways")


def test_sweep_refuses_the_bench_flags_it_would_ignore(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--vs", "hf"])
    assert "drop --vs" in capsys.readouterr().err
