"""The training run behind `python -m train`: set up (tokenizer, model, data, state), loop
(objective -> step -> metrics -> checkpoints), and report.

Metrics of step s are fetched after step s+1 is dispatched, so the host never waits on the
device inside the loop. SIGTERM/SIGINT finish the current step, save a checkpoint and exit.

The step runs on the `--mesh` by the `--parallel` path (train/parallel.py); with several
processes (train/hosts.py) each loads only the rows its devices hold, process 0 writes the
run's files, and every process saves and restores its part of the checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

import zoo
from train import data as data_lib
from train import hosts
from train.checkpoint import Checkpointer, CheckpointError, check_record, quiet_libraries
from train.cli import RunConfig
from train.objectives import Objective, make_objective
from train.optim import Hparams
from train.parallel import Runner, build_mesh, check_fit, make_runner, process_rows, rules_from
from train.report import (MetricsLog, Progress, Reporter, peak_flops, plot_losses, read_metrics, summary,
                          train_flops)
from train.rundir import (EXIT_DONE, EXIT_USAGE, Locked, NotFinite, RunLock, RunStop, WriteFailed,
                          is_disk_full, read_json, write_atomic)
from train.step import abstract_state, batch_shardings
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
    if rc.tokenizer:  # copied into the run dir once every check has passed (run below)
        return load_tokenizer(rc.tokenizer, sentinels)
    if cached.exists():
        return load_tokenizer(cached, sentinels)
    print(f"training a SentencePiece tokenizer on {len(texts)} documents ...", flush=True)
    tok = train_tokenizer(texts, vocab_size=rc.vocab_size, num_sentinels=sentinels,
                          model_type="unigram" if family == "encdec" else "bpe")
    write_atomic(cached, tok.model_proto)  # a kill mid-write must not leave half a model
    return tok


def model_config(base: zoo.Config, tok: Tokenizer) -> zoo.Config:
    """The model Config with the tokenizer's size and special ids."""
    v = tok.vocab
    start = v.pad_id if base.family == "encdec" else None
    return base.replace(vocab_size=v.size, pad_id=v.pad_id, eos_id=v.eos_id, bos_id=v.bos_id,
                        decoder_start_id=start)


@dataclasses.dataclass
class Setup:
    cfg: zoo.Config
    hp: Hparams
    objective: Objective
    tokenizer: Tokenizer
    pipeline: data_lib.Pipeline
    mesh: Mesh
    rules: zoo.sharding.Rules
    rows_sharding: dict[str, NamedSharding]  # the data pipeline's rows [B, row_len]
    record: dict[str, Any]  # what a checkpoint of this run must agree with


def setup(rc: RunConfig, run_dir: Path) -> Setup:
    """Everything before the first compile; every user error surfaces here (those about the
    settings alone already when `rc` was made). With several processes, process 0 prepares
    the tokenizer and token cache and the others read them."""
    if rc.init_from is not None and not (Path(rc.init_from) / "run.json").is_file():
        raise FileNotFoundError(f"--init-from {rc.init_from}: no run.json there; expected the run dir of a "
                                f"`python -m train` run")
    base, hp = rc.base_config(), rc.hparams
    mesh, rules = build_mesh(rc.mesh), rules_from(rc.rules)
    check_fit(rc.batch_size, mesh, rules, rc.parallel, hp.accum_steps)
    texts = data_lib.read_texts(data_lib.resolve_files(rc.data))
    tok = hosts.primary_first("tokenizer", lambda: prepare_tokenizer(rc, base.family, texts, run_dir))
    cfg = model_config(base, tok)
    objective = make_objective(rc.objective, cfg, tok.vocab, rc.seq_len)
    if hosts.is_primary():
        print(f"tokenizing {len(texts)} documents (cached in {run_dir / 'cache'}) ...", flush=True)
    stream = hosts.primary_first("tokens", lambda: data_lib.tokenize(texts, tok, run_dir / "cache"))
    rows = {k: jax.ShapeDtypeStruct((rc.batch_size, objective.row_len), np.int32)
            for k in ("tokens", "segment_ids", "positions")}
    rows_sharding = batch_shardings(rows, mesh, rules)
    part, parts = process_rows(rows_sharding["tokens"], rows["tokens"].shape)
    pipeline = data_lib.Pipeline(stream, objective.row_len, rc.batch_size, rc.seed, part, parts)
    record = {"config": cfg.to_dict(), "objective": rc.objective, "seq_len": rc.seq_len,
              "batch_size": rc.batch_size, "seed": rc.seed,
              "tokenizer": hashlib.sha256(tok.model_proto).hexdigest()[:16],
              "data_fingerprint": stream.fingerprint, "hparams": dataclasses.asdict(hp)}
    return Setup(cfg, hp, objective, tok, pipeline, mesh, rules, rows_sharding, record)


