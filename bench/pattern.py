"""Layer patterns (`Config.layer_pattern`): compile time against depth, and the bytes of a
mixed cache.

    python -m bench.pattern compile [--layers 12,48] [--models gemma3,llama]
        [--layouts scan,unrolled] [--repeats 2] [--json out.json]
    python -m bench.pattern cache [--preset gemma-3-1b] [--length 32768] [--json out.json]

compile: a preset shrunk to a CPU-friendly width (`--d-model`, `--vocab`; same layer
pattern, window and mechanisms) at each depth; the seconds to lower and compile the jitted
training step (`train.step.jit_step`: forward, backward, AdamW, as `python -m bench train`
compiles it) and the jitted forward (`zoo.apply` to logits). Everything is lowered from
shapes (`jax.eval_shape`), so nothing is allocated; the persistent compilation cache is off
and jax's in-memory caches are cleared before each program, so every compile is fresh. The
depths and models are interleaved `--repeats` times, the depths in turn forward and
backward, so load from other processes spreads over all of them; the table shows the
median, and each row's JSON keeps every sample.

cache: the self-attention key/value bytes (`zoo.nn.cache.nbytes`) of the cache
`zoo.init_cache` builds for one row of `--length` tokens, against the same model with every
layer global (`layer_pattern=("global",)`); computed from shapes, nothing is allocated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

import zoo
from bench import hardware, model_bench
from bench import __main__ as bench_cli
from train.hostmem import restart_with_huge_pages
from train.optim import Hparams
from train.step import abstract_state, batch_shardings, jit_step, state_shardings

# name -> preset; the shrink below keeps each preset's layer pattern, window, norms, RoPE
# and soft-caps, and sets the same widths for every model so that they compare.
MODELS = {"gemma3": "gemma-3-1b", "gemma2": "gemma-2-2b", "llama": "llama-3.2-1b", "qwen3": "qwen3-0.6b",
          "albert": "albert-base-v2"}  # albert: one layer's parameters shared by every layer
LAYOUTS = {"scan": True, "unrolled": False}


def shrunk(preset: str, layers: int, d_model: int, vocab: int, scan: bool) -> zoo.Config:
    """The preset at width d_model (4 query heads of 64, one K/V head, d_ff 4 d_model),
    vocabulary `vocab`, `layers` deep; the embedding scale follows d_model where the preset
    has one (Gemma's sqrt(d_model))."""
    base = zoo.preset(preset)
    changes: dict[str, Any] = dict(d_model=d_model, vocab_size=vocab, num_layers=layers, num_heads=4,
                                   num_kv_heads=1, head_dim=64, d_ff=4 * d_model, pad_id=0, eos_id=1,
                                   bos_id=2, scan_layers=scan, dtype="float32", param_dtype="float32")
    if base.embed_scale != 1.0:
        changes["embed_scale"] = d_model ** 0.5
    return base.replace(**changes)


def fresh_seconds(lower: Callable[[], Any]) -> dict[str, float]:
    """{trace_s, compile_s, total_s} of lower().compile() with jax's caches cleared first."""
    jax.clear_caches()
    start = time.perf_counter()
    lowered = lower()
    traced = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"trace_s": traced - start, "compile_s": done - traced, "total_s": done - start}


def train_lowering(cfg: zoo.Config, batch: int, seq_len: int) -> Callable[[], Any]:
    """Lowers `train.step.jit_step` for cfg on one device from the state's shapes."""
    mesh = zoo.sharding.make_mesh({"data": 1}, jax.devices()[:1])
    state = abstract_state(cfg, Hparams(total_steps=1000, warmup_steps=10))
    host = model_bench.synthetic_batch(cfg, batch, seq_len)
    bsh = batch_shardings(host, mesh)
    step = jit_step(state_shardings(state, mesh), bsh, mesh)

    def lower() -> Any:
        with zoo.sharding.use(mesh):
            return step.lower(state, host)

    return lower


def forward_lowering(cfg: zoo.Config, batch: int, seq_len: int) -> Callable[[], Any]:
    """Lowers the jitted forward (`zoo.apply`, logits [B, T, V]) from the parameters' shapes."""
    params = jax.eval_shape(lambda key: zoo.init(cfg, key), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), np.int32)
    fwd = jax.jit(lambda p, t: zoo.apply(p, cfg, zoo.Inputs(t)).logits)
    return lambda: fwd.lower(params, tokens)


PROGRAMS = {"train_step": train_lowering, "forward": forward_lowering}


