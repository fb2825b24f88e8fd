"""Quantized inference (`zoo.quantize`): speed and quality.

`python -m bench decode --quant 8 --quant 4` adds, to the fp32 decode row, rows for bf16,
int8 and int4 weights at batch 1 (`decode_rows`, timed in alternation with fp32), each with
its bandwidth bound: the bytes of the weights one token reads, divided into the streaming
bandwidth of the same run.

`python -m bench quant [--steps 300] [--json out.json]` measures quality (`quality`): a
small byte-level decoder trained here on tinyshakespeare, then the held-out loss of its
fp32, int8 and int4 weights and how often greedy decoding agrees with the fp32 model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zoo
from bench import model_bench, timing
from zoo.nn.quant import DEFAULT_GROUP
from train.optim import Hparams
from train.step import batch_shardings, create_state, jit_step


def decode_rows(cfg: zoo.Config, prompt_len: int, new_tokens: int, bandwidth: float, iters: int,
                bits: list[int]) -> list[dict[str, Any]]:
    """Rows for bf16 weights and each of `bits` (int8 per channel, int4 in groups of
    `zoo.nn.quant.DEFAULT_GROUP[4]`, 128), quantized from the fp32 tree, timed in alternation with
    the fp32 weights: `iters` rounds, each one call of every variant in a rotated order, so
    a machine whose speed drifts (a shared VM) slows all of them alike. tokens_per_s: over
    the median call; vs_fp32: the median over rounds of the fp32 call's time over this one's
    (fp32_row keeps its own separate measurement); int4's vs_int8 likewise against int8."""
    half = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    variants = [("float32", cfg, None), ("bfloat16", half, None)]
    variants += [(f"int{b}", cfg, lambda p, b=b: zoo.quantize(p, cfg, bits=b)) for b in bits]
    runners = [model_bench.decode_runner(c, prompt_len, new_tokens, transform=t) for _, c, t in variants]
    seconds: list[list[float]] = [[] for _ in variants]
    for r in range(max(iters, 1)):
        order = list(range(len(variants)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            start = timing.time.perf_counter()
            timing.block(runners[i].run())
            seconds[i].append(timing.time.perf_counter() - start)
    paired = lambda a, b: statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))
    names = [name for name, _, _ in variants]
    rows = []
    for i, (name, runner) in enumerate(zip(names, runners)):
        if i == 0:
            continue
        row = model_bench.decode_result(runner, statistics.median(seconds[i]), bandwidth)
        row = {**row, "dtype": name, "vs_fp32": paired(0, i),
               "fp32_paired_tokens_per_s": new_tokens / statistics.median(seconds[0])}
        if name == "int4" and "int8" in names:
            row["vs_int8"] = paired(names.index("int8"), i)
        rows.append(row)
    return rows