def _put(rows: dict[str, np.ndarray], shardings: dict[str, NamedSharding],
         batch_size: int) -> dict[str, jax.Array]:
    """This process's rows -> global arrays [batch_size, ...] sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v, (batch_size, *v.shape[1:]))
            for k, v in rows.items()}


# --- the run --------------------------------------------------------------------------------

class _Signals:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second SIGINT aborts.

    Several processes must all stop after the same step, or the ones still stepping wait
    forever for the others: there JAX's preemption service (started by
    jax.distributed.initialize) owns SIGTERM, and a SIGTERM to any process stops all of
    them at one agreed step. SIGINT then aborts as usual (the last periodic checkpoint stays)."""

    def __init__(self, processes: int = 1):
        self.processes = processes
        self.received: int | None = None
        self._old = {}

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGTERM, signal.SIGINT) if self.processes == 1 else ():
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def stop(self, step: int) -> int | None:
        """The signal that should stop the run after `step`, if any. Every process must
        call it after every step (the preemption service counts them)."""
        if self.processes > 1 and multihost_utils.reached_preemption_sync_point(step):
            self.received = signal.SIGTERM
        return self.received

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclasses.dataclass
class Compiled:
    """The run's jitted objective and its step (the runner, by the run's --parallel path)."""

    objective: Any  # (key, rows) -> batch, global, in runner.batch_sh
    runner: Runner
    evaluate: Any = None  # (state, eval rows) -> eval metrics (fine-tuning); None: `evaluate`


def compile_run(rc: RunConfig, s: Setup) -> Compiled:
    """The objective jitted onto the batch shardings, and the step on the run's mesh."""
    rows = {k: jax.ShapeDtypeStruct((rc.batch_size, s.objective.row_len), np.int32)
            for k in s.rows_sharding}
    batch_like = jax.eval_shape(s.objective, jax.random.key(0), rows)
    runner = make_runner(s.cfg, s.hp, s.mesh, batch_like, rc.parallel, s.rules)
    return Compiled(jax.jit(s.objective, out_shardings=runner.batch_sh), runner)


def initial_state(rc: RunConfig, s: Setup,
                  ckpt: Checkpointer) -> tuple[Any | None, int, list[tuple[int, str]]]:
    """(state, step, damaged): the newest intact checkpoint, checked against this run and
    placed on this run's mesh (whatever mesh saved it), or (None, 0, []) for a new run;
    `damaged` lists the newer checkpoints passed over as (step, why). It needs no compiled
    step, so a refused resume is refused before compiling, and it changes nothing on disk."""
    if ckpt.latest_step() is None:
        if rc.resume and hosts.is_primary():
            print(f"warning: --resume: no checkpoint in {ckpt.directory}; starting a new run at "
                  f"step 0", file=sys.stderr, flush=True)
        return None, 0, []
    vet = lambda record, where: check_record(record, s.record, str(where))
    state, start, record, damaged = ckpt.restore_intact(abstract_state(s.cfg, s.hp), s.mesh, s.rules, vet)
    s.pipeline.set_position(record["data"])
    return state, start, damaged


