"""Mixture of experts: what the sparse dispatch costs against the number of experts, and
what it buys a training decoder.

    python -m bench moe [--d-model 512] [--d-ff 2048] [--batch-size 8] [--seq-len 256]
        [--experts 4,32] [--top-k 2] [--kernels auto] [--layers 8] [--vocab 32000]
        [--no-train] [--iters 5] [--json out.json]
    python -m bench moe --expert-parallel 1,2,4,8 [--json out.json]

layer rows: one MoE layer (`zoo.nn.moe.apply_moe`, SwiGLU experts of width --d-ff) forward
+ backward on a [batch, seq_len, d_model] input, for each expert count at the same width
and top-k, sparse (each --kernels grouped matmul; auto: `zoo.nn.backend`'s choice for this
device) and dense (every expert on every token); `vs_fewest` is the time over the same
dispatch's time at the fewest experts (the issue's target: 32 experts at top-2 within 1.5x
of 4).

train rows: `python -m bench train`'s decoder (GPT-2 layout, by default at its width 512,
d_ff 2048, 8 layers, vocabulary 32000) with a Mixtral-style MoE of 8 SwiGLU experts, top-2,
in every layer, trained by `train.step`
(AdamW) with the sparse and with the dense dispatch in the same run: tokens/s and MFU
(active FLOPs only, `zoo.flops`).

expert-parallel rows (`--expert-parallel`, instead of the others): the training step of a
small Mixtral-style decoder (8 experts top-2 in each of 2 layers, width 256, experts of width
1024, 16 x 128 tokens) on a mesh of `expert=N` devices (the batch split over them too),
compiled and not run, for each `Config.expert_parallel`: XLA's per-device bytes
(`memory_analysis`: temporaries; arguments, the state and the batch) and the bytes of the
step's all-gathers and all-to-alls per device (result shapes in the compiled HLO). The JSON
also has `xla_flops` (`cost_analysis`), which counts a loop's body once: the tile kernel's
scan over the experts' rows hardly shows in it. On a CPU the devices are fake
(`jax_num_cpu_devices`, set here before JAX starts): the figures are the compiler's, not
timings.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import jax
import jax.numpy as jnp

import zoo
from bench import hardware, model_bench, timing
from bench import __main__ as bench_cli
from train.hostmem import restart_with_huge_pages
from zoo.nn import backend, moe
from zoo.nn.param import materialize


def layer_config(d_model: int, d_ff: int, experts: int, top_k: int, dispatch: str, kernel: str) -> zoo.Config:
    """A Mixtral-style MoE layer's config (SwiGLU experts, softmax top-k, renormalised)."""
    cfg = zoo.preset("tiny-moe", d_model=d_model, num_heads=max(1, d_model // 64), num_kv_heads=None,
                     d_ff=d_ff, num_experts=experts, experts_per_token=top_k, moe_dispatch=dispatch,
                     grouped_matmul=kernel)
    return backend.resolve(cfg)


def layer_row(cfg: zoo.Config, batch: int, seq_len: int, iters: int) -> dict[str, Any]:
    """Median seconds of one jitted forward + backward of the layer (weights and input)."""
    params = materialize(moe.moe_spec(cfg), jax.random.key(0), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (batch, seq_len, cfg.d_model))
    probe = jax.random.normal(jax.random.key(2), x.shape)

    def loss(p: dict, x: jax.Array) -> jax.Array:
        y, aux = moe.apply_moe(p, x, cfg)
        return jnp.sum(y * probe) + aux

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled, compile_s = timing.compile_seconds(step, params, x)
    seconds = timing.median_time(lambda: compiled(params, x), iters=iters)
    return {"bench": "moe_layer", "experts": cfg.num_experts, "top_k": cfg.experts_per_token,
            "dispatch": cfg.moe_dispatch, "kernel": cfg.grouped_matmul if cfg.moe_dispatch == "sparse" else "-",
            "d_model": cfg.d_model, "d_ff": cfg.d_ff, "tokens": batch * seq_len, "seconds": seconds,
            "compile_s": compile_s, "tokens_per_s": batch * seq_len / seconds}


def layer_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (dispatch and kernel, expert count), with vs_fewest per dispatch and kernel."""
    experts = sorted(int(e) for e in args.experts.split(","))
    variants = [("sparse", k) for k in args.kernels.split(",")] + [("dense", "auto")]
    rows = []
    for dispatch, kernel in variants:
        group = [layer_row(layer_config(args.d_model, args.d_ff, e, args.top_k, dispatch, kernel),
                           args.batch_size, args.seq_len, args.iters) for e in experts]
        rows += [{**r, "vs_fewest": r["seconds"] / group[0]["seconds"]} for r in group]
    return rows


def train_rows(args: argparse.Namespace, peak: float) -> list[dict[str, Any]]:
    """The bench decoder with 8 experts top-2 in every layer, sparse then dense."""
    base = zoo.preset("gpt2", **bench_cli.SMALL).replace(
        activation="swiglu", num_experts=8, experts_per_token=2, d_model=args.d_model, d_ff=args.d_ff,
        num_heads=max(1, args.d_model // 64), vocab_size=args.vocab, num_layers=args.layers)
    rows = []
    for dispatch in ("sparse", "dense"):
        cfg = backend.resolve(base.replace(moe_dispatch=dispatch))
        row = model_bench.train_row(cfg, args.batch_size, args.seq_len, peak, args.iters)
        rows.append({**row, "bench": "moe_train", "experts": 8, "top_k": 2, "dispatch": dispatch,
                     "kernel": cfg.grouped_matmul if dispatch == "sparse" else "-"})
    return rows


def collective_shapes(hlo: str, op: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each result of every `op` ("all-gather", "all-to-all", ...) in a
    compiled module's HLO text (`compiled.as_text()`)."""
    out = []
    for line in hlo.splitlines():
        head, found, _ = line.partition(f" {op}(")
        if found and "=" in head:
            result = head.split("=", 1)[1]
            out += [(t, tuple(int(d) for d in dims.split(",") if d))
                    for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", result)]
    return out


_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1,
          "u8": 1, "pred": 1}


def collective_bytes(hlo: str, op: str) -> int:
    """Bytes of every `op` result in the HLO text (`collective_shapes`)."""
    total = 0
    for dtype, shape in collective_shapes(hlo, op):
        size = _BYTES[dtype]
        for d in shape:
            size *= d
        total += size
    return total


def parallel_config(mode: str) -> zoo.Config:
    """The expert-parallel rows' model: a Mixtral-style decoder, 8 experts top-2 in every layer."""
    return zoo.preset("tiny-moe", d_model=256, num_heads=4, num_kv_heads=2, d_ff=1024, num_layers=2,
                      num_experts=8, experts_per_token=2, vocab_size=1024, max_len=128,
                      expert_parallel=mode)


def parallel_row(mode: str, devices: int, batch: int = 16, seq_len: int = 128) -> dict[str, Any]:
    """The compiled training step's per-device figures on a mesh of `expert=devices`."""
    import numpy as np

    import train
    from train.step import abstract_state

    cfg = parallel_config(mode)
    hp = train.Hparams(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    mesh = zoo.sharding.make_mesh({"expert": devices}, jax.devices()[:devices])
    rows = jax.ShapeDtypeStruct((batch, seq_len), np.int32)
    batch_like = {"inputs": rows, "targets": rows, "weights": jax.ShapeDtypeStruct(rows.shape, np.float32)}
    runner = train.make_runner(cfg, hp, mesh, batch_like)
    abstract = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    state = jax.tree.map(abstract, abstract_state(cfg, hp), runner.state_sh)
    with zoo.sharding.use(mesh, runner.rules):
        compiled = runner._step.lower(state, jax.tree.map(abstract, batch_like, runner.batch_sh)).compile()
    memory, hlo = compiled.memory_analysis(), compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"bench": "moe_expert_parallel", "expert_parallel": mode, "expert": devices,
            "tokens": batch * seq_len, "xla_flops": float(cost.get("flops", 0.0)),
            "temp_bytes": int(memory.temp_size_in_bytes), "argument_bytes": int(memory.argument_size_in_bytes),
            "all_gather_bytes": collective_bytes(hlo, "all-gather"),
            "all_to_all_bytes": collective_bytes(hlo, "all-to-all")}


def parallel_rows(sizes: list[int]) -> list[dict[str, Any]]:
    """Each Config.expert_parallel at each expert-axis size; temp_vs_1: temporaries over the
    same mode's at the first size."""
    rows = []
    for mode in ("all_to_all", "gather"):
        group = [parallel_row(mode, n) for n in sizes]
        rows += [{**r, "temp_vs_1": r["temp_bytes"] / group[0]["temp_bytes"]} for r in group]
    return rows


PARALLEL_COLUMNS = ("expert_parallel", "expert", "temp_bytes", "temp_vs_1", "argument_bytes", "all_gather_bytes",
                    "all_to_all_bytes")
COLUMNS = ("bench", "experts", "top_k", "dispatch", "kernel", "tokens", "seconds", "vs_fewest",
           "tokens_per_s", "mfu", "compile_s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench moe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048, help="the width of one expert")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--experts", default="4,32", help="expert counts of the layer rows")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--kernels", default="auto", help="grouped matmuls of the sparse layer rows: "
                                                    "auto, ragged, tiles (comma-separated)")
    p.add_argument("--layers", type=int, default=8, help="train rows: the depth")
    p.add_argument("--vocab", type=int, default=32000, help="train rows: the vocabulary")
    p.add_argument("--no-train", action="store_true", help="only the layer rows")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--expert-parallel", default=None, metavar="SIZES",
                   help="only the expert-parallel rows, at these expert-axis sizes (e.g. 1,2,4,8)")
    p.add_argument("--json", default=None, help="write the rows here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.expert_parallel:
        sizes = [int(n) for n in args.expert_parallel.split(",")]
        jax.config.update("jax_num_cpu_devices", max(sizes))  # fake CPU devices; before JAX starts
        rows = parallel_rows(sizes)
        print(bench_cli.table(rows, PARALLEL_COLUMNS))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2, default=str)
        return 0
    peak = hardware.matmul_peak("float32")
    common = {"device": hardware.device_description(), "jax": jax.__version__, "peak_tflops": peak / 1e12}
    rows = layer_rows(args) + ([] if args.no_train else train_rows(args, peak))
    rows = [{**common, **r} for r in rows]
    print(f"device: {common['device']}  jax {common['jax']}  matmul peak {common['peak_tflops']:.2f} TFLOP/s")
    print(bench_cli.table(rows, COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    raise SystemExit(main())
