"""`python -m bench train|decode|encode [--family F] [--vs hf|hf-flax] [--json out.json]`
(`python -m bench moe ...`: bench/moe.py; `python -m bench long ...`: bench/long_context.py;
`python -m bench context ...`: bench/context.py)

Prints a table and writes JSON rows: bench, family, tokens_per_s, mfu (against the matmul
peak measured in the same run) and, on accelerators, mfu_spec and spec_tflops (against the
published dense peak); decode rows: bound_tokens_per_s. With --vs, a row per peer variant:
peer, peer_variant, peer_tokens_per_s, ratio = zoo / peer, and peer_detail (compiled,
params, architecture, how and in which order its processes ran: bench/peers.py). `--vs hf`
writes two: PyTorch compiled (the main row) and eager.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

import jax

import zoo
from bench import hardware, model_bench, peers
from train.hostmem import restart_with_huge_pages
from zoo.nn.transformer import REMAT_POLICIES

# Default CPU shapes (issue: GPT-2 architecture at width 512, 8 layers, 8 heads, vocab 32000).
SMALL = dict(d_model=512, num_layers=8, num_heads=8, d_ff=2048, vocab_size=32000,
             pad_id=0, eos_id=1, bos_id=None)


REMAT_CHOICES = ("none", *REMAT_POLICIES)


def model_config(args: argparse.Namespace) -> zoo.Config:
    if args.preset:
        base = zoo.preset(args.preset)
    elif args.family == "encoder":
        base = zoo.preset("bert-base-uncased", **SMALL)
    elif args.family == "encdec":
        base = zoo.preset("t5-small", **{**SMALL, "num_layers": 4}, logit_scale=512 ** -0.5)
    else:
        base = zoo.preset("gpt2", **SMALL)
    changes: dict[str, Any] = {"dtype": args.dtype, "param_dtype": args.param_dtype or
                               ("float32" if args.bench == "train" else args.dtype)}
    if args.attention:
        changes["attention"] = args.attention
    if args.layers:
        changes["num_layers"] = args.layers
    if args.no_scan_layers:
        changes["scan_layers"] = False
    if base.positions in ("learned", "sinusoidal"):
        changes["max_len"] = max(base.max_len, args.seq_len + args.new_tokens + 1)
    return base.replace(**changes)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=("train", "decode", "encode"))
    p.add_argument("--family", choices=("decoder", "encoder", "encdec"), default=None)
    p.add_argument("--preset", default=None, help="a zoo preset instead of the default shape")
    p.add_argument("--vs", choices=("hf", "hf-flax"), action="append", default=[],
                   help="also run a peer on the same shapes (repeatable)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1],
                   help="decode: also measure these batch sizes (tokens/s per row and in total), "
                        "e.g. --batches 1 8 32; the batch-1 row always runs")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--param-dtype", default=None, help="default: float32 for train, else --dtype")
    p.add_argument("--attention", default=None, help="attention implementation (xla, cudnn)")
    p.add_argument("--remat", default="none", choices=REMAT_CHOICES,
                   help="train: what the backward recomputes (zoo.nn.transformer.REMAT_POLICIES)")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="train: output head and loss this many positions at a time (0: all)")
    p.add_argument("--layers", type=int, default=None, help="override the depth (compile-time scaling)")
    p.add_argument("--no-scan-layers", action="store_true",
                   help="run the layers unrolled (Config.scan_layers=False) instead of a scan")
    p.add_argument("--padding", type=float, default=0.0,
                   help="encode: the share of each row that is padding on average; rows for the "
                        "padded batch and for its documents packed into fewer rows")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--peer-repeats", type=int, default=1,
                   help="run each peer variant this many times, each in a fresh process, the order "
                        "rotated every repeat; the row gives the median and the spread")
    p.add_argument("--peer-process", choices=("fresh", "shared"), default="fresh",
                   help="fresh: each peer run in its own process (default); shared: the PyTorch peer in "
                        "this process after JAX has started, to measure what sharing costs")
    p.add_argument("--quant", type=int, choices=(4, 8), action="append", default=[],
                   help="decode: also rows for bf16 and these quantized weights (bench/quant.py)")
    p.add_argument("--json", default=None, help="write the rows here")
    return p


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.family is None:
        args.family = "encoder" if args.bench == "encode" else "decoder"
    cfg = model_config(args)
    # Peers first, each in its own process (bench/peers.py), before this process starts JAX's
    # backend: on a GPU, JAX takes its memory pool then, and a peer would be left the rest.
    got = peers.run(args, cfg) if args.vs else []
    peak = hardware.matmul_peak(cfg.dtype)
    bandwidth = hardware.stream_bandwidth()
    common = {**environment(cfg, peak), "bandwidth_gbs": bandwidth / 1e9}
    if args.bench == "train":
        row = model_bench.train_row(cfg, args.batch_size, args.seq_len, peak, args.iters, args.remat,
                                    args.loss_chunk)
    elif args.bench == "decode":
        row = model_bench.decode_row(cfg, args.prompt_len, args.new_tokens, bandwidth, args.iters)
        if cfg.param_dtype == "float32":
            half = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
            bf16 = model_bench.decode_row(half, args.prompt_len, args.new_tokens, bandwidth, args.iters)
            row["bf16_tokens_per_s"] = bf16["tokens_per_s"]
            row["bf16_bound_tokens_per_s"] = bf16["bound_tokens_per_s"]
    else:
        row = model_bench.encode_row(cfg, args.batch_size, args.seq_len, peak, args.iters, args.padding)
    rows = [{**common, **row}]
    if args.bench == "decode" and args.quant:  # bf16, int8, int4 rows (bench/quant.py)
        from bench import quant

        rows += [{**common, **r} for r in quant.decode_rows(cfg, args.prompt_len, args.new_tokens, bandwidth,
                                                            args.iters, args.quant)]
    if args.bench == "decode":  # the --batches sweep, after the batch-1 row
        rows += [{**common, **model_bench.decode_row(cfg, args.prompt_len, args.new_tokens, bandwidth,
                                                     args.iters, batch=b)} for b in args.batches if b != 1]
    if args.bench == "encode" and args.padding:
        rows.append({**common, **model_bench.encode_row(cfg, args.batch_size, args.seq_len, peak, args.iters,
                                                        args.padding, packed=True)})
    for r in rows:  # MFU against the datasheet too (null on a CPU, with the reason)
        r.update(hardware.spec_fields(r.get("mfu"), peak, r["dtype"]))
    row = rows[0]
    for detail in got:
        theirs = detail["tokens_per_s"]
        if theirs and detail.get("device") not in SAME_DEVICE[jax.default_backend()]:
            detail["error"] = f"the peer ran on {detail['device']}, zoo on {jax.default_backend()}: no ratio"
            theirs = None
        rows.append({**common, **row, "peer": detail["peer"], "peer_tokens_per_s": theirs,
                     "peer_variant": "compiled" if detail["compiled"] else "eager",
                     "ratio": row["tokens_per_s"] / theirs if theirs else None, "peer_detail": detail})
    return rows


# Where a peer must have run for its rate to compare with zoo's (torch's and JAX's names).
SAME_DEVICE = {"cpu": ("cpu",), "gpu": ("cuda", "gpu"), "tpu": ("tpu",)}


def environment(cfg: zoo.Config, peak: float) -> dict[str, Any]:
    """The fields every row carries: where and with what it ran."""
    return {"device": hardware.device_description(), "date": datetime.date.today().isoformat(),
            "jax": jax.__version__, "peak_tflops": peak / 1e12, "attention": cfg.attention,
            "scan_layers": cfg.scan_layers}


COLUMNS = ("bench", "family", "dtype", "layout", "rows", "batch", "tokens_per_s", "row_tokens_per_s",
           "mfu", "bound_tokens_per_s",
           "mfu_spec", "vs_fp32", "vs_int8", "compile_s", "peak_bytes", "peer", "peer_variant", "peer_tokens_per_s", "ratio")


def table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A markdown table of the rows' columns (those no row has are left out)."""
    cols = tuple(c for c in columns if any(r.get(c) is not None for r in rows))

    def fmt(col: str, v: Any) -> str:
        if v is None:
            return "-"
        if col.endswith("_bytes"):
            return f"{v / 2 ** 20:,.1f} MiB" if v < 2 ** 24 else f"{v / 2 ** 20:,.0f} MiB"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(c) for c in cells])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["moe"]:  # its own options (bench/moe.py)
        from bench import moe

        return moe.main(argv[1:])
    if argv[:1] == ["long"]:  # its own options (bench/long_context.py)
        from bench import long_context

        return long_context.main(argv[1:])
    if argv[:1] == ["context"]:  # context parallelism's per-device bytes (bench/context.py)
        from bench import context

        return context.main(argv[1:])
    if argv[:1] == ["quant"]:  # quantized-inference quality (bench/quant.py)
        from bench import quant

        return quant.main(argv[1:])
    args = parser().parse_args(argv)
    rows = run(args)
    r = rows[0]
    print(f"device: {r['device']}  jax {r['jax']}  matmul peak {r['peak_tflops']:.2f} TFLOP/s "
          f"({args.dtype})  stream {r['bandwidth_gbs']:.1f} GB/s")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()  # zoo and the peers alike run under it (train/hostmem.py)
    sys.exit(main())
