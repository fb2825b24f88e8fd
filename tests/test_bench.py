"""`python -m bench` end to end on a tiny model: the JSON rows carry the fields the issue
names, with the PyTorch peer beside zoo. Correctness of the plumbing only: no time is
asserted."""

import json

import pytest

from bench import __main__ as bench_cli
from bench import profile, sweep
from conftest import tiny

import zoo

TINY = ["--preset", "tiny-decoder", "--iters", "1"]


def _rows(tmp_path, *argv):
    out = tmp_path / "rows.json"
    assert bench_cli.main([*argv, *TINY, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture
def eager_peers(monkeypatch):
    """The PyTorch peer's worker run in this process and eager for both variants (a compiled
    one takes minutes here: tests/test_bench.py::test_vs_hf_runs_compiled_and_eager_peers),
    keeping the job's `compiled` flag; the jobs it got, in order."""
    from bench import peer_torch, peers
    ran = []

    def eager(job):
        ran.append(job)
        return {**peer_torch.run({**job, "compiled": False}), "compiled": job["compiled"]}

    monkeypatch.setattr(peers, "run_job", eager)
    return ran


PEER_FIELDS = ("compiled", "params", "architecture", "process", "order", "runs", "run_sequence")


def test_train_rows_name_the_peer_and_the_ratio(tmp_path, eager_peers):
    """Zoo's row, then PyTorch compiled (the main row) and eager, each with the fields the
    issue names; the peer is the transformers class of zoo's config with zoo's count."""
    import zoo
    rows = _rows(tmp_path, "train", "--batch-size", "2", "--seq-len", "16", "--vs", "hf",
                 "--no-scan-layers", "--loss-chunk", "8")
    zoo_row, compiled, eager = rows
    for row in rows:
        assert row["bench"] == "train" and row["family"] == "decoder"
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["peak_tflops"] > 0
        assert row["scan_layers"] is False and row["loss_chunk"] == 8
        # a CPU: no published peak, said why
        assert row["mfu_spec"] is None and row["spec_tflops"] is None and "cpu" in row["spec_note"]
    assert "peer" not in zoo_row
    assert [(r["peer"], r["peer_variant"], r["peer_detail"]["compiled"]) for r in (compiled, eager)] == [
        ("hf", "compiled", True), ("hf", "eager", False)]
    for peer_row in (compiled, eager):
        detail = peer_row["peer_detail"]
        assert all(k in detail for k in PEER_FIELDS)
        assert detail["architecture"] == "LlamaForCausalLM" and detail["library"].endswith("cpu")
        assert detail["params"] == zoo.param_count(zoo.preset("tiny-decoder"))
        assert detail["run_sequence"] == ["hf:compiled", "hf:eager", "zoo"]
        assert peer_row["peer_tokens_per_s"] > 0
        assert peer_row["ratio"] == pytest.approx(peer_row["tokens_per_s"] / peer_row["peer_tokens_per_s"])


def test_decode_rows_report_the_bandwidth_bound(tmp_path, eager_peers):
    """Batch 1 and the --batches sweep (a row of 2: per-row and total rates; the weights
    read once per step, each row's KV cache), then the peers, which made every token."""
    rows = _rows(tmp_path, "decode", "--new-tokens", "4", "--prompt-len", "4", "--vs", "hf", "--batches", "2")
    for row in rows:
        assert row["bench"] == "decode" and row["bound_tokens_per_s"] > 0
        assert row["tokens_per_s"] > 0 and row["mfu"] is None and row["mfu_spec"] is None
    one, two, compiled, eager = rows
    assert (one["batch"], two["batch"]) == (1, 2) and "peer" not in two
    assert two["tokens_per_s"] == pytest.approx(2 * two["row_tokens_per_s"])
    for row in (one, two):
        read = row["weight_read_bytes"] + row["batch"] * row["kv_read_bytes"]
        assert row["bound_tokens_per_s"] == pytest.approx(row["batch"] * row["bandwidth_gbs"] * 1e9 / read)
    for peer in (compiled, eager):
        assert peer["peer"] == "hf" and peer["ratio"] > 0 and peer["peer_detail"]["generated_tokens"] == 4


def test_quantized_decode_rows_alternate_the_variants_and_pair_the_ratios(monkeypatch):
    """bench decode --quant (bench.quant.decode_rows): every round calls each variant once,
    the order rotated; vs_fp32 and int4's vs_int8 are medians of per-round ratios, so one
    slow round (the machine drifting) leaves them alone. Fake runners on a fake clock."""
    import types

    from bench import model_bench, quant, timing

    now, calls = [0.0], []
    cost = {"float32": 8.0, "bfloat16": 10.0, "int8": 2.0, "int4": 1.0}

    def runner(cfg, prompt_len, new_tokens, transform=None):
        name = cfg.param_dtype if transform is None else f"int{transform.__defaults__[0]}"

        def run():
            slow = 3.0 if len(calls) >= 4 and len(calls) < 8 else 1.0  # round 2 runs 3x slower
            now[0] += cost[name] * slow
            calls.append(name)
        return types.SimpleNamespace(run=run, name=name, new_tokens=new_tokens)

    monkeypatch.setattr(model_bench, "decode_runner", runner)
    monkeypatch.setattr(model_bench, "decode_result", lambda r, seconds, bw: {"tokens_per_s": r.new_tokens / seconds})
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(timing, "block", lambda x: x)
    rows = quant.decode_rows(zoo.preset("tiny-decoder"), 4, 3, 1e9, 3, [8, 4])
    assert calls == ["float32", "bfloat16", "int8", "int4", "bfloat16", "int8", "int4", "float32",
                     "int8", "int4", "float32", "bfloat16"]
    assert [r["dtype"] for r in rows] == ["bfloat16", "int8", "int4"]
    half, int8, int4 = rows
    assert (half["vs_fp32"], int8["vs_fp32"], int4["vs_fp32"], int4["vs_int8"]) == (0.8, 4.0, 8.0, 2.0)
    assert "vs_int8" not in int8 and int8["fp32_paired_tokens_per_s"] == pytest.approx(3 / 8.0)


def test_decode_step_reads_the_weights_it_uses_and_the_cache():
    """Hand counts (fp32): tiny-decoder reads every weight but one row of its untied token
    table, and 2 layers x (K, V) x 2 kv heads x 8 dims at the mean context 4 + 8 / 2; GPT-2
    reads one row of its 1024 learned positions (its tied token table is the head, read
    whole); tiny-encdec reads neither its encoder nor its cross K/V projections, but the
    cross keys and values of the 4 prompt tokens."""
    import jax

    import zoo
    from bench.model_bench import step_read_bytes

    def read(cfg):
        return step_read_bytes(cfg, zoo.init(cfg, jax.random.key(0)), 4, 8)

    kv = lambda layers, heads, positions: layers * 2 * heads * 8 * positions * 4
    assert read(tiny("tiny-decoder")) == ((26784 - 128 * 32 + 32) * 4, kv(2, 2, 8))
    gpt2 = zoo.preset("gpt2", d_model=32, num_heads=4, num_layers=2, d_ff=64, vocab_size=128,
                      pad_id=0, eos_id=1, bos_id=None)
    assert read(gpt2)[0] == (zoo.param_count(gpt2) - 1023 * 32) * 4
    encdec = tiny("tiny-encdec")
    encoder = zoo.model.P.count(zoo.model.spec(encdec)["encoder"], None)
    cross_kv = 2 * 2 * 32 * 32  # 2 layers x (k, v) x [32, 4 x 8]
    assert read(encdec) == ((zoo.param_count(encdec) - encoder - cross_kv - 127 * 32) * 4,
                            kv(2, 4, 8) + kv(2, 4, 4))


def test_mfu_against_the_published_peak():
    """bf16 rows on a listed accelerator get the datasheet's figure; fp32, an unlisted chip
    and a CPU get null and the reason."""
    from types import SimpleNamespace as Device

    from bench.hardware import spec_fields
    h200, v5e = Device(platform="gpu", device_kind="NVIDIA H200"), Device(platform="tpu", device_kind="TPU v5 lite")
    assert spec_fields(0.5, 600e12, "bfloat16", h200) == {"spec_tflops": 989.0,
                                                          "mfu_spec": pytest.approx(300 / 989)}
    assert spec_fields(0.5, 100e12, "bfloat16", v5e)["spec_tflops"] == 197.0
    for dtype, device, why in (("float32", h200, "float32"), ("bfloat16", Device(platform="gpu", device_kind="X1"),
                                                                "'X1' is not in"),
                               ("bfloat16", Device(platform="cpu", device_kind="cpu"), "cpu: no published")):
        got = spec_fields(0.5, 1e12, dtype, device)
        assert got["mfu_spec"] is None and got["spec_tflops"] is None and why in got["spec_note"]


def test_peers_refuse_another_model_and_rotate_their_order(monkeypatch):
    """A peer whose parameter count is not zoo's stops the bench, naming both counts; one
    that made fewer tokens too; repeats run each variant in a rotated order."""
    import argparse

    from bench import peers
    args = argparse.Namespace(bench="train", vs=["hf", "hf-flax"], batch_size=2, seq_len=8, prompt_len=4,
                              new_tokens=4, iters=1, peer_repeats=3)
    cfg = tiny("tiny-decoder")
    want = peers.expected_params(cfg, "train")
    seen = []

    def fake(job):
        seen.append(peers.label(job))
        return {"tokens_per_s": 10.0 + len(seen), "params": want, "architecture": "LlamaForCausalLM"}

    monkeypatch.setattr(peers, "run_job", fake)
    details = peers.run(args, cfg)
    assert peers.rotation(3, 1) == [1, 2, 0]
    assert seen == ["hf:compiled", "hf:eager", "hf-flax:compiled", "hf:eager", "hf-flax:compiled",
                    "hf:compiled", "hf-flax:compiled", "hf:compiled", "hf:eager"]
    first = details[0]
    assert first["order"] == [1, 3, 2] and first["runs"] == [11.0, 16.0, 18.0] and first["tokens_per_s"] == 16.0
    assert first["spread"] == pytest.approx(7 / 16) and first["run_sequence"] == seen + ["zoo"]
    monkeypatch.setattr(peers, "run_job", lambda job: {"params": want + 1, "architecture": "GPT2LMHeadModel"})
    with pytest.raises(ValueError, match=f"GPT2LMHeadModel has {want + 1:,} parameters, zoo's train model {want:,}"):
        peers.run(args, cfg)
    monkeypatch.setattr(peers, "run_job", lambda job: {"params": want, "generated_tokens": 3, "tokens_per_s": 1.0})
    with pytest.raises(ValueError, match="generated 3 tokens, not --new-tokens 4"):
        peers.run(args, cfg)


def test_peer_process_shared_runs_pytorch_after_jax(monkeypatch):
    """--peer-process shared (the A/B for what sharing a process with JAX costs): the PyTorch
    peer runs in this process, the Flax one still in its own; the rows say which."""
    import argparse
    import os

    from bench import peer_torch, peers
    args = argparse.Namespace(bench="encode", vs=["hf"], batch_size=2, seq_len=8, prompt_len=4, new_tokens=4,
                              iters=1, peer_process="shared")
    cfg = tiny("tiny-encoder")
    monkeypatch.setattr(peer_torch, "run", lambda job: {"pid": os.getpid(), "tokens_per_s": 1.0,
                                                        "params": job["expect_params"]})
    details = peers.run(args, cfg)
    assert [(d["pid"], d["process"]) for d in details] == [(os.getpid(), "the bench's process, after JAX")] * 2
    assert peers.job("hf-flax", True, args, cfg)["process"] == "fresh"


@pytest.mark.parametrize("name,bench,architecture", [
    ("tiny-encoder", "encode", "BertModel"), ("tiny-encoder", "train", "BertForMaskedLM"),
    ("tiny-encdec", "train", "T5ForConditionalGeneration")])
def test_torch_peer_builds_zoos_model(name, bench, architecture):
    """The PyTorch peer's model has zoo's parameter count: no pooler when encoding, no MLM
    head either; T5 v1.1's head untied as zoo's config has it (transformers 5 ties it)."""
    import torch

    from bench import peer_torch, peers
    cfg = tiny(name)
    model = peer_torch.build({"bench": bench, "family": cfg.family, "hf_config": peers.hf_config(cfg),
                              "param_dtype": "float32"}, torch.device("cpu"))
    assert type(model).__name__ == architecture
    assert peer_torch.param_count(model) == peers.expected_params(cfg, bench)


@pytest.mark.slow
def test_vs_hf_runs_compiled_and_eager_peers(tmp_path):
    """`--vs hf` end to end: each variant in its own process, torch.compile included (minutes
    on two busy cores, hence slow)."""
    rows = _rows(tmp_path, "train", "--batch-size", "2", "--seq-len", "16", "--vs", "hf")
    details = [r["peer_detail"] for r in rows[1:]]
    assert [d["compiled"] for d in details] == [True, False]
    assert all(d["process"] == "fresh subprocess per run" and d["tokens_per_s"] > 0 for d in details)
    assert details[0]["first_call_s"] > details[0]["step_s"]  # the compile, in the warm-up


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


@pytest.mark.slow  # CI time: bench-only code, run by its RESULTS commands
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


@pytest.mark.slow  # CI time: bench-only code, run by its RESULTS commands
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


@pytest.mark.slow  # CI time: bench-only code, run by its RESULTS commands
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


def test_streaming_stretches_start_with_bos_where_the_tokenizer_has_one():
    """bench.streaming feeds stretches as the run trained on documents: BOS first where
    the vocabulary has one, then consecutive text; no BOS otherwise; too short a text is a
    ValueError naming the flags."""
    import types

    import numpy as np

    from bench.streaming import stretches

    def tokenizer(bos):
        return types.SimpleNamespace(vocab=types.SimpleNamespace(bos_id=bos),
                                     encode=lambda texts: [list(range(10, 30))])

    np.testing.assert_array_equal(stretches(tokenizer(3), "text", 2, 4), [[3, 10, 11, 12], [3, 13, 14, 15]])
    np.testing.assert_array_equal(stretches(tokenizer(None), "text", 2, 4), [[10, 11, 12, 13], [14, 15, 16, 17]])
    with pytest.raises(ValueError, match="--rows x --length"):
        stretches(tokenizer(None), "text", 3, 8)
