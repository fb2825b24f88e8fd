"""Per-token loss of a trained decoder far past its window: attention sinks vs window-only vs
full attention (`zoo.streaming`, StreamingLLM's figure 3 on a small model).

    python -m bench.streaming --run runs/streaming --text heldout.txt --length 1024 \\
        --sinks 4 --window 60 --json bench/results/cpu_streaming.json --plot bench/results/cpu_streaming.png

Each of --rows stretches of --length tokens of the text is fed through three models of the
same run, teacher-forced, one token at a time past the cache: "sinks" keeps the first
--sinks tokens and the last --window; "window" keeps the last sinks + window (the same
memory, no sinks); "full" attends to everything (past the run's training length its RoPE
positions were never seen). Writes the mean loss at each position (over the rows), the mean
over position ranges, and a plot of the curves smoothed over --smooth positions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from train.sample import load_run
from zoo.streaming import token_losses


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a `python -m train` run dir (a decoder)")
    p.add_argument("--text", required=True, help="a text file, longer than --rows x --length tokens")
    p.add_argument("--length", type=int, default=1024, help="tokens per stretch")
    p.add_argument("--rows", type=int, default=4, help="stretches averaged")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=60, help="recent tokens kept beside the sinks")
    p.add_argument("--smooth", type=int, default=32, help="moving-average width of the plot")
    p.add_argument("--json", required=True, help="output JSON")
    p.add_argument("--plot", help="output PNG (needs matplotlib)")
    return p


def stretches(tok, text: str, rows: int, length: int) -> np.ndarray:
    """[rows, length] consecutive tokens from the start of the text. Where the tokenizer has
    a BOS token each stretch starts with it, as the run's documents did in training (and as
    `python -m train sample` prompts do), followed by the next length - 1 tokens."""
    ids = tok.encode([text])[0]
    bos = tok.vocab.bos_id
    body = length - (bos is not None)
    if len(ids) < rows * body:
        raise ValueError(f"--text: {len(ids)} tokens, need {rows * body} (--rows x --length)")
    toks = np.asarray(ids[:rows * body], np.int32).reshape(rows, body)
    return toks if bos is None else np.concatenate([np.full((rows, 1), bos, np.int32), toks], axis=1)


def curves(params: dict, cfg, toks: np.ndarray, sinks: int, window: int) -> dict[str, np.ndarray]:
    """Mean loss at each predicted position [length - 1] per method."""
    runs = {"sinks": dict(sink_tokens=sinks, cache_window=window),
            "window": dict(cache_window=sinks + window), "full": {}}
    return {name: np.asarray(token_losses(params, cfg, toks, **kw)).mean(axis=0) for name, kw in runs.items()}


def summary(losses: dict[str, np.ndarray], bounds: Sequence[int]) -> dict[str, dict[str, float]]:
    """Mean loss of each method over [a, b) for consecutive bounds (predicted positions)."""
    return {name: {f"{a}-{b}": float(c[a:b].mean()) for a, b in zip(bounds, bounds[1:])}
            for name, c in losses.items()}


def plot(losses: dict[str, np.ndarray], width: int, marks: dict[str, int], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    kernel = np.ones(width) / width
    for name, c in losses.items():
        ax.plot(np.arange(width, len(c) + 1), np.convolve(c, kernel, mode="valid"), label=name)
    low, high = ax.get_ylim()
    for i, (label, x) in enumerate(marks.items()):  # labels one under the other
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, high - i * 0.06 * (high - low), f" {label}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("token position")
    ax.set_ylabel(f"loss (nats, mean of {width})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def trained_length(run: Path, default: int) -> int:
    """The run's training sequence length (run.json's seq_len), else `default`."""
    meta = run / "run.json"
    return json.loads(meta.read_text()).get("seq_len", default) if meta.is_file() else default


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg, params, tok, step = load_run(args.run)
    toks = stretches(tok, Path(args.text).read_text(), args.rows, args.length)
    losses = curves(params, cfg, toks, args.sinks, args.window)
    cache = args.sinks + args.window
    trained = trained_length(Path(args.run), cfg.max_len)
    bounds = sorted({0, cache, trained, args.length - 1})
    out = {"run": str(args.run), "step": step, "sinks": args.sinks, "window": args.window,
           "length": args.length, "rows": args.rows, "trained_seq_len": trained,
           "mean_loss": summary(losses, bounds),
           "loss_by_position": {name: [round(float(x), 4) for x in c] for name, c in losses.items()}}
    Path(args.json).write_text(json.dumps(out, indent=1))
    for name, ranges in out["mean_loss"].items():
        print(f"{name:>7}: " + "  ".join(f"[{r}] {v:.3f}" for r, v in ranges.items()))
    if args.plot:
        plot(losses, args.smooth, {"cache": cache, "trained length": trained}, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
