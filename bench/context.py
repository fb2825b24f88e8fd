"""Context parallelism: per-device bytes of one training step as the `context` mesh axis grows.

    python -m bench context [--seq-len 4096] [--contexts 1,2,4,8] [--impls xla,blockwise]
        [--d-model 128] [--layers 2] [--block 512] [--json out.json]

For each (attention, context size) the training step (`train.make_runner` on a mesh of
`context` devices, nothing else split) of one row of --seq-len tokens is compiled, not run,
and XLA's `memory_analysis` of it gives the bytes one device holds: temporaries
(activations, attention scores, gradients in flight) and arguments (the state, replicated,
and the row). The model is bench/long_context.py's (the tiny decoder widened to --d-model).
On a CPU the devices are fake (`jax_num_cpu_devices`), set here before JAX starts.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

COLUMNS = ("attention", "context", "seq_len", "temp_bytes", "argument_bytes", "temp_vs_context_1")


def measure(attention: str, context: int, seq_len: int, d_model: int, layers: int,
            block: int) -> dict[str, Any]:
    """One row: the compiled step's per-device bytes on a context=`context` mesh."""
    import jax
    import numpy as np

    import train
    import zoo
    from bench.long_context import model
    from train.step import abstract_state

    cfg = model(d_model, layers, seq_len, attention, block)
    mesh = zoo.sharding.make_mesh({"context": context}, jax.devices()[:context])
    hp = train.Hparams(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    row = jax.ShapeDtypeStruct((1, seq_len), np.int32)
    batch = {"inputs": row, "targets": row, "weights": jax.ShapeDtypeStruct((1, seq_len), np.float32)}
    runner = train.make_runner(cfg, hp, mesh, batch)
    abstract = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    state = jax.tree.map(abstract, abstract_state(cfg, hp), runner.state_sh)
    with zoo.sharding.use(mesh, runner.rules):
        compiled = runner._step.lower(state, jax.tree.map(abstract, batch, runner.batch_sh)).compile()
    stats = compiled.memory_analysis()
    return {"attention": attention, "context": context, "seq_len": seq_len,
            "temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench context", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--contexts", default="1,2,4,8")
    p.add_argument("--impls", default="xla,blockwise")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    import jax

    # Fake CPU devices (no effect on accelerators); must come before JAX's backend starts.
    jax.config.update("jax_num_cpu_devices", max(contexts))
    from bench.__main__ import table

    rows = []
    for attention in args.impls.split(","):
        base = None
        for c in contexts:
            r = measure(attention, c, args.seq_len, args.d_model, args.layers, args.block)
            base = base or r["temp_bytes"]  # the first context size's (1 by default)
            r["temp_vs_context_1"] = r["temp_bytes"] / base
            rows.append(r)
            print(table([r], COLUMNS).splitlines()[-1], flush=True)
    print(table(rows, COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
