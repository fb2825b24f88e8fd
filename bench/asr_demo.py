"""`python -m bench.asr_demo --out DIR [--count 3000] [--steps 900] ...`: speech recognition
from scratch on CPU, without downloads (issue 23). Synthesises short utterances with
`bench.speech_data` (Debian's espeak-ng, several voices and speeds), trains a tiny
Whisper-shaped model from random weights with `python -m train finetune --task asr`, and
prints the held-out word error rate (`eval_wer`, jiwer) at each evaluation against the
training time, with the same table as JSON (default bench/results/cpu_asr_demo.json).

The model is whisper-tiny's layout (convolutional stem, sinusoidal encoder positions, learned
decoder positions, pre-norm layers with biases, tied head) at demonstration size, with a window
sized to the clips instead of Whisper's 30 s: `encoder_max_len` is half the frames (100 per
second) of the longest synthesised clip, rounded up to a multiple of 10, so every clip fits and
little of the window is padding. The tokenizer is the SentencePiece model bench.speech_data
trains on the train texts. The held-out texts never occur in training (bench.speech_data), so
the WER is that of new word sequences.

Wall seconds in the table are `time_s` of metrics.jsonl: seconds since the run started
(after the features were computed and the step compiled), evaluations included; `eval_s`
is the time the evaluations (and checkpoints) took up to that point (transcribing every held-out clip with
zoo.generate), so `wall_s - eval_s` is training alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from bench import speech_data


def window_of(out: Path) -> int:
    """encoder_max_len for the clips of OUT's manifests: half the frames of the longest clip
    (100 frames a second; the stem's stride 2 halves them), rounded up to a multiple of 10."""
    seconds = [json.loads(line)["seconds"] for name in ("train.jsonl", "heldout.jsonl")
               for line in (out / name).read_text().splitlines() if line.strip()]
    frames = math.ceil((max(seconds) + 0.001) * 100)  # the manifests round durations to 1 ms
    return 10 * math.ceil(frames / 20)


def finetune_argv(out: Path, run_dir: Path, a: argparse.Namespace, encoder_max_len: int) -> list[str]:
    """The `python -m train finetune` arguments of the run (printed, and stored in the JSON)."""
    model = ["--model", "whisper-tiny", f"d_model={a.d_model}", f"num_layers={a.layers}",
             f"num_decoder_layers={a.decoder_layers or a.layers}", f"num_heads={a.heads}",
             f"d_ff={4 * a.d_model}", f"max_len={a.seq_len + 8}", f"encoder_max_len={encoder_max_len}",
             "decoder_start_id=0", "bos_id=None"]
    run = ["--tokenizer", str(out / "tokenizer.model"), "--task", "asr", "--data", str(out / "train.jsonl"),
           "--eval-data", str(out / "heldout.jsonl"), "--run-dir", str(run_dir), "--seq-len", str(a.seq_len),
           "--batch-size", str(a.batch), "--lr", str(a.lr), "--steps", str(a.steps),
           "--eval-every", str(a.eval_every), "--log-every", "10", "--mesh", "data=1"]
    if a.spec_augment:
        run += ["--spec-augment", *a.spec_augment.split()]
    return model + run


def table(rows: list[dict], metrics: tuple[str, ...] = ("eval_wer",)) -> list[dict]:
    """The evaluations of metrics.jsonl rows (those with metrics[0]): step, wall_s, eval_s
    (evaluation and checkpoint time so far), train loss, eval loss and the `metrics`. An
    evaluation shares its step's row, so its time is that row's interval less its steps at
    the median seconds per step of the others."""
    logged = [(a, b) for a, b in zip(rows, rows[1:]) if metrics[0] not in b]
    per_step = sorted((b["time_s"] - a["time_s"]) / (b["step"] - a["step"]) for a, b in logged) or [0.0]
    median = per_step[len(per_step) // 2]
    out, eval_s, last = [], 0.0, {"step": 0, "time_s": 0.0}
    for r in rows:
        if metrics[0] in r:
            eval_s += max(0.0, r["time_s"] - last["time_s"] - (r["step"] - last["step"]) * median)
            out.append({"step": r["step"], "wall_s": round(r["time_s"], 1), "eval_s": round(eval_s, 1),
                        "loss": r.get("loss"), "eval_loss": r["eval_loss"], **{m: r[m] for m in metrics}})
        last = r
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.asr_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="working folder: the speech data and the run dir")
    p.add_argument("--count", type=int, default=3000, help="utterances to synthesise")
    p.add_argument("--texts", choices=("numbers", "multi30k", "both"), default="numbers")
    p.add_argument("--voices", default=",".join(speech_data.VOICES), help="espeak-ng voices, comma-separated")
    p.add_argument("--speeds", default=",".join(map(str, speech_data.SPEEDS)), help="words per minute")
    p.add_argument("--reuse", action="store_true", help="keep OUT/speech when its manifests exist")
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=3, help="encoder layers")
    p.add_argument("--decoder-layers", type=int, default=0, help="decoder layers (default: --layers)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16, help="decoder tokens per transcript")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--spec-augment", default="", help='e.g. "2 10 2 20" (FREQ_MASKS FREQ_WIDTH TIME_MASKS '
                                                      'TIME_WIDTH); default none')
    p.add_argument("--json", default="bench/results/cpu_asr_demo.json")
    a = p.parse_args(argv)
    out = Path(a.out)
    speech, run_dir = out / "speech", out / "run"
    start = time.time()
    if not (a.reuse and (speech / "train.jsonl").is_file()):
        shutil.rmtree(speech, ignore_errors=True)
        counts = speech_data.synthesise(speech, a.count, texts=a.texts, voices=a.voices.split(","),
                                        speeds=[int(s) for s in a.speeds.split(",")], vocab_size=256)
        print(f"synthesised {counts['train']} train, {counts['heldout']} held-out utterances "
              f"in {time.time() - start:.0f} s", flush=True)
    enc_len = window_of(speech)
    args = finetune_argv(speech, run_dir, a, enc_len)
    print(f"window {2 * enc_len} frames ({2 * enc_len / 100:.2f} s), encoder_max_len={enc_len}")
    print("python -m train finetune", " ".join(args), flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    from train import finetune

    if finetune.main(args) != 0:
        return 1
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = table(rows)
    print(f"\nheld-out WER against training time ({a.texts}, {a.count} utterances, "
          f"d_model {a.d_model}, {a.layers}+{a.decoder_layers or a.layers} layers)")
    print(f"{'step':>6}{'wall s':>9}{'train s':>9}{'train loss':>12}{'eval loss':>11}{'WER':>8}")
    for r in evals:
        print(f"{r['step']:>6}{r['wall_s']:>9.0f}{r['wall_s'] - r['eval_s']:>9.0f}{r['loss']:>12.4f}"
              f"{r['eval_loss']:>11.4f}{r['eval_wer']:>8.3f}")
    n_train = sum(1 for _ in open(speech / "train.jsonl"))
    n_held = sum(1 for _ in open(speech / "heldout.jsonl"))
    params = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    result = {"texts": a.texts, "count": a.count, "train": n_train, "heldout": n_held,
              "voices": a.voices.split(","), "speeds": [int(s) for s in a.speeds.split(",")],
              "encoder_max_len": enc_len, "window_s": 2 * enc_len / 100, "argv": args,
              "overrides": params.get("overrides"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load": os.getloadavg(), "total_wall_s": round(time.time() - start, 1),
              "rows": evals}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
