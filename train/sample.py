"""`python -m train sample --run DIR --prompt "..."`: text from a trained run.

Reads what `python -m train` leaves in its run dir: `config.json` (the resolved model
Config), `tokenizer.model` and the latest checkpoint under `checkpoints/` (only its params
are restored). Prompts are framed as in training: a decoder prompt starts with BOS when the
tokenizer has one; an encdec source ends with EOS.

    python -m train sample --run runs/main --prompt "def add(a, b):" --max-new-tokens 40
    python -m train sample --run runs/main --prompt "..." --temperature 0.8 --top-p 0.95 --seed 1
    python -m train sample --run runs/main --prompt "..." --num-beams 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import zoo
from train.tokens import Tokenizer, load_tokenizer

NUM_SENTINELS = 100  # what train.loop gives encdec tokenizers (T5's <extra_id_0..99>)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run dir of `python -m train` (--run-dir)")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text (encdec: the source); repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, help="sample (default: greedy)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the nucleus of mass p")
    p.add_argument("--seed", type=int, help="sampling seed (implies sampling)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--cache-dtype", choices=("int8",), help="int8 KV cache")
    p.add_argument("--cache-window", type=int,
                   help="stream past the context: keep only this many recent tokens (zoo.streaming)")
    p.add_argument("--sink-tokens", type=int, help="with --cache-window: also keep the first N tokens")
    return p


def load_run(run_dir: str | Path, step: int | None = None) -> tuple[zoo.Config, dict[str, Any], Tokenizer, int]:
    """(Config, params, tokenizer, step) of a run dir; FileNotFoundError names what is missing."""
    run_dir = Path(run_dir)
    config, tok_path = run_dir / "config.json", run_dir / "tokenizer.model"
    for path in (config, tok_path):
        if not path.is_file():
            raise FileNotFoundError(f"--run {run_dir}: no {path.name}; is it a `python -m train` run dir?")
    cfg = zoo.Config.from_json(config.read_text())
    tok = load_tokenizer(tok_path, NUM_SENTINELS if cfg.family == "encdec" else 0)
    params, step = restore_params(run_dir / "checkpoints", cfg, step)
    return cfg, params, tok, step


def restore_params(directory: Path, cfg: zoo.Config, step: int | None = None) -> tuple[dict[str, Any], int]:
    """The params of checkpoint `step` (default: the latest) onto one device; the optimizer
    state stays on disk."""
    if not directory.is_dir():
        raise FileNotFoundError(f"--run: no checkpoints in {directory}")
    manager = ocp.CheckpointManager(directory.absolute())
    steps = list(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"--run: no checkpoint saved yet in {directory}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ValueError(f"--step: no checkpoint {step} in {directory}; have {sorted(steps)}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda key: zoo.init(cfg, key), jax.random.key(0))
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)}
    restore = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    out = manager.restore(step, args=ocp.args.Composite(state=restore))
    manager.close()
    return out["state"]["params"], step


def encode_prompts(tok: Tokenizer, cfg: zoo.Config, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [B, T] and mask [B, T], framed as the training data frames text."""
    rows = []
    for ids in tok.encode(prompts):
        if cfg.family == "encdec":
            ids = ids + [tok.vocab.eos_id]
        elif tok.vocab.bos_id is not None:
            ids = [tok.vocab.bos_id] + ids
        if not ids:
            raise ValueError("--prompt: an empty prompt needs a tokenizer with a BOS token")
        rows.append(ids)
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), cfg.pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    return tokens, mask


def completions(tok: Tokenizer, cfg: zoo.Config, new: np.ndarray) -> list[str]:
    """Text of each row of new tokens, up to (not including) its EOS."""
    out = []
    for row in new.tolist():
        if cfg.eos_id is not None and cfg.eos_id in row:
            row = row[:row.index(cfg.eos_id)]
        out.append(tok.decode(row))
    return out


def sample(args: argparse.Namespace) -> list[str]:
    cfg, params, tok, step = load_run(args.run, args.step)
    tokens, mask = encode_prompts(tok, cfg, args.prompt)
    sampling = any(v is not None for v in (args.temperature, args.top_k, args.top_p, args.seed))
    key = jax.random.key(args.seed or 0) if sampling else None
    new = zoo.generate(params, cfg, jnp.asarray(tokens), args.max_new_tokens, prompt_mask=jnp.asarray(mask),
                       key=key, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       num_beams=args.num_beams, cache_dtype=args.cache_dtype,
                       sink_tokens=args.sink_tokens, cache_window=args.cache_window)
    print(f"{args.run} step {step}: {cfg.family}, {zoo.param_count(cfg) / 1e6:.2f}M params", file=sys.stderr)
    return completions(tok, cfg, np.asarray(new))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: prints each prompt and its completion; exit 0, or 2 on a usage error."""
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        texts = sample(args)
    except (ValueError, FileNotFoundError, zoo.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, text in zip(args.prompt, texts):
        print(f">>> {prompt}\n{text}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
