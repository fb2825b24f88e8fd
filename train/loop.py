"""The training run behind `python -m train`: set up (tokenizer, model, data, state), loop
(objective -> step -> metrics -> checkpoints), and report.

Metrics of step s are fetched after step s+1 is dispatched, so the host never waits on the
device inside the loop. SIGTERM/SIGINT finish the current step, save a checkpoint and exit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

import zoo
from train import data as data_lib
from train.checkpoint import Checkpointer, CheckpointError, check_record
from train.cli import RunConfig
from train.objectives import DEFAULT_OBJECTIVE, Objective, check_objective, make_objective
from train.optim import Hparams
from train.report import (MetricsLog, Progress, Reporter, peak_flops, plot_losses, read_metrics, summary,
                          train_flops)
from train.step import (abstract_state, batch_shardings, create_state, jit_eval_step, jit_step,
                        state_shardings)
from train.tokens import Tokenizer, load_tokenizer, train_tokenizer

NUM_SENTINELS = 100  # T5's <extra_id_0..99>


class RunError(RuntimeError):
    """A run that cannot start as asked (say, a run dir that already holds another run)."""


# --- setup --------------------------------------------------------------------------------

def prepare_tokenizer(rc: RunConfig, family: str, texts: list[str], run_dir: Path) -> Tokenizer:
    """--tokenizer if given (copied into the run dir), else the run dir's cached one, else
    SentencePiece trained on the corpus: unigram with sentinels for encdec, BPE otherwise."""
    sentinels = NUM_SENTINELS if family == "encdec" else 0
    cached = run_dir / "tokenizer.model"
    if rc.tokenizer:
        tok = load_tokenizer(rc.tokenizer, sentinels)
        if not cached.exists() or cached.read_bytes() != tok.model_proto:
            tok.save(cached)
        return tok
    if cached.exists():
        return load_tokenizer(cached, sentinels)
    print(f"training a SentencePiece tokenizer on {len(texts)} documents ...", flush=True)
    tok = train_tokenizer(texts, vocab_size=rc.vocab_size, num_sentinels=sentinels,
                          model_type="unigram" if family == "encdec" else "bpe")
    tok.save(cached)
    return tok


def model_config(base: zoo.Config, tok: Tokenizer) -> zoo.Config:
    """The model Config with the tokenizer's size and special ids."""
    v = tok.vocab
    start = v.pad_id if base.family == "encdec" else None
    return base.replace(vocab_size=v.size, pad_id=v.pad_id, eos_id=v.eos_id, bos_id=v.bos_id,
                        decoder_start_id=start)


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        try:
            out[name.strip()] = int(size)
        except ValueError:
            raise ValueError(f"--mesh: expected AXIS=SIZE[,AXIS=SIZE...], got {text!r}") from None
    return out


def build_mesh(text: str) -> Mesh:
    """A mesh over the first devices its sizes need (all of them when a size is -1)."""
    shape = parse_mesh(text)
    devices = jax.devices()
    if all(s > 0 for s in shape.values()):
        need = int(np.prod(list(shape.values())))
        if need > len(devices):
            raise ValueError(f"--mesh {text}: needs {need} devices, {len(devices)} available")
        devices = devices[:need]
    return zoo.sharding.make_mesh(shape, devices)


def hparams(rc: RunConfig) -> Hparams:
    return Hparams(learning_rate=rc.lr, warmup_steps=rc.warmup_steps, total_steps=rc.steps,
                   end_lr_ratio=rc.end_lr_ratio, weight_decay=rc.weight_decay,
                   clip_norm=rc.clip_norm, z_loss=rc.z_loss, aux_weight=rc.aux_weight,
                   accum_steps=rc.accum_steps, remat=rc.remat)


@dataclasses.dataclass
class Setup:
    cfg: zoo.Config
    hp: Hparams
    objective: Objective
    tokenizer: Tokenizer
    pipeline: data_lib.Pipeline
    mesh: Mesh
    record: dict[str, Any]  # what a checkpoint of this run must agree with