def compile_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (model, layout, program, depth) with every sample; the depths of one
    (model, layout, program) follow each other, and the whole set repeats."""
    depths = [int(x) for x in args.layers.split(",")]
    keys = [(m, lay, prog, d) for m in args.models.split(",") for lay in args.layouts.split(",")
            for prog in args.programs.split(",") for d in depths]
    for m, lay, prog, _ in keys:
        if m not in MODELS or lay not in LAYOUTS or prog not in PROGRAMS:
            raise ValueError(f"bench.pattern: model {m!r}, layout {lay!r} or program {prog!r} unknown; "
                             f"expected {tuple(MODELS)}, {tuple(LAYOUTS)}, {tuple(PROGRAMS)}")
    # The first program of a process pays one-off costs (lazy imports, compiler set-up): a
    # discarded compile of the first program takes them.
    _measure(args, keys[0])
    samples: dict[tuple, list[dict[str, float]]] = {k: [] for k in keys}
    for r in range(args.repeats):
        # Depths in turn forward and backward (ABBA): a load that drifts, or a program that
        # gains from following another, weighs on every depth alike.
        for key in (keys if r % 2 == 0 else _reversed_depths(keys, len(depths))):
            samples[key].append(_measure(args, key))
    rows = []
    for (m, lay, prog, d), got in samples.items():
        med = {f: statistics.median(s[f] for s in got) for f in ("trace_s", "compile_s", "total_s")}
        rows.append({**environment(), "bench": "compile", "model": m, "preset": MODELS[m],
                     "layout": lay, "program": prog, "layers": d,
                     "period": len(_config(args, m, lay, d).layer_pattern) or 1,
                     "params": zoo.param_count(_config(args, m, lay, d)),
                     "d_model": args.d_model, "vocab": args.vocab, "batch": args.batch_size,
                     "seq_len": args.seq_len, **med, "samples": got})
    return with_ratios(rows, depths)


def _config(args: argparse.Namespace, model: str, layout: str, layers: int) -> zoo.Config:
    return shrunk(MODELS[model], layers, args.d_model, args.vocab, LAYOUTS[layout])


def _measure(args: argparse.Namespace, key: tuple[str, str, str, int]) -> dict[str, float]:
    """fresh_seconds of one (model, layout, program, depth)."""
    model, layout, program, layers = key
    cfg = _config(args, model, layout, layers)
    return fresh_seconds(PROGRAMS[program](cfg, args.batch_size, args.seq_len))


def _reversed_depths(keys: list[tuple], n: int) -> list[tuple]:
    """keys in runs of n depths per (model, layout, program), each run reversed."""
    return [k for i in range(0, len(keys), n) for k in reversed(keys[i:i + n])]


def with_ratios(rows: list[dict[str, Any]], depths: list[int]) -> list[dict[str, Any]]:
    """Adds `ratio`: total_s over that of the shallowest depth of the same model, layout and
    program."""
    base = {(r["model"], r["layout"], r["program"]): r["total_s"] for r in rows if r["layers"] == min(depths)}
    return [{**r, "ratio": r["total_s"] / base[(r["model"], r["layout"], r["program"])]} for r in rows]


def cache_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per preset: the cache's bytes with the preset's pattern and with every layer global."""
    rows = []
    for name in args.preset.split(","):
        cfg = zoo.preset(name, dtype=args.dtype)
        mixed = cache_bytes(cfg, args.length)
        full = cache_bytes(cfg.replace(layer_pattern=("global",)), args.length)
        kinds = [cfg.layer_kind(i) for i in range(cfg.num_layers)]
        rows.append({**environment(), "bench": "cache", "preset": name, "dtype": args.dtype,
                     "length": args.length, "batch": 1, "layers": cfg.num_layers,
                     "global_layers": kinds.count("global"), "local_layers": kinds.count("local"),
                     "window": cfg.sliding_window, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_size,
                     "mixed_bytes": mixed, "all_global_bytes": full, "ratio": full / mixed})
    return rows


def cache_bytes(cfg: zoo.Config, length: int) -> int:
    """`zoo.nn.cache.nbytes` of `zoo.init_cache(cfg, 1, length)`, from its shapes."""
    return zoo.nn.cache.nbytes(jax.eval_shape(lambda: zoo.init_cache(cfg, 1, length)))


def environment() -> dict[str, Any]:
    return {"device": hardware.device_description(), "date": datetime.date.today().isoformat(),
            "jax": jax.__version__}


COMPILE_COLUMNS = ("model", "layout", "program", "layers", "period", "params", "trace_s", "compile_s", "total_s",
                   "ratio")
CACHE_COLUMNS = ("preset", "dtype", "length", "global_layers", "local_layers", "window",
                 "mixed_bytes", "all_global_bytes", "ratio")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.pattern", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=("compile", "cache"))
    p.add_argument("--models", default="gemma3,llama", help=f"compile: names from {tuple(MODELS)}")
    p.add_argument("--layouts", default="scan,unrolled", help=f"compile: from {tuple(LAYOUTS)}")
    p.add_argument("--programs", default="train_step,forward", help=f"compile: from {tuple(PROGRAMS)}")
    p.add_argument("--layers", default="12,48", help="compile: depths, the first is the ratio's base")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--preset", default="gemma-3-1b", help="cache: presets (comma-separated)")
    p.add_argument("--length", type=int, default=32768, help="cache: tokens the cache reaches")
    p.add_argument("--dtype", default="bfloat16", help="cache: the keys' and values' dtype")
    p.add_argument("--json", default=None, help="write the rows here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # every compile from scratch
    if args.bench == "compile":
        rows, columns = compile_rows(args), COMPILE_COLUMNS
    else:
        rows, columns = cache_rows(args), CACHE_COLUMNS
    print(f"device: {rows[0]['device']}  jax {rows[0]['jax']}")
    print(bench_cli.table(rows, columns))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()  # as `python -m bench` compiles and runs (train/hostmem.py)
    raise SystemExit(main())
