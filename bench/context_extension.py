"""Extending a trained decoder's context (issue 22; the sources' positional interpolation).

    python -m bench.context_extension --out runs/context_extension
    python -m bench.context_extension loss --run RUN --text heldout.txt --length 4096 \\
        [max_len=4096 rope_scaling=yarn rope_scaling_factor=8 rope_original_max_len=512]

The recipe, each step a `python -m train` command (printed, and kept in the JSON):
1. a RoPE decoder (the main job's tiny-decoder shape by default) trained on rows of --short
   tokens of the first (1 - --held-out) of the text (`--seq-len 512 max_len=512`);
2. for each of --methods, its max_len raised --factor times with that RoPE scaling
   (`linear`: position interpolation, position p rotates as p / factor did; `yarn`: the
   fast-turning dims keep their speed, the slow ones are interpolated, cos and sin scaled by
   0.1 ln(factor) + 1; `none`: max_len alone, the control) and fine-tuned briefly on rows of
   factor x short tokens: `python -m train --init-from RUN --seq-len 4096 max_len=4096
   rope_scaling=yarn rope_scaling_factor=8 rope_original_max_len=512 ...` (the short run's
   params, model and tokenizer; a fresh optimizer);
3. the held-out loss by position over --rows stretches of factor x short consecutive tokens of
   the held-out text: the short model as trained (past --short its positions were never
   seen), with each scaling added but not fine-tuned, and each fine-tuned run. Losses are
   teacher-forced (`zoo.streaming.token_losses`, full attention), averaged per bucket of
   --bucket positions; the table gives coarser ranges.

Writes a JSON (default bench/results/cpu_context_extension.json) and a plot of the buckets
(--plot). `loss` scores one run (with model fields changed by KEY=VALUE) the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.streaming import stretches, summary
from train.hostmem import restart_with_huge_pages

METHODS = ("none", "linear", "yarn")
COLORS = {"trained": "C0", "none": "C4", "linear": "C1", "yarn": "C2"}  # one per method in both panels
DATA_DIR = Path(os.environ.get("ZOO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --- the recipe's commands -------------------------------------------------------------------

def split_text(source: Path, out: Path, held_out: float) -> tuple[Path, Path]:
    """out/train.txt (the first 1 - held_out of `source`) and out/heldout.txt (the rest), cut
    at a line break so no line is split."""
    text = source.read_text()
    cut = text.rfind("\n", 0, int(len(text) * (1 - held_out))) + 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(text[:cut])
    (out / "heldout.txt").write_text(text[cut:])
    return out / "train.txt", out / "heldout.txt"


def scaling(method: str, factor: int, short: int) -> dict[str, Any]:
    """The model fields that extend a decoder trained on rows of `short` tokens `factor`
    times with `method` (METHODS)."""
    if method not in METHODS:
        raise ValueError(f"--methods: expected names from {METHODS}, got {method!r}")
    fields: dict[str, Any] = {"max_len": factor * short}
    if method != "none":
        fields.update(rope_scaling=method, rope_scaling_factor=float(factor))
    if method == "yarn":
        fields["rope_original_max_len"] = short  # YaRN's ramp is set by the length trained at
    return fields


def pairs(fields: dict[str, Any]) -> list[str]:
    """Model fields as `python -m train` KEY=VALUE arguments."""
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in fields.items()]


def short_argv(data: Path, run_dir: Path, a: argparse.Namespace) -> list[str]:
    """`python -m train` arguments of the run at --short tokens per row."""
    model = [f"d_model={a.d_model}", f"num_layers={a.layers}", f"num_heads={a.heads}",
             f"num_kv_heads={a.heads}", f"d_ff={4 * a.d_model}", f"max_len={a.short}"]
    return ["--data", str(data), "--run-dir", str(run_dir), "--seq-len", str(a.short),
            "--batch-size", str(a.batch), "--steps", str(a.steps), "--lr", str(a.lr),
            "--vocab-size", str(a.vocab), "--eval-batches", "2", "--mesh", "data=1", *model]


def extend_argv(source: Path, data: Path, run_dir: Path, method: str, a: argparse.Namespace) -> list[str]:
    """`python -m train --init-from SOURCE` arguments that extend it with `method`."""
    long = a.factor * a.short
    return ["--init-from", str(source), "--data", str(data), "--run-dir", str(run_dir),
            "--seq-len", str(long), "--batch-size", str(a.long_batch), "--steps", str(a.long_steps),
            "--lr", str(a.long_lr), "--warmup", str(max(1, a.long_steps // 10)),
            "--eval-every", str(a.long_steps), "--eval-batches", "2", "--mesh", "data=1",
            *pairs(scaling(method, a.factor, a.short))]


# --- loss by position ------------------------------------------------------------------------

def position_losses(params: dict, cfg: Any, tokens: np.ndarray, window: int | None = None) -> np.ndarray:
    """Mean next-token loss (nats) at each position over rows tokens [R, T] -> [T - 1]: entry t
    is the loss of token t + 1, predicted at position t (the last position it attends from).
    Rows run one at a time through `zoo.streaming.token_losses` (teacher-forced, full
    attention over a cache, whose attention is the XLA path whatever `cfg.attention` says).
    `window`: each token sees only the `window` most recent ones, at positions below `window`
    (zoo.streaming's window-only cache): a model within the length it was trained at."""
    from zoo.streaming import token_losses

    cfg = cfg.replace(attention="xla")
    rows = [np.asarray(token_losses(params, cfg, row[None], cache_window=window)) for row in tokens]
    return np.concatenate(rows).mean(axis=0)


def buckets(curve: np.ndarray, width: int) -> list[float]:
    """Means of consecutive `width` entries of curve [N] (the last bucket may be shorter)."""
    return [float(curve[a:a + width].mean()) for a in range(0, len(curve), width)]


def ranges(short: int, length: int) -> list[int]:
    """Bounds of the table's ranges: 0, short, 2 short, 4 short ... up to the last prediction."""
    bounds = [0]
    while bounds[-1] < length - 1:
        bounds.append(min(max(short, 2 * bounds[-1]), length - 1))
    return bounds


def score(run: Path, fields: dict[str, Any], text: str, rows: int, length: int, bucket: int,
          window: int | None = None) -> dict[str, Any]:
    """One model: `run`'s latest params with its Config's `fields` replaced, scored on the
    first rows x length tokens of `text` (`window`: see `position_losses`): {"step",
    "fields", "by_bucket", "by_position"}."""
    from train.sample import load_run

    cfg, params, tok, step = load_run(run)
    cfg = cfg.replace(**fields)
    curve = position_losses(params, cfg, stretches(tok, text, rows, length), window)
    return {"step": step, "fields": fields, "by_bucket": [round(x, 4) for x in buckets(curve, bucket)],
            "by_position": curve}


# --- output ----------------------------------------------------------------------------------

def table(variants: list[dict[str, Any]]) -> str:
    """The variants' mean loss over their ranges (`by_range`: positions [a, b)), one line each."""
    spans = list(variants[0]["by_range"])
    lines = [f"{'positions [a, b)':<34}" + "".join(f"{s:>12}" for s in spans)]
    for v in variants:
        lines.append(f"{v['name']:<34}" + "".join(f"{m:>12.3f}" for m in v["by_range"].values()))
    return "\n".join(lines)


def draw(fig: Any, variants: list[dict[str, Any]], bucket: int, short: int) -> None:
    """Loss by bucket less the reference's (the variant of method "window": the trained model
    reading only the last `short` tokens, so the text's own ups and downs cancel), without
    fine-tuning (left) and after it (right), on a matplotlib Figure (a bare
    `matplotlib.figure.Figure` or `plt.figure()`)."""
    ref = np.asarray(next(v for v in variants if v["method"] == "window")["by_bucket"])
    axes = fig.subplots(1, 2, sharey=True)
    for ax, tuned in zip(axes, (False, True)):
        ax.axhline(0, color="black", linewidth=1, label=f"reference: trained at {short}, {short}-token window")
        for v in variants:
            if v["method"] != "window" and (v["fine_tuned"] == tuned or (tuned and v["method"] == "trained")):
                x = bucket * (np.arange(len(ref)) + 0.5)
                style = dict(color="grey", linestyle="--") if tuned and v["method"] == "trained" \
                    else dict(color=COLORS[v["method"]])
                ax.plot(x, np.asarray(v["by_bucket"]) - ref, marker="o", markersize=3, label=v["name"], **style)
        ax.axvline(short, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("position")
        ax.set_title("after fine-tuning on long rows" if tuned else "max_len raised, not fine-tuned", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"held-out loss - reference (nats, per {bucket} positions)")
    fig.tight_layout()


# --- the commands ----------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.context_extension", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/context_extension", help="working folder: the text split and the runs")
    p.add_argument("--data", default=str(DATA_DIR / "tinyshakespeare.txt"), help="one text file")
    p.add_argument("--held-out", type=float, default=0.1, help="the text's last share, held out")
    p.add_argument("--short", type=int, default=512, help="tokens per row of the first run")
    p.add_argument("--factor", type=int, default=8, help="how many times max_len grows")
    p.add_argument("--methods", default="linear,yarn", help=f"comma-separated, from {METHODS}")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048, help="SentencePiece pieces")
    p.add_argument("--steps", type=int, default=300, help="steps of the short run")
    p.add_argument("--batch", type=int, default=8, help="rows per step of the short run")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--long-steps", type=int, default=40, help="fine-tuning steps on long rows")
    p.add_argument("--long-batch", type=int, default=1, help="long rows per fine-tuning step")
    p.add_argument("--long-lr", type=float, default=5e-4)
    p.add_argument("--rows", type=int, default=4, help="held-out stretches scored")
    p.add_argument("--bucket", type=int, default=256, help="positions per bucket")
    p.add_argument("--reuse", action="store_true", help="keep the runs already in --out (score them again)")
    p.add_argument("--json", default="bench/results/cpu_context_extension.json")
    p.add_argument("--plot", default="bench/results/cpu_context_extension.png")
    return p


def run_train(argv: list[str], reuse: bool = False) -> float | None:
    """`python -m train ARGV` in this process; its wall seconds. RuntimeError when it fails.
    `reuse`: a run dir (after --run-dir) that holds checkpoints already is kept (None)."""
    from train.loop import main as train_main

    run_dir = Path(argv[argv.index("--run-dir") + 1])
    if reuse and (run_dir / "checkpoints").is_dir():
        print(f"reusing {run_dir}", flush=True)
        return None
    print("python -m train", " ".join(argv), flush=True)
    start = time.time()
    if train_main(argv) != 0:
        raise RuntimeError(f"python -m train {' '.join(argv)} failed (its error is above)")
    return time.time() - start


def recipe(a: argparse.Namespace) -> dict[str, Any]:
    """Steps 1-3 of the module docstring -> the JSON's contents."""
    out, start = Path(a.out), time.time()
    methods = a.methods.split(",")
    for m in methods:
        scaling(m, a.factor, a.short)  # a bad name fails before anything trains
    train_txt, held_txt = split_text(Path(a.data), out, a.held_out)
    short_run, commands, wall = out / f"short{a.short}", {}, {}
    commands["short"] = short_argv(train_txt, short_run, a)
    wall["short"] = run_train(commands["short"], a.reuse)
    for m in methods:
        commands[m] = extend_argv(short_run, train_txt, out / f"{m}{a.factor}x", m, a)
        wall[m] = run_train(commands[m], a.reuse)
    t0, length, text = time.time(), a.factor * a.short, held_txt.read_text()
    variants = [{"name": f"trained at {a.short}, {a.short}-token window", "method": "window", "fine_tuned": False,
                 **score(short_run, {}, text, a.rows, length, a.bucket, window=a.short)},
                {"name": f"trained at {a.short}, no scaling", "method": "trained", "fine_tuned": False,
                 **score(short_run, {}, text, a.rows, length, a.bucket)}]
    for m in methods:
        if m != "none":
            variants.append({"name": f"{m} x{a.factor}, not fine-tuned", "method": m, "fine_tuned": False,
                             **score(short_run, scaling(m, a.factor, a.short), text, a.rows, length, a.bucket)})
    for m in methods:
        variants.append({"name": f"{m} x{a.factor}, fine-tuned {a.long_steps} steps", "method": m,
                         "fine_tuned": True, **score(out / f"{m}{a.factor}x", {}, text, a.rows, length, a.bucket)})
    wall["score"] = time.time() - t0
    wall["total"] = time.time() - start
    return {"settings": vars(a), "commands": {k: ["python", "-m", "train", *v] for k, v in commands.items()},
            "length": length, "variants": variants,
            "wall_s": {k: None if v is None else round(v, 1) for k, v in wall.items()},
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load": os.getloadavg()}


def write(result: dict[str, Any], a: argparse.Namespace) -> None:
    """Prints the table; writes the JSON (without per-position curves) and the plot."""
    bounds = ranges(a.short, result["length"])
    for v in result["variants"]:
        v["by_range"] = {k: round(x, 4) for k, x in summary({"x": v["by_position"]}, bounds)["x"].items()}
    print(f"\nheld-out loss by position ({a.rows} stretches of {result['length']} tokens), wall s "
          f"{result['wall_s']}\n" + table(result["variants"]))
    saved = {**result, "variants": [{k: v for k, v in x.items() if k != "by_position"} for x in result["variants"]]}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(saved, indent=1))
    print(f"wrote {a.json}")
    if a.plot:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4))
        draw(fig, result["variants"], a.bucket, a.short)
        fig.savefig(a.plot, dpi=110)
        print(f"wrote {a.plot}")