def source_params(rc: RunConfig, cfg: zoo.Config) -> dict[str, Any] | None:
    """--init-from DIR: the params of DIR's latest checkpoint in `cfg`'s param dtype, or None
    without it. They must fit `cfg` (DIR's Config with this run's model fields over it): the
    same tree and shapes, so only fields that leave the params alone may change (max_len and
    the rope_* fields of a RoPE model, dropout, attention ...); a ValueError names the first
    tensor that differs."""
    if rc.init_from is None:
        return None
    src = Path(rc.init_from)
    if not (src / "config.json").is_file() or not (src / "checkpoints").is_dir():
        raise FileNotFoundError(f"--init-from {src}: no config.json and checkpoints/ there; expected "
                                f"the run dir of a `python -m train` run that saved a checkpoint")
    from train.sample import restore_params
    from zoo.nnx import check_params

    src_cfg = zoo.Config.from_json((src / "config.json").read_text())
    params, step = restore_params(src / "checkpoints", src_cfg)
    try:
        check_params(cfg, params, f"--init-from {src}")
    except ValueError as e:
        raise ValueError(f"{e}; change only model fields that keep the params' shapes (for a RoPE "
                         f"model: max_len, rope_scaling and the rope_* fields)") from None
    if hosts.is_primary():
        print(f"initialised from {src} (checkpoint {step}); the optimizer starts afresh", flush=True)
        _check_original_length(src, src_cfg, cfg)
    want = jax.eval_shape(lambda key: zoo.init(cfg, key), jax.random.key(0))
    return jax.tree.map(lambda x, like: x.astype(like.dtype), params, want)


def _check_original_length(src: Path, src_cfg: zoo.Config, cfg: zoo.Config) -> None:
    """Warns when a RoPE scaling that reads the pre-scaling context (yarn, llama3, longrope)
    is added with a rope_original_max_len other than the length `src` was trained at (its
    default, 8192, is rarely that)."""
    trained = read_json(src / "run.json").get("seq_len")
    if (cfg.rope_scaling in ("yarn", "llama3", "longrope") and src_cfg.rope_scaling is None
            and trained and cfg.rope_original_max_len != trained):
        print(f"warning: rope_scaling={cfg.rope_scaling} stretches the frequencies from "
              f"rope_original_max_len={cfg.rope_original_max_len}, but {src} was trained on rows of "
              f"{trained} tokens: set rope_original_max_len={trained}", file=sys.stderr, flush=True)


def evaluate(c: Compiled, state: Any, batches: list[dict], key: jax.Array) -> dict[str, float]:
    """Held-out loss, perplexity and accuracy over fixed batches (fixed objective keys)."""
    total = np.zeros(3)
    for i, rows in enumerate(batches):
        m = jax.device_get(c.runner.eval_step(state, c.objective(jax.random.fold_in(key, i), rows)))
        total += [m["loss"] * m["targets"], m["accuracy"] * m["targets"], m["targets"]]
    loss = total[0] / max(total[2], 1)
    return {"eval_loss": float(loss), "eval_perplexity": float(np.exp(loss)),
            "eval_accuracy": float(total[1] / max(total[2], 1))}


def _check_finite(step: int, metrics: dict[str, Any], ckpt: Checkpointer) -> None:
    """NotFinite naming `step` when its loss or gradient norm is NaN or inf."""
    got = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm") if k in metrics})
    bad = {k: float(v) for k, v in got.items() if not np.isfinite(v)}
    if bad:
        what = " and the ".join(f"{k.replace('_', ' ')} is {v}" for k, v in bad.items())
        last = ckpt.last_saved()
        kept = f"checkpoint {last} holds the last finite state" if last else "no checkpoint was saved"
        raise NotFinite(f"the {what} at step {step}: stopped without saving it; {kept}. Resuming would "
                        f"repeat it: start a new --run-dir with a lower --lr or a longer warmup")


def train_loop(rc: RunConfig, s: Setup, c: Compiled, ckpt: Checkpointer, state: Any, start: int,
               reporter: Reporter) -> tuple[Any, int | None]:
    """Steps start..rc.steps; returns (state, the signal that stopped it or None). Raises
    NotFinite at the first step whose loss or gradient norm is NaN or inf (checked one step
    late, and before every save, so no checkpoint holds a non-finite state)."""
    keys = jax.random.split(jax.random.key(rc.seed), 2)  # [train objective, eval objective]
    put = lambda rows: _put(rows, s.rows_sharding, rc.batch_size)
    eval_rows = [put(r) for r in s.pipeline.eval_batches(rc.eval_batches)]
    unchecked = None  # (step, metrics) of the step before, checked once this one is queued
    with _Signals(jax.process_count()) as signals:
        for step in range(start, rc.steps):
            rows = put(s.pipeline.next_batch())
            state, metrics = c.runner.step(state, c.objective(jax.random.fold_in(keys[0], step), rows))
            reporter.flush()  # the previous step's metrics, now that this step is queued
            if unchecked is not None:
                _check_finite(*unchecked, ckpt)
            done = step + 1
            unchecked = (done, metrics)
            extra = {}
            if done % rc.eval_interval == 0 or done == rc.steps:
                with reporter.paused(state):
                    extra = (c.evaluate(state, eval_rows) if c.evaluate is not None
                             else evaluate(c, state, eval_rows, keys[1]))
            if extra or done % rc.log_interval == 0 or done == rc.steps:
                reporter.queue(done, metrics, extra)
            stop = signals.stop(done) is not None
            if stop or done % rc.checkpoint_every == 0 or done == rc.steps:
                # The save waits for this step anyway: its metrics row goes to disk first, so
                # metrics.jsonl holds every step up to the newest checkpoint.
                reporter.flush()
                _check_finite(*unchecked, ckpt)
                unchecked = None
                record = {**s.record, "data": s.pipeline.position, "step": done}
                ckpt.save(done, c.runner.global_state(state), record, force=True)
            if stop:
                return state, signals.received
    reporter.flush()
    if unchecked is not None:
        _check_finite(*unchecked, ckpt)
    return state, None


