"""Where the time goes: a `jax.profiler` trace of a few train steps, decode calls or
encoder forwards, summed per kernel (GPU) or XLA op (CPU).

    python -m bench.profile train|decode|encode [--preset NAME] [--dtype bfloat16] [--batch-size 8]
        [--seq-len 2048] [--remat minimal] [--loss-chunk 512] [--calls 3] [--top 25] [--quant 8|4]

Prints the wall time per call, the device's busy time (kernel durations summed), the
number of kernels per call, and the kernels taking the most time (names with their
numeric suffix dropped, so the 16 layers' copies of one fusion add up).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from bench import model_bench
from bench import __main__ as bench_cli
from train.hostmem import restart_with_huge_pages
from zoo.decoding import unstacked

# Host-side events of the runtime (not XLA ops) in a CPU trace.
_HOST_NOISE = ("$", "Thunk", "end:", "PjRt", "pjrt", "Pjit", "pjit", "Execute", "Common",
               "DevicePut", "ParseArguments")
_ENCLOSING = ("while", "call", "conditional")  # CPU ops that contain other ops


def device_events(trace_dir: str) -> list[dict[str, Any]]:
    """Complete events of the device's kernels (GPU/TPU), or of the XLA ops on a CPU."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name}
    complete = [e for e in events if e.get("ph") == "X"]
    if devices:
        return [e for e in complete if e["pid"] in devices]
    return [e for e in complete if not e["name"].startswith(_HOST_NOISE)
            and re.sub(r"[._]\d+$", "", e["name"]) not in _ENCLOSING]


def profile(fn: Callable[[], Any], calls: int, top: int) -> dict[str, Any]:
    jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn())
            wall = (time.perf_counter() - start) / calls
        events = device_events(d)
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        key = re.sub(r"[._]\d+$", "", e["name"])
        total[key] += e.get("dur", 0)
        count[key] += 1
    busy = sum(total.values()) / calls / 1e6
    print(f"wall {wall * 1e3:.3f} ms per call (traced), device busy {busy * 1e3:.3f} ms "
          f"({busy / wall:.0%}), {len(events) / calls:.0f} kernels per call")
    print("| ms per call | share | kernels per call | kernel |")
    print("|---|---|---|---|")
    for name, us in total.most_common(top):
        print(f"| {us / calls / 1e3:.3f} | {us / calls / 1e6 / busy:.1%} | {count[name] / calls:.0f} "
              f"| {name[:90]} |")
    return {"wall_s": wall, "busy_s": busy, "kernels": len(events) / calls,
            "top": [(n, us / calls / 1e6, count[n] / calls) for n, us in total.most_common(top)]}


def main(argv: list[str] | None = None) -> None:
    p = bench_cli.parser()  # the bench's own flags and shapes; --vs is ignored here
    p.prog = "python -m bench.profile"
    p.add_argument("--calls", type=int, default=3, help="traced calls")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    args = p.parse_args(argv)
    if args.family is None:
        args.family = "encoder" if args.bench == "encode" else "decoder"
    cfg = bench_cli.model_config(args)
    if args.bench == "train":
        fn, _, _ = model_bench.train_runner(cfg, args.batch_size, args.seq_len, args.remat, args.loss_chunk)
    elif args.bench == "encode":
        fn, _, _, _ = model_bench.encode_runner(cfg, args.batch_size, args.seq_len)
    else:
        params = zoo.init(cfg, jax.random.key(0))
        if args.quant:  # --quant 8 or 4: the weights zoo.quantize gives (the first --quant given)
            params = zoo.quantize(params, cfg, bits=args.quant[0])
        params = unstacked(params)
        prompt = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, args.prompt_len)),
                             jnp.int32)
        fn = lambda: zoo.generate(params, cfg, prompt, max_new_tokens=args.new_tokens, stop_tokens=())
    print(f"device: {jax.devices()[0].device_kind}  {args.bench} {args.preset or 'default'} {args.dtype}")
    result = profile(fn, args.calls, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=1, default=str)


if __name__ == "__main__":
    restart_with_huge_pages()  # as `python -m bench` runs (train/hostmem.py)
    main()
