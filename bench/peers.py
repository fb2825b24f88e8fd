"""The peers, each on zoo's architecture and shapes, each run in a fresh process of its own:
transformers + PyTorch (`hf`: `bench.peer_torch`, a compiled and an eager row) and
transformers 4.57.6's Flax models in their own virtualenv (`hf-flax`: `bench.peer_flax`).

Why processes: a peer that shares a process with JAX shares its thread pools and backend
(the PyTorch trainer ran 25 % slower once JAX's CPU backend had started in its process).
With `--peer-repeats N` every variant runs N times, the order rotated by one each repeat
(A B C, B C A, ...), so a load that drifts over the run falls on each in turn; a row reports
the median, every run's rate, its spread and the positions it ran in. zoo runs after the
peers, in the bench's own process (on a GPU, JAX then takes the memory the peers gave back).
`--peer-process shared` runs the PyTorch peer in the bench's process after JAX's backend has
started and run a program, as the bench did before: the A/B that measures what sharing costs.

The architecture is the transformers class `zoo.save_hf` would write for the config (its
exact config: `zoo.hf`), so a Llama-layout preset runs LlamaForCausalLM, BART runs
BartForConditionalGeneration, flan-t5 the gated T5 v1.1. Before timing, each worker counts
its model's parameters; a count that differs from zoo's (`expected_params`) is an error
naming both, and no row is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import zoo
from zoo.hf import Unsupported, _choose
from zoo.model import spec
from zoo.nn import param as P

# The rows each --vs value writes: (peer, compiled); the first is the peer's main row.
VARIANTS = {"hf": (("hf", True), ("hf", False)), "hf-flax": (("hf-flax", True),)}
ROOT = Path(__file__).resolve().parents[1]


def hf_config(cfg: zoo.Config) -> dict[str, Any]:
    """The transformers config (with model_type) that holds exactly zoo's `cfg`."""
    try:
        return _choose(cfg, None)[1]
    except Unsupported as e:
        raise ValueError(f"--vs: no transformers architecture holds this config ({e})") from None


def expected_params(cfg: zoo.Config, bench: str) -> int:
    """zoo's parameters that the bench's program uses: no pooler (none of the benches runs
    it); for encode, the hidden states only (no MLM transform or vocabulary head either)."""
    skip = ("pooler", "mlm", "head") if bench == "encode" else ("pooler",)
    return sum(P.count(v, None) for k, v in spec(cfg).items() if k not in skip)


def job(peer: str, compiled: bool, args: argparse.Namespace, cfg: zoo.Config) -> dict[str, Any]:
    """What a worker needs, as JSON: nothing of zoo's objects crosses the process boundary."""
    return {"peer": peer, "compiled": compiled, "bench": args.bench, "family": cfg.family,
            "hf_config": hf_config(cfg), "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "iters": args.iters,
            "expect_params": expected_params(cfg, args.bench),
            "process": "shared" if peer == "hf" and getattr(args, "peer_process", "fresh") == "shared" else "fresh"}


def label(j: dict[str, Any]) -> str:
    return f"{j['peer']}:{'compiled' if j['compiled'] else 'eager'}"


def run_job(j: dict[str, Any]) -> dict[str, Any]:
    """One run of one variant, in a fresh process (`--peer-process shared`: PyTorch in this
    one); its row (bench.peer_torch / bench.peer_flax)."""
    if j["peer"] == "hf-flax":
        from bench import peer_flax
        return peer_flax.run(j)
    if j["process"] == "shared":
        return _in_this_process(j)
    done = subprocess.run([sys.executable, "-m", "bench.peer_torch", json.dumps(j)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"--vs hf: the PyTorch peer ({label(j)}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_this_process(j: dict[str, Any]) -> dict[str, Any]:
    """The PyTorch peer in the bench's process, JAX's backend started and a program run first."""
    import jax
    import jax.numpy as jnp

    from bench import peer_torch
    jax.block_until_ready(jax.jit(lambda x: x @ x)(jnp.ones((256, 256))))
    return peer_torch.run(j)


def check(j: dict[str, Any], got: dict[str, Any]) -> None:
    """Refuses a row that is not zoo's model or did not make every token."""
    if got.get("params") is not None and got["params"] != j["expect_params"]:
        raise ValueError(f"--vs {j['peer']}: the peer's {got.get('architecture')} has {got['params']:,} "
                         f"parameters, zoo's {j['bench']} model {j['expect_params']:,}: not the same "
                         f"model, no row written")
    made = got.get("generated_tokens")
    if made is not None and made != j["new_tokens"]:
        raise ValueError(f"--vs {j['peer']}: the peer generated {made} tokens, not --new-tokens "
                         f"{j['new_tokens']}: its rate would not compare")


def rotation(n: int, repeat: int) -> list[int]:
    """The run order of n variants in repeat `repeat`: 0..n-1 rotated left by `repeat`."""
    return [(i + repeat) % n for i in range(n)]


def run(args: argparse.Namespace, cfg: zoo.Config) -> list[dict[str, Any]]:
    """peer_detail of each variant of args.vs, in VARIANTS order (see the module docstring)."""
    jobs = [job(peer, compiled, args, cfg) for vs in args.vs for peer, compiled in VARIANTS[vs]]
    repeats = max(1, getattr(args, "peer_repeats", 1))
    runs: list[list[dict[str, Any]]] = [[] for _ in jobs]
    sequence = []
    for r in range(repeats):
        for position, i in enumerate(rotation(len(jobs), r)):
            got = run_job(jobs[i])
            check(jobs[i], got)
            runs[i].append({**got, "position": position + 1})
            sequence.append(label(jobs[i]))
    return [summary(j, rs, sequence) for j, rs in zip(jobs, runs)]


def summary(j: dict[str, Any], rs: list[dict[str, Any]], sequence: list[str]) -> dict[str, Any]:
    """The first run's fields with tokens_per_s and step_s the medians over runs, and how
    they ran: every run's rate, its position in each repeat, the whole run sequence."""
    rates = [r.get("tokens_per_s") for r in rs]
    ok = [x for x in rates if x]
    median = statistics.median(ok) if len(ok) == len(rates) else None
    detail = {k: v for k, v in rs[0].items() if k != "position"}
    if median and "step_s" in detail:  # the run-median step too, as tokens_per_s
        detail["step_s"] = statistics.median(r["step_s"] for r in rs)
    process = "fresh subprocess per run" if j["process"] == "fresh" else "the bench's process, after JAX"
    detail.update(peer=j["peer"], tokens_per_s=median, compiled=j["compiled"], process=process,
                  runs=rates, order=[r["position"] for r in rs], run_sequence=sequence + ["zoo"],
                  spread=(max(ok) - min(ok)) / median if median and len(ok) > 1 else None)
    return detail
