"""Long rows: one training step of a small decoder, XLA attention against blockwise.

    python -m bench long [--lengths 4096,16384,32768,65536] [--impls xla,blockwise]
        [--d-model 128] [--layers 2] [--block 512] [--max-gib 6] [--iters 1] [--json out.json]

Each (length, attention) runs in a fresh Python process (`--worker`), so its peak resident
set (ru_maxrss: what the step cost the host, imports included) is its own. The model is the
tiny decoder preset widened to --d-model (heads of 32, two query heads per key/value head,
d_ff 4 x d_model), one row of `length` tokens, trained by `train.step` (AdamW, no remat).
A configuration whose compiled program XLA estimates above --max-gib (`memory_analysis`:
arguments, outputs, temporaries) is compiled but not run: on a shared machine a step that
needs more than it has would take the others down with it; its row gives the estimate.
`seconds` is the median of --iters steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

COLUMNS = ("attention", "seq_len", "status", "peak_rss_gib", "program_gib", "step_s",
           "tokens_per_s", "compile_s")


def model(d_model: int, layers: int, seq_len: int, attention: str, block: int):
    import zoo

    return zoo.preset("tiny-decoder", d_model=d_model, num_heads=d_model // 32, num_kv_heads=d_model // 64,
                      d_ff=4 * d_model, num_layers=layers, max_len=seq_len, attention=attention,
                      attention_block=block)


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: compile, and run unless over the estimate."""
    from bench import model_bench, timing

    cfg = model(job["d_model"], job["layers"], job["seq_len"], job["attention"], job["block"])
    one, compiled, compile_s = model_bench.train_runner(cfg, 1, job["seq_len"])
    program = timing.program_bytes(compiled)
    row = {"attention": job["attention"], "seq_len": job["seq_len"], "d_model": job["d_model"],
           "layers": job["layers"], "block": job["block"], "compile_s": compile_s,
           "program_gib": None if program is None else program / 2 ** 30}
    if program is not None and program > job["max_gib"] * 2 ** 30:
        return {**row, "status": f"not run (over {job['max_gib']} GiB)",
                "peak_rss_gib": _rss_gib()}
    seconds = timing.median_time(one, iters=job["iters"], warmup=1)
    return {**row, "status": "ran", "step_s": seconds, "tokens_per_s": job["seq_len"] / seconds,
            "peak_rss_gib": _rss_gib()}


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """`worker(job)` in a fresh process; its last stdout line is the row."""
    done = subprocess.run([sys.executable, "-m", "bench.long_context", "--worker", json.dumps(job)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {**job, "status": f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench long", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,32768,65536")
    p.add_argument("--impls", default="xla,blockwise", help="Config.attention values, comma-separated")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--block", type=int, default=512, help="Config.attention_block")
    p.add_argument("--max-gib", type=float, default=6.0, help="run only programs XLA estimates below this")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from bench import __main__ as bench_cli

    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for impl in args.impls.split(","):
            job = {"seq_len": length, "attention": impl, "d_model": args.d_model, "layers": args.layers,
                   "block": args.block, "max_gib": args.max_gib, "iters": args.iters}
            rows.append(run_one(job))
            print(bench_cli.table(rows[-1:], COLUMNS), flush=True)
    print(bench_cli.table(rows, COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