def setup(rc: RunConfig, run_dir: Path) -> Setup:
    """Everything before the first compile; every user error surfaces here."""
    base = zoo.preset(rc.model, **rc.overrides)
    name = rc.objective or DEFAULT_OBJECTIVE[base.family]
    check_objective(name, base.family)
    if base.positions in ("learned", "sinusoidal") and rc.seq_len > base.max_len:
        raise ValueError(f"--seq-len {rc.seq_len} exceeds the model's max_len {base.max_len} "
                         f"(raise it with max_len=...)")
    mesh = build_mesh(rc.mesh)
    texts = data_lib.read_texts(data_lib.resolve_files(rc.data))
    tok = prepare_tokenizer(rc, base.family, texts, run_dir)
    cfg = model_config(base, tok)
    objective = make_objective(name, cfg, tok.vocab, rc.seq_len)
    print(f"tokenizing {len(texts)} documents (cached in {run_dir / 'cache'}) ...", flush=True)
    stream = data_lib.tokenize(texts, tok, run_dir / "cache")
    pipeline = data_lib.Pipeline(stream, objective.row_len, rc.batch_size, rc.seed,
                                 jax.process_index(), jax.process_count())
    hp = hparams(rc)
    record = {"config": cfg.to_dict(), "objective": name, "seq_len": rc.seq_len,
              "batch_size": rc.batch_size, "seed": rc.seed,
              "tokenizer": hashlib.sha256(tok.model_proto).hexdigest()[:16],
              "data_fingerprint": stream.fingerprint, "hparams": dataclasses.asdict(hp)}
    return Setup(cfg, hp, objective, tok, pipeline, mesh, record)


def _put(rows: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in rows.items()}


# --- the run --------------------------------------------------------------------------------

class _Signals:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second SIGINT aborts."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclasses.dataclass
class Compiled:
    """The jitted functions of a run and the shardings of their inputs."""

    objective: Any  # (key, rows) -> batch
    step: Any  # (state, batch) -> (state, metrics)
    eval_step: Any  # (state, batch) -> metrics
    rows_sharding: dict[str, NamedSharding]


def compile_run(rc: RunConfig, s: Setup) -> Compiled:
    """jit the objective, step and eval step with explicit shardings on the run's mesh."""
    rows = {k: jax.ShapeDtypeStruct((rc.batch_size, s.objective.row_len), np.int32)
            for k in ("tokens", "segment_ids", "positions")}
    batch_sh = batch_shardings(jax.eval_shape(s.objective, jax.random.key(0), rows), s.mesh)
    state_sh = state_shardings(abstract_state(s.cfg, s.hp), s.mesh)
    return Compiled(jax.jit(s.objective, out_shardings=batch_sh), jit_step(state_sh, batch_sh, s.mesh),
                    jit_eval_step(state_sh, batch_sh, s.mesh), batch_shardings(rows, s.mesh))


def initial_state(rc: RunConfig, s: Setup, ckpt: Checkpointer) -> tuple[Any, int]:
    """(state, step): the latest checkpoint, checked against this run, or a fresh state."""
    if ckpt.latest_step() is None:
        if rc.resume:
            print(f"no checkpoint in {rc.run_dir}: starting from step 0", flush=True)
        return create_state(s.cfg, s.hp, rc.seed, s.mesh), 0
    start, record = ckpt.read_record()
    check_record(record, s.record, str(ckpt.directory / str(start)))
    state = ckpt.restore(abstract_state(s.cfg, s.hp), s.mesh, start)
    s.pipeline.set_position(record["data"])
    print(f"resumed {rc.run_dir} at step {start}", flush=True)
    return state, start


def evaluate(c: Compiled, mesh: Mesh, state: Any, batches: list[dict], key: jax.Array) -> dict[str, float]:
    """Held-out loss, perplexity and accuracy over fixed batches (fixed objective keys)."""
    total = np.zeros(3)
    for i, rows in enumerate(batches):
        with zoo.sharding.use(mesh):
            m = jax.device_get(c.eval_step(state, c.objective(jax.random.fold_in(key, i), rows)))
        total += [m["loss"] * m["targets"], m["accuracy"] * m["targets"], m["targets"]]
    loss = total[0] / max(total[2], 1)
    return {"eval_loss": float(loss), "eval_perplexity": float(np.exp(loss)),
            "eval_accuracy": float(total[1] / max(total[2], 1))}


