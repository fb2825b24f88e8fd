"""What a run shows and writes: FLOPs and MFU, the progress line, metrics.jsonl (and
TensorBoard when installed), the loss-curve PNG and the summary."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax

from train.rundir import write_atomic
from zoo.flops import train_flops  # noqa: F401  the one FLOP counter, for the MFU

# Peak dense bf16 FLOP/s per device, by a substring of `device.device_kind`.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
              "V100": 125e12, "T4": 65e12, "v6": 918e12, "v5p": 459e12, "v5 lite": 197e12,
              "v5e": 197e12, "v4": 275e12, "v3": 123e12, "v2": 45e12}
# CPU: a rough figure, 50 GFLOP/s per core (fp32 FMA at a few GHz, well below AVX-512 peak).
CPU_FLOPS_PER_CORE = 50e9


def peak_flops(devices: list[jax.Device], override: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of all `devices` together, where the figure comes from)."""
    if override:
        return override * len(devices), f"--peak-flops {override:.3g}/device"
    d = devices[0]
    if d.platform == "cpu":
        cores = os.cpu_count() or 1
        note = f"rough CPU peak {CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s x {cores} cores"
        return CPU_FLOPS_PER_CORE * cores, note
    flops = spec_peak(d.device_kind)
    if flops is not None:
        return flops * len(devices), f"{d.device_kind} bf16 peak {flops / 1e12:.0f} TFLOP/s x {len(devices)}"
    return None, f"unknown peak for {d.device_kind}; pass --peak-flops"


def spec_peak(device_kind: str) -> float | None:
    """The published dense bf16 FLOP/s of one device of this `device_kind` (PEAK_FLOPS), or None."""
    for key, flops in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return flops
    return None


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class Progress:
    """One line per logged step: step, loss, accuracy, tokens/s, MFU, ETA. On a terminal the
    line is rewritten in place with a bar; otherwise a line is printed at most every 2 s."""

    def __init__(self, total: int, flops_per_step: float, peak: float | None, stream=None,
                 enabled: bool = True):
        stream = stream or sys.stdout
        self.enabled = enabled  # False: silent (processes other than 0 of a multi-process run)
        self.total, self.flops, self.peak, self.stream = total, flops_per_step, peak, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last_print = 0.0

    def line(self, row: dict[str, Any]) -> str:
        step = row["step"]
        frac = step / self.total
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
        eta = _duration(row.get("eta_s", 0))
        extra = f" | eval {row['eval_loss']:.3f}" if "eval_loss" in row else ""
        return (f"[{bar}] step {step}/{self.total} | loss {row['loss']:.4f} | acc {row['accuracy']:.3f}"
                f"{extra} | {_si(row.get('tokens_per_s', 0))} tok/s | MFU {mfu} | ETA {eta}")

    def show(self, row: dict[str, Any], force: bool = False) -> None:
        now = time.time()
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self.line(row) + "\033[K")
            self.stream.flush()
        elif force or now - self._last_print >= 2.0 or row["step"] == self.total:
            print(self.line(row), file=self.stream, flush=True)
            self._last_print = now

    def newline(self) -> None:
        if self.tty and self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard when installed.
    With enabled=False (processes other than 0) it writes nothing.

    Opening it keeps the rows up to `start` (the step the run starts from; the run writes
    the later ones again) and rewrites the file atomically; lines that are not valid rows
    are moved to metrics.jsonl.bad with one warning, never dropped."""

    def __init__(self, run_dir: Path, start: int, enabled: bool = True, warn: Any = None):
        self.path = run_dir / "metrics.jsonl"
        self._file, self._tb = None, None
        if not enabled:
            return
        self._truncate(start, warn or _warn)
        self._file = open(self.path, "a")
        self._tb = _tensorboard(run_dir / "tensorboard")

    def _truncate(self, step: int, warn: Any) -> None:
        """Keeps the rows up to `step`; bad lines go to metrics.jsonl.bad first, so a kill
        at any point loses nothing."""
        if not self.path.exists():
            return
        bad: list[tuple[int, str, str]] = []
        kept = [line for line, row in _scan(self.path, bad) if row["step"] <= step]
        if bad:
            aside = self.path.with_name(self.path.name + ".bad")
            with open(aside, "a") as f:
                f.writelines(text + "\n" for _, _, text in bad)
                f.flush()
                os.fsync(f.fileno())
            lines = ", ".join(str(n) for n, _, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
            warn(f"{self.path} line{'s' if len(bad) > 1 else ''} {lines} cannot be read "
                 f"(line {bad[0][0]}: {bad[0][1]}); kept in {aside.name}")
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _tensorboard(path: Path):
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            writer = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
            return writer(str(path))
        except Exception:  # not installed, or a broken install: TensorBoard is optional
            continue
    return None


def _row_problem(row: Any, previous: int) -> str | None:
    """Why `row` is not a metrics row following step `previous`, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        return f'"step" is {step!r}, expected a positive integer'
    if step <= previous:
        return f"step {step} after step {previous}: out of order"
    if "loss" not in row:
        return 'no "loss"'
    for k, v in row.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f'"{k}" is {v!r}, expected a number'
    return None


