"""`python -m bench.multi30k [--minutes 60] [--json PATH]`: Multi30k English -> German from
scratch on this CPU (issue 20): a small encoder-decoder trained by `python -m train finetune
--model t5-small ... --task seq2seq`, with sacreBLEU's BLEU and chrF on the whole
test_2016_flickr set (1,000 pairs) at several points of the run, against training time.

The data is the shared folder's Multi30k (`ZOO_DATA_DIR` or ../shared/data, `multi30k/`):
train (29,000 pairs) to train on, test_2016_flickr to score; nothing is downloaded. The
tokenizer is one SentencePiece unigram model of --vocab pieces shared by both languages,
trained on the train sentences of both sides (bench.speech_data.tokenizer, as the speech
demonstration trains its own). The model is T5's layout (pre-norm RMSNorm, relative
position buckets, ReLU MLP, embeddings tied to the output through logit_scale = d^-0.5)
scaled down, with attention logits scaled by head_dim^-0.5 (T5 folds that factor into its
initialisation, which suits Adafactor's relative steps; under AdamW's fixed steps the
unscaled logits grow faster than the rest of the model learns), trained with a fairseq
IWSLT-style recipe at that scale: AdamW (b2 0.98), linear warmup then cosine decay, label
smoothing, dropout. Evaluations decode greedily
(--beams 1) up to --seq-len tokens; --final-beams N scores the last checkpoint once more with
an N-beam search after training.

--minutes sets the run's length in steps: minutes * 60 / --step-s, the seconds a step took in
short trials on this machine (a step count fixes the learning-rate schedule, so the run
cannot stop on the clock). The JSON rows hold, per evaluation, the wall seconds since the
run started (`wall_s`, after tokenizing and before compiling), the evaluation time so far
(`eval_s`: generation, scoring and checkpoints; bench.asr_demo.table), so `train_s =
wall_s - eval_s` is training alone (the first compile included), and the step, train and
held-out loss, BLEU and chrF. The machine may be shared: `load` samples os.getloadavg()
every 30 s while the run lasts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from bench import asr_demo, speech_data

SIDES = ("en", "de")


def data_dir() -> Path:
    """The shared Multi30k folder (train, val, test_2016_flickr .en/.de)."""
    path = speech_data.data_dir() / "multi30k"
    if not (path / "train.en").is_file():
        raise FileNotFoundError(f"{path}: Multi30k not found (set ZOO_DATA_DIR to the shared data folder)")
    return path


def tokenizer(out: Path, vocab: int) -> Path:
    """OUT/spm_VOCAB.model: SentencePiece trained on both sides of the train split (kept and
    reused when it exists)."""
    path = out / f"spm_{vocab}.model"
    if not path.is_file():
        texts = [line for side in SIDES
                 for line in (data_dir() / f"train.{side}").read_text(encoding="utf-8").splitlines() if line.strip()]
        out.mkdir(parents=True, exist_ok=True)
        speech_data.tokenizer(texts, vocab).save(path)
    return path


def finetune_argv(a: argparse.Namespace, tok: Path, run_dir: Path, steps: int) -> list[str]:
    """The `python -m train finetune` arguments of the run (printed, and stored in the JSON)."""
    data = data_dir()
    every = max(1, steps // a.evals)
    model = ["--model", "t5-small", f"d_model={a.d_model}", f"num_layers={a.layers}",
             f"num_decoder_layers={a.layers}", f"num_heads={a.heads}", f"d_ff={a.d_ff}",
             f"logit_scale={a.d_model ** -0.5}", f"attn_scale={a.attn_scale or (a.d_model // a.heads) ** -0.5}",
             f"dropout={a.dropout}", f"warmup_steps={a.warmup}",
             f"b2={a.b2}", f"end_lr_ratio={a.end_lr}", f"label_smoothing={a.smoothing}",
             f"weight_decay={a.weight_decay}"]
    run = ["--tokenizer", str(tok), "--task", "seq2seq", "--data", str(data / "train.en"), str(data / "train.de"),
           "--eval-data", str(data / "test_2016_flickr.en"), str(data / "test_2016_flickr.de"),
           "--run-dir", str(run_dir), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch),
           "--lr", str(a.lr), "--steps", str(steps), "--eval-every", str(every), "--checkpoint-every", str(every),
           "--num-beams", str(a.beams), "--log-every", "25", "--mesh", "data=1"]
    return model + run


def one_clock(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows on one clock. A resumed run (`python -m train finetune --resume
    --steps N`, e.g. a run lengthened in flight) restarts `time_s` at 0 in its new process: its
    rows are moved to follow the rows before, the steps between at the median seconds per step
    of the logged intervals (which overcounts the resumed process's own first steps and startup:
    its clock runs from its start)."""
    gaps = sorted((b["time_s"] - a["time_s"]) / (b["step"] - a["step"]) for a, b in zip(rows, rows[1:])
                  if b["time_s"] > a["time_s"] and not any(k.startswith("eval_") for k in b))
    median = gaps[len(gaps) // 2] if gaps else 0.0
    out, offset = [], 0.0
    for r in rows:
        if out and r["time_s"] + offset < out[-1]["time_s"]:
            offset = out[-1]["time_s"] + (r["step"] - out[-1]["step"]) * median
        out.append({**r, "time_s": r["time_s"] + offset})
    return out


def load_log(path: Path) -> list[tuple[float, float]]:
    """(seconds since the first line, 1-minute load) of a file of `date +%s` + /proc/loadavg lines."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(float(x[0]) - float(lines[0][0]), float(x[1])) for x in lines]


class LoadSampler:
    """os.getloadavg() every `period` seconds in a thread: [(seconds since start, 1-minute load)]."""

    def __init__(self, period: float = 30.0):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((round(time.time() - self._t0, 1), os.getloadavg()[0]))
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def beam_scores(run_dir: Path, beams: int) -> dict[str, float]:
    """BLEU and chrF of the run's last checkpoint on its eval set with `beams` beams, through
    the evaluation the run itself uses (train.finetune.translation_metrics)."""
    import functools

    import jax

    from train import finetune
    from train.export import restore_run
    from train.objectives import seq2seq

    fc = finetune.resolve(["--resume", "--run-dir", str(run_dir), "--num-beams", str(beams)])
    s = finetune.setup(fc)
    state = restore_run(run_dir, fc.steps)
    objective = jax.jit(functools.partial(seq2seq, start_id=s.cfg.decoder_start_id))
    return finetune.translation_metrics(s, state.params, s.pipeline.eval_batches(), objective, beams)


def plot(rows: list[dict], path: Path, title: str, target: float, minutes: float) -> None:
    """BLEU (and chrF) against training minutes, with the target and the time budget."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    minutes_of = [r["train_s"] / 60 for r in rows]
    ax.plot(minutes_of, [r["bleu"] for r in rows], "o-", label="BLEU (sacreBLEU, test_2016_flickr)")
    ax.plot(minutes_of, [r["chrf"] for r in rows], "s--", alpha=0.6, label="chrF")
    ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:g} BLEU")
    ax.axvline(minutes, color="grey", lw=0.8, ls="-.")
    for m, r in zip(minutes_of, rows):
        ax.annotate(f"{r['bleu']:.1f}", (m, r["bleu"]), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8)
    ax.set_xlim(0, 1.03 * max([minutes, *minutes_of]))
    ax.set_ylim(0, None)
    ax.set_xlabel("training time (minutes, evaluations excluded)")
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.multi30k", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/multi30k", help="working folder: the tokenizer and the run dir")
    p.add_argument("--minutes", type=float, default=60.0, help="training budget (sets --steps via --step-s)")
    p.add_argument("--step-s", type=float, default=1.05,
                   help="seconds a training step takes here (trials on the quiet 2-core machine)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: from --minutes)")
    p.add_argument("--evals", type=int, default=4, help="evaluations over the run (BLEU on the whole test set)")
    p.add_argument("--vocab", type=int, default=8000, help="SentencePiece pieces shared by both languages")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=3, help="encoder layers, and as many decoder layers")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--attn-scale", type=float, default=None,
                   help="attention logit scale (default head_dim^-0.5; T5's own is 1.0)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--seq-len", type=int, default=36, help="tokens per source and per target (and generated)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--b2", type=float, default=0.98)
    p.add_argument("--end-lr", type=float, default=0.05, help="final learning rate, as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--beams", type=int, default=1, help="beams of the evaluations during the run (1: greedy)")
    p.add_argument("--final-beams", type=int, default=0, help="score the last checkpoint with N beams (0: no)")
    p.add_argument("--target", type=float, default=25.0, help="the BLEU the plot marks")
    p.add_argument("--json", default="bench/results/cpu_multi30k.json")
    p.add_argument("--png", default=None, help="the curve (default: --json with .png)")
    p.add_argument("--report-only", action="store_true",
                   help="no training: the table, JSON and plot of the run already in OUT/run")
    p.add_argument("--load-log", help="--report-only: load samples taken during the run, lines of `date +%%s` "
                                      "and /proc/loadavg (default: none)")
    p.add_argument("--note", default="", help="a line stored in the JSON (how the run went)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    out = Path(a.out)
    start = time.time()
    tok = tokenizer(out, a.vocab)
    run_dir = out / "run"
    steps = a.steps or max(1, round(a.minutes * 60 / a.step_s))
    if not a.steps and steps > a.evals:  # evaluations land on the last step, not just before it
        steps -= steps % a.evals
    if a.report_only:  # the run's own length (its other settings are taken from the flags as given)
        steps = json.loads((run_dir / "run.json").read_text())["hparams"]["total_steps"]
    args = finetune_argv(a, tok, run_dir, steps)
    with LoadSampler() as load:
        if not a.report_only:
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"tokenizer {tok} ({time.time() - start:.0f} s); {steps} steps for {a.minutes:g} minutes at "
                  f"{a.step_s:g} s/step", flush=True)
            print("python -m train finetune", " ".join(args), flush=True)
            code = subprocess.run([sys.executable, "-m", "train", "finetune", *args]).returncode
        else:
            code = 0
    interrupted = code > 128  # SIGINT/SIGTERM: a checkpoint was saved, the evaluations so far stand
    if code != 0 and not interrupted:
        print(f"python -m train finetune exited with {code}", file=sys.stderr)
        return 1
    rows = one_clock([json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()])
    evals = [{"step": r["step"], "train_s": round(r["wall_s"] - r["eval_s"], 1), "wall_s": r["wall_s"],
              "eval_s": r["eval_s"], "loss": r["loss"], "eval_loss": r["eval_loss"], "bleu": r["eval_bleu"],
              "chrf": r["eval_chrf"]} for r in asr_demo.table(rows, ("eval_bleu", "eval_chrf"))]
    decoding = "greedy" if a.beams == 1 else f"beam {a.beams}"
    print(f"\nMulti30k en->de test_2016_flickr (1,000 sentences), {decoding}, against training time")
    print(f"{'step':>6}{'train min':>11}{'wall min':>10}{'loss':>8}{'eval loss':>11}{'BLEU':>7}{'chrF':>7}")
    for r in evals:
        print(f"{r['step']:>6}{r['train_s'] / 60:>11.1f}{r['wall_s'] / 60:>10.1f}{r['loss']:>8.3f}"
              f"{r['eval_loss']:>11.3f}{r['bleu']:>7.2f}{r['chrf']:>7.2f}")
    final = None
    if a.final_beams > 1 and not interrupted:
        t = time.time()
        final = {**beam_scores(run_dir, a.final_beams), "beams": a.final_beams, "step": steps,
                 "seconds": round(time.time() - t, 1)}
        print(f"last checkpoint, beam {a.final_beams}: BLEU {final['eval_bleu']:.2f}, chrF {final['eval_chrf']:.2f}")
    samples = load_log(Path(a.load_log)) if a.load_log else load.samples
    loads = [x for _, x in samples]
    result = {"task": "multi30k en->de, test_2016_flickr", "decoding": decoding, "steps": steps,
              "interrupted": interrupted,
              "step_s_assumed": a.step_s, "minutes": a.minutes, "settings": vars(a), "argv": args,
              "config": json.loads((run_dir / "config.json").read_text()),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "note": a.note, "load": {"samples": samples, "mean": round(sum(loads) / max(len(loads), 1), 2),
                       "max": max(loads, default=None)},
              "total_wall_s": None if a.report_only else round(time.time() - start, 1), "rows": evals, "final_beam": final}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2))
    png = Path(a.png or Path(a.json).with_suffix(".png"))
    plot(evals, png, f"Multi30k en->de from scratch, {a.d_model}d {a.layers}+{a.layers} layers, 2-core CPU "
                     f"(load mean {result['load']['mean']:.1f}), {decoding}", a.target, a.minutes)
    print(f"wrote {a.json} and {png}")
    return 0


if __name__ == "__main__":
    from train.hostmem import restart_with_huge_pages

    restart_with_huge_pages()  # as `python -m train` runs (train/hostmem.py)
    sys.exit(main())