def loss_main(argv: Sequence[str]) -> int:
    """`loss --run RUN --text FILE --length N [--rows R] [--bucket B] [KEY=VALUE ...]`."""
    from train.cli import parse_value

    p = argparse.ArgumentParser(prog="python -m bench.context_extension loss",
                                description="held-out loss by position of one run")
    p.add_argument("fields", nargs="*", metavar="KEY=VALUE", help="model Config fields to change")
    p.add_argument("--run", required=True, help="a `python -m train` run dir (a decoder)")
    p.add_argument("--text", required=True, help="a text file of at least --rows x --length tokens")
    p.add_argument("--length", type=int, required=True, help="tokens per stretch")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--bucket", type=int, default=256)
    a = p.parse_intermixed_args(list(argv))
    bad = [f for f in a.fields if "=" not in f]
    if bad:
        p.error(f"expected KEY=VALUE, got {bad[0]!r}")
    fields = {k: parse_value(v) for k, v in (f.split("=", 1) for f in a.fields)}
    got = score(Path(a.run), fields, Path(a.text).read_text(), a.rows, a.length, a.bucket)
    print(f"{a.run} step {got['step']} {fields or ''}")
    for i, x in enumerate(got["by_bucket"]):
        print(f"positions {i * a.bucket:>6}-{min((i + 1) * a.bucket, a.length - 1) - 1:<6} {x:.3f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loss"]:
        return loss_main(argv[1:])
    restart_with_huge_pages()  # as `python -m train` runs (train/hostmem.py)
    a = parser().parse_args(argv)
    try:
        result = recipe(a)
    except RuntimeError as e:  # a training command failed; it printed why
        print(f"error: {e}", file=sys.stderr)
        return 1
    write(result, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