def train_loop(rc: RunConfig, s: Setup, c: Compiled, ckpt: Checkpointer, state: Any, start: int,
               reporter: Reporter) -> tuple[Any, int | None]:
    """Steps start..rc.steps; returns (state, the signal that stopped it or None)."""
    keys = jax.random.split(jax.random.key(rc.seed), 2)  # [train objective, eval objective]
    eval_rows = [_put(r, c.rows_sharding) for r in s.pipeline.eval_batches(rc.eval_batches)]
    with _Signals() as signals:
        for step in range(start, rc.steps):
            rows = _put(s.pipeline.next_batch(), c.rows_sharding)
            with zoo.sharding.use(s.mesh):
                state, metrics = c.step(state, c.objective(jax.random.fold_in(keys[0], step), rows))
            reporter.flush()  # the previous step's metrics, now that this step is queued
            done = step + 1
            extra = {}
            if done % rc.eval_interval == 0 or done == rc.steps:
                with reporter.paused(state):
                    extra = evaluate(c, s.mesh, state, eval_rows, keys[1])
            if extra or done % rc.log_interval == 0 or done == rc.steps:
                reporter.queue(done, metrics, extra)
            stop = signals.received is not None
            if stop or done % rc.checkpoint_every == 0 or done == rc.steps:
                ckpt.save(done, state, {**s.record, "data": s.pipeline.position, "step": done}, force=True)
            if stop:
                reporter.flush()
                return state, signals.received
    reporter.flush()
    return state, None


def run(rc: RunConfig) -> dict[str, Any]:
    """Trains as `rc` says; returns {"steps", "loss", "eval_loss", "interrupted", "signal"}."""
    run_dir = Path(rc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / "checkpoints", rc.checkpoint_every, rc.keep)
    try:
        latest = ckpt.latest_step()
        if latest is not None and not rc.resume:
            raise RunError(f"{run_dir} already holds a run (checkpoints up to step {latest}): pass "
                           f"--resume to continue it, or choose another --run-dir")
        # Settings that default from --steps are fixed at the start, so `--resume --steps N`
        # extends the run without changing its warmup.
        rc = dataclasses.replace(rc, warmup=rc.warmup_steps)
        s = setup(rc, run_dir)
        rc = dataclasses.replace(rc, objective=s.record["objective"])
        (run_dir / "run.json").write_text(json.dumps(rc.to_dict(), indent=2))
        (run_dir / "config.json").write_text(s.cfg.to_json())
        state, start = initial_state(rc, s, ckpt)
        compiled = compile_run(rc, s)
        flops = train_flops(s.cfg, rc.seq_len, s.objective.target_len) * rc.batch_size
        peak, peak_note = peak_flops(list(s.mesh.devices.flat), rc.peak_flops)
        shape = "".join(f" {k}={v}" for k, v in rc.overrides.items())
        print(f"model {rc.model}{shape} ({s.cfg.family}, {zoo.param_count(s.cfg) / 1e6:.2f}M params, "
              f"vocab {s.cfg.vocab_size}) | objective {s.record['objective']} | batch "
              f"{rc.batch_size} x {rc.seq_len} | {len(s.pipeline.train_rows)} train rows "
              f"({s.pipeline.epoch_steps} steps/epoch) | mesh {dict(s.mesh.shape)} | MFU peak: "
              f"{peak_note}", flush=True)
        t0 = time.time()
        log = MetricsLog(run_dir, start if latest is not None else None)
        reporter = Reporter(log, Progress(rc.steps, flops, peak), flops, peak, rc.steps)
        try:
            state, stopped_by = train_loop(rc, s, compiled, ckpt, state, start, reporter)
        finally:
            log.close()
        ckpt.wait()
        steps_saved = ckpt.all_steps()
    finally:
        ckpt.close()
    rows = read_metrics(run_dir / "metrics.jsonl")
    if rows:
        plot_losses(rows, run_dir / "loss.png")
    if stopped_by is not None:
        print(f"stopped by {signal.Signals(stopped_by).name}; checkpoint saved at step "
              f"{int(jax.device_get(state.step))}", flush=True)
    print(summary(rows, run_dir, time.time() - t0, stopped_by is not None, steps_saved, peak_note),
          flush=True)
    evals = [r for r in rows if "eval_loss" in r]
    return {"steps": rows[-1]["step"] if rows else start, "loss": rows[-1]["loss"] if rows else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "interrupted": stopped_by is not None, "signal": stopped_by}


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 0 when done, 2 on a usage error, 128+signal when stopped by one."""
    from train.cli import resolve
    try:
        rc = resolve(sys.argv[1:] if argv is None else argv)
        result = run(rc)
    except (ValueError, FileNotFoundError, RunError, CheckpointError, zoo.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 128 + result["signal"] if result["interrupted"] else 0