def _describe(rc: RunConfig, s: Setup, peak_note: str) -> str:
    shape = "".join(f" {k}={v}" for k, v in rc.overrides.items())
    mesh = {k: v for k, v in s.mesh.shape.items() if v > 1} or {"data": 1}
    procs = f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (f"model {rc.model}{shape} ({s.cfg.family}, {zoo.param_count(s.cfg) / 1e6:.2f}M params, "
            f"vocab {s.cfg.vocab_size}) | objective {s.record['objective']} | batch "
            f"{rc.batch_size} x {rc.seq_len} | {len(s.pipeline.train_rows)} train rows "
            f"({s.pipeline.epoch_steps} steps/epoch) | {rc.parallel} on mesh {mesh}{procs} | "
            f"MFU peak: {peak_note}")


@contextlib.contextmanager
def _holding(run_dir: Path) -> Iterator[None]:
    """The run dir's lock, held by process 0 for the whole job; when it is refused, every
    process stops (the others learn it from process 0)."""
    lock, refused = None, None
    if hosts.is_primary():
        try:
            lock = RunLock(run_dir).acquire()
        except Locked as e:
            refused = e
    if jax.process_count() > 1:
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
        if not ok and refused is None:
            refused = Locked(f"{run_dir}: process 0 could not lock the run dir (its output says "
                             f"who holds it)")
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _start_writing(rc: RunConfig, s: Setup, run_dir: Path, ckpt: Checkpointer, start: int,
                   damaged: list[tuple[int, str]]) -> None:
    """Every check has passed: only now does the run dir change. Process 0 writes the run
    files (atomically); damaged checkpoints are moved aside so the run can save those
    steps again and rotation never counts them."""
    primary = hosts.is_primary()
    if primary:
        write_atomic(run_dir / "run.json", json.dumps(rc.to_dict(), indent=2))
        write_atomic(run_dir / "config.json", s.cfg.to_json())
        cached = run_dir / "tokenizer.model"
        if rc.tokenizer and (not cached.is_file() or cached.read_bytes() != s.tokenizer.model_proto):
            write_atomic(cached, s.tokenizer.model_proto)
    moved = [ckpt.set_aside(step) for step, _ in damaged]
    if primary and damaged:
        which = "; ".join(f"checkpoint {step} is damaged ({why})" for step, why in damaged)
        print(f"warning: {which}; resuming from checkpoint {start}, the newest intact one "
              f"(moved aside: {', '.join(p.name for p in moved)})", file=sys.stderr, flush=True)
    if primary and start:
        print(f"resumed {rc.run_dir} at step {start}", flush=True)


def run(rc: RunConfig) -> dict[str, Any]:
    """Trains as `rc` says; returns {"steps", "loss", "eval_loss", "interrupted", "signal"}.
    Nothing in the run dir changes until every check has passed (run.json is the first
    file written then), and a run dir this call created is removed again when the run
    fails before that."""
    run_dir = Path(rc.run_dir)
    return in_run_dir(run_dir, lambda: _run_locked(rc, run_dir))