def _scan(path: Path, bad: list | None) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of each valid row of a metrics.jsonl; each other line is appended to
    `bad` as (line number, why, text)."""
    text = path.read_text(errors="replace")
    out, previous = [], 0
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            why = _row_problem(row, previous)
        except json.JSONDecodeError as e:
            cut = number == len(lines)  # no newline after it: the writer was stopped mid-line
            why = "cut off (the run stopped while writing it)" if cut else f"not JSON ({e.msg})"
        if why is None:
            out.append((line, row))
            previous = row["step"]
        elif bad is not None:
            bad.append((number, why, line))
    return out


def read_metrics(path: str | Path, bad: list | None = None) -> list[dict[str, Any]]:
    """The valid rows of a metrics.jsonl, in order; the other lines (a line cut short by a
    kill, garbage, a row out of order or of the wrong types) are left out and, when `bad`
    is a list, appended to it as (line number, why, text)."""
    path = Path(path)
    if not path.exists():
        return []
    return [row for _, row in _scan(path, bad)]


def plot_losses(rows: list[dict[str, Any]], path: Path) -> bool:
    """loss.png: train loss (and held-out loss) by step; False without matplotlib."""
    try:
        # A bare Figure (no pyplot) draws off-screen without switching the process's backend,
        # so a notebook that calls run() keeps showing its own plots.
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def summary(rows: list[dict[str, Any]], run_dir: Path, seconds: float, interrupted: bool,
            checkpoints: list[int], peak_note: str) -> str:
    """The closing report: losses, speed, what the run dir holds, how to go on."""
    if not rows:
        return f"no steps run; run dir {run_dir}"
    first, last = rows[0], rows[-1]
    ev = [r for r in rows if "eval_loss" in r]
    speed = [r["tokens_per_s"] for r in rows[len(rows) // 2:] if r.get("tokens_per_s")]
    mfu = [r["mfu"] for r in rows[len(rows) // 2:] if r.get("mfu") is not None]
    status = "interrupted" if interrupted else "done"
    lines = [f"{status} at step {last['step']} after {_duration(seconds)}",
             f"  train loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f}"
             f" (step {last['step']}), accuracy {last['accuracy']:.3f}"]
    if ev:
        lines.append(f"  held-out loss {ev[-1]['eval_loss']:.4f}, perplexity {ev[-1]['eval_perplexity']:.2f}"
                     f" (step {ev[-1]['step']})")
    if speed:
        m = f", MFU {100 * sum(mfu) / len(mfu):.1f}% ({peak_note})" if mfu else ""
        lines.append(f"  {_si(sum(speed) / len(speed))} tokens/s{m}")
    png = ", loss.png" if (run_dir / "loss.png").exists() else ""
    lines.append(f"  run dir {run_dir}: checkpoints/ (steps {checkpoints}), tokenizer.model, "
                 f"run.json, config.json, metrics.jsonl{png}")
    lines.append(f"  continue: python -m train --resume --run-dir {run_dir} [--steps N]")
    return "\n".join(lines)


def mfu(flops_per_step: float, seconds_per_step: float, peak: float | None) -> float | None:
    if not peak or seconds_per_step <= 0 or not math.isfinite(seconds_per_step):
        return None
    return flops_per_step / seconds_per_step / peak


class Reporter:
    """Turns step metrics into rows: fetched one step late (so the host never waits on the
    step it just queued), timed per step with evaluation time left out, then written to the
    metrics log and shown on the progress line."""

    def __init__(self, log: MetricsLog, progress: Progress, flops_per_step: float,
                 peak: float | None, total: int):
        self.log, self.progress, self.total = log, progress, total
        self.flops, self.peak = flops_per_step, peak
        self._pending: tuple[int, Any, dict] | None = None
        self._last: tuple[int, float] | None = None  # (step, time) of the last row
        self._per_step: float | None = None
        self._paused = 0.0
        self._t0 = time.time()

    def queue(self, step: int, metrics: Any, extra: dict[str, Any]) -> None:
        self._pending = (step, metrics, extra)

    @contextlib.contextmanager
    def paused(self, state: Any):
        """Time inside is not step time (evaluation); waits for the queued step first."""
        jax.block_until_ready(state)
        start = time.time()
        try:
            yield
        finally:
            self._paused += time.time() - start

    def flush(self) -> None:
        if self._pending is None:
            return
        step, metrics, extra = self._pending
        self._pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        row = {"step": step, **m, **extra}
        if self._last is not None:
            dt = (now - self._last[1] - self._paused) / max(step - self._last[0], 1)
            self._per_step = dt if self._per_step is None else 0.8 * self._per_step + 0.2 * dt
            row["tokens_per_s"] = m["tokens"] / dt if dt > 0 else None
            row["mfu"] = mfu(self.flops, dt, self.peak)
        self._last, self._paused = (step, now), 0.0
        row["eta_s"] = (self.total - step) * (self._per_step or 0.0)
        row["time_s"] = now - self._t0
        self.log.write(row)
        self.progress.show(row, force="eval_loss" in row)
        if step == self.total:
            self.progress.newline()
