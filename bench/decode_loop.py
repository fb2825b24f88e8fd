"""How often the greedy decoding loop should test "all rows done" (`zoo.generate`'s
`_STEPS_PER_CHECK`): batch-1 tokens/s for several values, interleaved in one process.

    python -m bench.decode_loop [--preset NAME] [--dtype bfloat16] [--steps 1 8 16]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from bench.__main__ import SMALL
from zoo.decoding import unstacked


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.decode_loop")
    p.add_argument("--preset", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    base = zoo.preset(args.preset) if args.preset else zoo.preset("gpt2", **SMALL)
    cfg = base.replace(dtype=args.dtype, param_dtype=args.dtype)
    params = unstacked(zoo.init(cfg, jax.random.key(0)))
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, args.prompt_len)),
                         jnp.int32)
    generate_module = importlib.import_module("zoo.generate")  # `zoo.generate` is the function
    runs = {}
    for k in dict.fromkeys(args.steps):  # one compiled program per value (the constant is read at trace time)
        generate_module._STEPS_PER_CHECK = k
        generate_module._run.clear_cache()
        fn = jax.jit(lambda p, t: generate_module.generate(p, cfg, t, args.new_tokens, stop_tokens=()))
        fn(params, prompt).block_until_ready()
        runs[k] = fn
    seconds: dict[int, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, fn in runs.items():
            start = time.perf_counter()
            fn(params, prompt).block_until_ready()
            seconds[k].append(time.perf_counter() - start)
    print(f"device: {jax.devices()[0].device_kind}  {args.preset or 'default'} {args.dtype}")
    print("| steps per check | tokens/s | ms per token |")
    print("|---|---|---|")
    for k, ts in seconds.items():
        t = statistics.median(ts)
        print(f"| {k} | {args.new_tokens / t:,.0f} | {1e3 * t / args.new_tokens:.3f} |")


if __name__ == "__main__":
    main()