# --- quality ------------------------------------------------------------------------------
def byte_tokens(text: str) -> np.ndarray:
    """Bytes as ids 3..258 (0 pad, 1 eos, 2 unused)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + 3


def quality_config() -> zoo.Config:
    """A Llama-layout byte decoder, 4 layers of width 128 (every dim a multiple of 64)."""
    return zoo.preset("tiny-decoder", vocab_size=260, d_model=128, num_layers=4, num_heads=4,
                      num_kv_heads=4, d_ff=384, max_len=256)


def train(cfg: zoo.Config, ids: np.ndarray, steps: int, batch: int = 16, seq: int = 128,
          seed: int = 0) -> dict:
    """`train.step` (AdamW, the library's step) on random windows of ids -> fp32 params."""
    mesh = zoo.sharding.make_mesh({"data": 1}, jax.devices()[:1])
    hp = Hparams(total_steps=steps, learning_rate=3e-3, warmup_steps=steps // 10)
    state = create_state(cfg, hp, seed, mesh)
    rng = np.random.default_rng(seed)
    ones = np.ones((batch, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()

    def window_batch() -> dict[str, np.ndarray]:
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        rows = np.stack([ids[s:s + seq + 1] for s in starts])
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "weights": ones.astype(np.float32),
                "segment_ids": ones, "positions": positions}

    first = window_batch()
    bsh = batch_shardings(first, mesh)
    step = jit_step(jax.tree.map(lambda x: x.sharding, state), bsh, mesh)
    with zoo.sharding.use(mesh):
        for i in range(steps):
            state, metrics = step(state, jax.device_put(first if i == 0 else window_batch(), bsh))
    print(f"trained {steps} steps, last training loss {float(metrics['loss']):.3f}", flush=True)
    return jax.device_get(state.params)


def held_out_loss(params: dict, cfg: zoo.Config, ids: np.ndarray, seq: int = 128) -> float:
    """Mean next-byte cross entropy over consecutive windows of ids."""
    n = (len(ids) - 1) // seq
    x = jnp.asarray(ids[:n * seq].reshape(n, seq))
    y = jnp.asarray(ids[1:n * seq + 1].reshape(n, seq))
    loss = jax.jit(lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
        zoo.forward(p, cfg, x).logits.astype(jnp.float32), y).mean())
    return float(loss(params, x, y))


def greedy_agreement(params: dict, ref: jax.Array, cfg: zoo.Config, prompts: jax.Array,
                     new_tokens: int) -> tuple[float, float]:
    """(share of the generated positions equal to ref's, mean length of the identical
    prefix as a share of new_tokens)."""
    got = np.stack([np.asarray(zoo.generate(params, cfg, p[None], max_new_tokens=new_tokens,
                                            stop_tokens=()))[0] for p in prompts])
    ref = np.asarray(ref)
    same = got == ref
    prefix = np.where(same.all(1), new_tokens, np.argmin(same, axis=1))
    return float(same.mean()), float(prefix.mean() / new_tokens)


def quality(steps: int = 300, prompts: int = 8, prompt_len: int = 32, new_tokens: int = 32,
            data_dir: str | None = None) -> list[dict[str, Any]]:
    """Rows for fp32, int8 per channel and int4 in groups of the default size, 64 and 32:
    held-out loss, its drift from fp32 and greedy agreement with the fp32 model on held-out
    prompts."""
    root = Path(data_dir or os.environ.get("ZOO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    ids = byte_tokens((root / "tinyshakespeare.txt").read_text())
    cut = int(len(ids) * 0.9)
    cfg = quality_config()
    params = train(cfg, ids[:cut], steps)
    test = ids[cut:]
    starts = np.linspace(0, len(test) - prompt_len - 1, prompts).astype(int)
    prompt_rows = jnp.asarray(np.stack([test[s:s + prompt_len] for s in starts]))
    ref = np.stack([np.asarray(zoo.generate(params, cfg, p[None], max_new_tokens=new_tokens,
                                            stop_tokens=()))[0] for p in prompt_rows])
    base = held_out_loss(params, cfg, test)
    rows = [{"weights": "fp32", "held_out_loss": base, "drift": 0.0, "greedy_agreement": 1.0,
             "identical_prefix": 1.0}]
    for bits, group in ((8, None), (4, None), (4, 64), (4, 32)):
        qp = zoo.quantize(params, cfg, bits=bits, group_size=group)
        loss = held_out_loss(qp, cfg, test)
        agree, prefix = greedy_agreement(qp, ref, cfg, prompt_rows, new_tokens)
        group = group or DEFAULT_GROUP[bits]
        rows.append({"weights": f"int{bits}" + (f", groups of {group}" if group else ", per channel"),
                     "bits": bits, "group_size": group, "held_out_loss": loss, "drift": loss / base - 1.0,
                     "greedy_agreement": agree, "identical_prefix": prefix})
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps of the byte decoder")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    rows = quality(args.steps)
    print("| weights | held-out loss | drift | greedy agreement | identical prefix |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['held_out_loss']:.4f} | {100 * r['drift']:+.2f} % | "
              f"{100 * r['greedy_agreement']:.1f} % | {100 * r['identical_prefix']:.1f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
