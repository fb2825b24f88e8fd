"""The training step under several remat policies and layer layouts, in one process against
one measured peak, so the variants compare without run-to-run drift:

    python -m bench.sweep [--preset NAME --dtype bfloat16 --seq-len 2048 ...]
        [--variants none:scan,dots:scan,none:unrolled] [--json out.json]

A variant is `REMAT:LAYOUT`: REMAT one of `zoo.nn.transformer.REMAT_POLICIES` or none,
LAYOUT `scan` (Config.scan_layers=True) or `unrolled`. Rows are `python -m bench train`
rows plus `variant`; `program_bytes` (XLA's estimate for the one program) is the memory to
compare, since the allocator's peak carries over from earlier variants. A variant that runs
out of memory gets a row with its `error` and the sweep goes on.
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

import jax

from bench import hardware, model_bench
from bench import __main__ as bench_cli
from train.hostmem import restart_with_huge_pages

LAYOUTS = {"scan": True, "unrolled": False}
DEFAULT = "none:scan,dots:scan,minimal:scan,full:scan,none:unrolled,dots:unrolled"
COLUMNS = ("variant", "tokens_per_s", "mfu", "program_bytes", "compile_s", "error")


def parse_variants(text: str) -> list[tuple[str, bool]]:
    """"dots:scan,none:unrolled" -> [("dots", True), ("none", False)]; names what is wrong."""
    out = []
    for item in text.split(","):
        remat, _, layout = item.strip().partition(":")
        if remat not in bench_cli.REMAT_CHOICES or layout not in LAYOUTS:
            raise ValueError(f"--variants: {item!r} is not REMAT:LAYOUT with REMAT in "
                             f"{bench_cli.REMAT_CHOICES} and LAYOUT in {tuple(LAYOUTS)}")
        out.append((remat, LAYOUTS[layout]))
    return out


def run(args: Any) -> list[dict[str, Any]]:
    variants = parse_variants(args.variants)
    base = bench_cli.model_config(args)
    peak = hardware.matmul_peak(base.dtype)
    rows = []
    for remat, scan in variants:
        cfg = base.replace(scan_layers=scan)
        name = f"{remat}:{'scan' if scan else 'unrolled'}"
        try:
            row = model_bench.train_row(cfg, args.batch_size, args.seq_len, peak, args.iters, remat,
                                        args.loss_chunk)
        except Exception as e:  # out of memory: report it and measure the rest
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            row = {"bench": "train", "family": cfg.family, "error": str(e).splitlines()[0][:200]}
        rows.append({**bench_cli.environment(cfg, peak), **row, "variant": name})
        gc.collect()
        jax.clear_caches()  # the previous variant's executable and buffers go before the next
    return rows


def main(argv: list[str] | None = None) -> int:
    p = bench_cli.parser()
    p.prog = "python -m bench.sweep"
    p.add_argument("--variants", default=DEFAULT, help="REMAT:LAYOUT,... (see the module doc)")
    args = p.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        parse_variants(args.variants)
    except ValueError as e:
        p.error(str(e))
    if args.vs or args.no_scan_layers:  # flags of `python -m bench` that the sweep would ignore
        p.error("the sweep runs zoo only, each variant naming its layout: drop --vs and --no-scan-layers")
    rows = run(args)
    print(f"device: {rows[0]['device']}  jax {rows[0]['jax']}  matmul peak "
          f"{rows[0]['peak_tflops']:.2f} TFLOP/s ({args.dtype})")
    print(bench_cli.table(rows, COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()  # as `python -m bench` runs (train/hostmem.py)
    raise SystemExit(main())