def in_run_dir(run_dir: Path, job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs `job` holding the run dir's lock (`python -m train`, `finetune`); a run dir this
    call created is removed again when the job fails before writing run.json."""
    created = not run_dir.exists()
    try:
        with _holding(run_dir):
            return job()
    except BaseException:
        if created and hosts.is_primary() and not (run_dir / "run.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _run_locked(rc: RunConfig, run_dir: Path) -> dict[str, Any]:
    primary = hosts.is_primary()
    ckpt = Checkpointer(run_dir / "checkpoints", rc.checkpoint_every, rc.keep)
    try:
        latest = ckpt.latest_step()
        if latest is not None and not rc.resume:
            raise RunError(f"{run_dir} already holds a run (checkpoints up to step {latest}): pass "
                           f"--resume to continue it, or choose another --run-dir")
        # run.json holds the warmup that Hparams derived from the steps (and the objective
        # and seq_len RunConfig derived from the model), so `--resume --steps N` extends
        # the run without changing them.
        s = setup(rc, run_dir)
        state, start, damaged = initial_state(rc, s, ckpt)
        params = source_params(rc, s.cfg) if state is None else None  # --init-from: a new run only
        compiled = compile_run(rc, s)
        state = compiled.runner.init(rc.seed, params) if state is None else state
        _start_writing(rc, s, run_dir, ckpt, start, damaged)
        flops = train_flops(s.cfg, rc.seq_len, s.objective.target_len) * rc.batch_size
        peak, peak_note = peak_flops(list(s.mesh.devices.flat), rc.peak_flops)
        if primary:
            print(_describe(rc, s, peak_note), flush=True)
        if jax.process_count() > 1:  # every process says which rows it loads
            per = rc.batch_size // s.pipeline.process_count
            first = s.pipeline.process_index * per
            print(f"process {jax.process_index()} of {jax.process_count()}: "
                  f"{jax.local_device_count()} devices, loads rows {first}..{first + per - 1} of "
                  f"each global batch of {rc.batch_size}", flush=True)
        t0 = time.time()
        log = MetricsLog(run_dir, start, enabled=primary)
        reporter = Reporter(log, Progress(rc.steps, flops, peak, enabled=primary), flops, peak, rc.steps)
        try:
            state, stopped_by = train_loop(rc, s, compiled, ckpt, state, start, reporter)
        finally:
            log.close()
        ckpt.wait()
        steps_saved = ckpt.all_steps()
    except BaseException as e:
        with contextlib.suppress(Exception):
            ckpt.close()  # the first error is the one to report
        if isinstance(e, OSError) and is_disk_full(e):
            raise WriteFailed(f"no space left on device while writing {e.filename or 'the run files'} "
                              f"in {run_dir}; {ckpt.intact_note()}; free space and --resume") from None
        raise
    ckpt.close()
    hosts.barrier("metrics written")  # process 0 has closed metrics.jsonl
    bad: list = []
    rows = read_metrics(run_dir / "metrics.jsonl", bad)
    if bad and primary:
        print(f"warning: {run_dir / 'metrics.jsonl'}: {len(bad)} lines are not this run's rows "
              f"(line {bad[0][0]}: {bad[0][1]}); another writer?", file=sys.stderr, flush=True)
    if rows and primary:
        plot_losses(rows, run_dir / "loss.png")
    if stopped_by is not None and primary:
        print(f"stopped by {signal.Signals(stopped_by).name}; checkpoint saved at step "
              f"{int(jax.device_get(state.step))}", flush=True)
    if primary:
        print(summary(rows, run_dir, time.time() - t0, stopped_by is not None, steps_saved, peak_note),
              flush=True)
    evals = [r for r in rows if "eval_loss" in r]
    return {"steps": rows[-1]["step"] if rows else start, "loss": rows[-1]["loss"] if rows else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "interrupted": stopped_by is not None, "signal": stopped_by}


def main(argv: list[str] | None = None) -> int:
    """CLI entry; the exit status is one of train.rundir's (README "Stopping and resuming"):
    0 done, 2 usage error, 3 damaged, 4 run dir in use, 5 write failed (disk full), 6 loss
    not finite, 128 + signal when stopped by one. Each error is one line on stderr. The
    multi-process flags (or JAX_COORDINATOR_ADDRESS ...) join the job first."""
    from train.cli import launch_flags, resolve
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    try:
        hosts.start(hosts.launch_from(launch_flags(argv)))
        rc = resolve(argv)
        result = run(rc)
    except RunStop as e:  # before CheckpointError: a damaged checkpoint is not a usage error
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError, RunError, CheckpointError, zoo.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 128 + result["signal"] if result["interrupted"] else EXIT_DONE
