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
    """Batch 1 and the --batches sweep (a row of 2: per-row and total rates, a bound twice
    batch 1's), then the peer."""
    rows = _rows(tmp_path, "decode", "--new-tokens", "4", "--prompt-len", "4", "--vs", "hf", "--batches", "2")
    for row in rows:
        assert row["bench"] == "decode" and row["bound_tokens_per_s"] > 0
        assert row["tokens_per_s"] > 0 and row["mfu"] is None
    one, two, peer = rows
    assert (one["batch"], two["batch"]) == (1, 2) and "peer" not in two
    assert two["tokens_per_s"] == pytest.approx(2 * two["row_tokens_per_s"])
    assert two["bound_tokens_per_s"] == pytest.approx(2 * one["bound_tokens_per_s"])
    assert peer["peer"] == "hf" and peer["ratio"] > 0


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


def test_mla_cache_row(tmp_path, capsys):
    from bench import mla
    out = tmp_path / "mla.json"
    assert mla.main(["--length", "64", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    # deepseek-v2-lite: 27 layers of a 512 latent + a 64-dim rope key, against 16 heads of
    # 192-dim keys and 128-dim values; bf16.
    assert row["latent_bytes_per_token"] == 27 * (512 + 64) * 2
    assert row["expanded_bytes_per_token"] == 27 * 16 * (192 + 128) * 2
    assert "latent_bytes_per_token" in capsys.readouterr().out


def test_pattern_compile_and_cache_rows(tmp_path, capsys):
    from bench import pattern
    out = tmp_path / "compile.json"
    assert pattern.main(["compile", "--models", "gemma3", "--layouts", "scan", "--programs", "forward",
                         "--layers", "1,2", "--d-model", "32", "--vocab", "64", "--seq-len", "8",
                         "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["model"], r["layers"], r["period"]) for r in rows] == [("gemma3", 1, 6), ("gemma3", 2, 6)]
    assert rows[0]["ratio"] == 1.0 and all(r["total_s"] > 0 for r in rows)
    out = tmp_path / "cache.json"
    assert pattern.main(["cache", "--length", "1024", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    # gemma-3-1b: 4 global layers of 1024 slots and 22 local rings of 512, one K/V head of 256, bf16.
    assert (row["global_layers"], row["local_layers"]) == (4, 22)
    assert row["mixed_bytes"] == (4 * 1024 + 22 * 512) * 2 * 256 * 2
    assert row["all_global_bytes"] == 26 * 1024 * 2 * 256 * 2
    assert "mixed_bytes" in capsys.readouterr().out


def test_paired_alternates_the_trees(tmp_path, monkeypatch, capsys):
    from bench import paired
    ran = []

    def fake(tree, bench_args):
        ran.append(tree)
        return {"device": "cpu", "jax": "x", "tokens_per_s": 100.0 if tree == "B" else 110.0}

    monkeypatch.setattr(paired, "run_bench", fake)
    monkeypatch.setattr(paired, "commit_of", lambda tree: tree.lower())
    out = tmp_path / "paired.json"
    assert paired.main(["--before", "B", "--after", "A", "--rounds", "2", "--json", str(out),
                        "--", "train", "--iters", "1"]) == 0
    assert ran == ["B", "A", "A", "B"]
    got = json.loads(out.read_text())
    assert [r["commit"] for r in got["rows"]] == ["b", "a", "a", "b"]
    assert got["summary"]["after_over_before"] == pytest.approx(1.1)
    assert "after / before 1.100" in capsys.readouterr().out


def test_packed_encode_inputs_give_the_padded_hidden_states():
    """`bench encode --padding`: the documents packed into fewer rows (segment ids, positions
    restarting per document) encode as they do one per padded row, through a shrunk
    ModernBERT's two-sided local windows."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import zoo
    from bench import model_bench

    cfg = zoo.preset("modernbert-base", d_model=32, num_heads=4, d_ff=48, num_layers=4, sliding_window=5,
                     vocab_size=128, pad_id=0, bos_id=None, eos_id=1)
    params = zoo.init(cfg, jax.random.key(0))
    encode = jax.jit(lambda a: zoo.encoder.forward(params, cfg, a["tokens"], mask=a["mask"],
                                                   segment_ids=a.get("segment_ids"),
                                                   positions=a.get("positions")).hidden)
    by_doc = []
    for packed in (False, True):
        inputs = model_bench.encode_inputs(cfg, 6, 24, padding=0.5, packed=packed)
        hidden = np.asarray(encode({k: jnp.asarray(v) for k, v in inputs.items()}))
        segments = inputs.get("segment_ids", inputs["mask"].astype(np.int32))
        by_doc.append({tuple(inputs["tokens"][r][segments[r] == s]): hidden[r][segments[r] == s]
                       for r in range(len(segments)) for s in set(segments[r][segments[r] > 0])})
    padded, packed = by_doc
    assert len(packed) == len(padded) == 6 and len(inputs["tokens"]) < 6  # fewer rows
    assert max(map(len, padded)) > 2 * cfg.sliding_window  # windows cut documents on both sides
    for doc, h in padded.items():
        np.testing.assert_allclose(packed[doc], h, atol=1e-5)


def test_moe_rows_compare_expert_counts_and_dispatches(tmp_path, capsys):
    """`python -m bench moe` at tiny sizes: a layer row per (dispatch, expert count) with its
    time against the fewest experts, and the Mixtral-style decoder trained sparse and dense."""
    out = tmp_path / "moe.json"
    assert bench_cli.main(["moe", "--d-model", "32", "--d-ff", "32", "--batch-size", "2", "--seq-len", "8",
                           "--layers", "1", "--vocab", "128", "--iters", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    layer = [(r["dispatch"], r["experts"]) for r in rows if r["bench"] == "moe_layer"]
    assert layer == [("sparse", 4), ("sparse", 32), ("dense", 4), ("dense", 32)]
    assert all(r["seconds"] > 0 and r["vs_fewest"] > 0 for r in rows if r["bench"] == "moe_layer")
    assert rows[0]["kernel"] == "tiles"  # auto on a CPU
    train = [r for r in rows if r["bench"] == "moe_train"]
    assert [r["dispatch"] for r in train] == ["sparse", "dense"] and all(r["tokens_per_s"] > 0 for r in train)
    assert "| moe_layer" in capsys.readouterr().out


def test_long_rows_report_peak_rss_and_skip_what_would_not_fit(tmp_path, monkeypatch):
    """`python -m bench long`: a worker trains (or, over --max-gib, only compiles) and reports
    its peak RSS; the driver runs one worker per (length, attention) and writes the rows (the
    fresh processes replaced by in-process calls here)."""
    from bench import long_context

    job = {"seq_len": 64, "attention": "blockwise", "d_model": 64, "layers": 1, "block": 32,
           "max_gib": 4.0, "iters": 1}
    ran = long_context.worker(job)
    assert ran["status"] == "ran" and ran["peak_rss_gib"] > 0 and ran["tokens_per_s"] > 0
    skipped = long_context.worker({**job, "attention": "xla", "max_gib": 1e-6})
    assert skipped["status"].startswith("not run") and "step_s" not in skipped
    monkeypatch.setattr(long_context, "run_one", lambda job: {**job, "status": "ran"})
    out = tmp_path / "long.json"
    assert bench_cli.main(["long", "--lengths", "64,128", "--impls", "xla,blockwise", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["seq_len"], r["attention"]) for r in rows] == [(64, "xla"), (64, "blockwise"),
                                                              (128, "xla"), (128, "blockwise")]
