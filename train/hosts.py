"""One training job over several processes (hosts): start-up, and the few things that only
process 0 does.

Every process runs the same program (`python -m train ...` with the same flags, plus its own
`--process-id`); `jax.distributed.initialize` joins them so `jax.devices()` lists every
process's devices and one jitted step spans them all. Files that are shared by the run
(the tokenizer, the token cache, run.json, metrics.jsonl) are written by process 0 while the
others wait at a barrier and then read them, so the run dir must be on storage every host
sees (as orbax checkpoints need anyway).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Mapping, TypeVar

import jax
from jax.experimental import multihost_utils

T = TypeVar("T")

# Flag -> environment variable read when the flag is not given.
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the job. coordinator: "HOST:PORT" of process 0's coordinator
    service, or "auto" (cluster auto-detection: Cloud TPU, SLURM, Open MPI, Kubernetes);
    local_devices: CPU devices this process creates (for tests and demos on one machine)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_devices: int | None = None

    @property
    def distributed(self) -> bool:
        return self.coordinator is not None or (self.num_processes or 1) > 1


def launch_from(flags: Mapping[str, object], environ: Mapping[str, str] = os.environ) -> Launch:
    """A Launch from parsed flags, falling back on JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID. Raises ValueError on malformed values."""
    values: dict[str, object] = {}
    for name in ("coordinator", "num_processes", "process_id", "local_devices"):
        value = flags.get(name)
        if value is None and name in ENV and environ.get(ENV[name]):
            value = environ[ENV[name]]
            if name != "coordinator":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"{ENV[name]}={value!r}: expected an integer") from None
        values[name] = value
    launch = Launch(**values)  # type: ignore[arg-type]
    _check(launch)
    return launch


def _check(launch: Launch) -> None:
    c, n, i, k = launch.coordinator, launch.num_processes, launch.process_id, launch.local_devices
    if c is not None and c != "auto" and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", c):
        raise ValueError(f"--coordinator: expected HOST:PORT (e.g. 10.0.0.1:1234) or 'auto', got {c!r}")
    if n is not None and n < 1:
        raise ValueError(f"--num-processes: expected a positive integer, got {n}")
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise ValueError(f"--process-id: expected 0 <= id < --num-processes ({n}), got {i}")
    if k is not None and k < 1:
        raise ValueError(f"--local-devices: expected a positive integer, got {k}")
    if (n or 1) > 1 and c is None:
        raise ValueError(f"--num-processes {n}: also give --coordinator HOST:PORT (process 0's "
                         f"address) or set JAX_COORDINATOR_ADDRESS")
    if c not in (None, "auto") and (n is None or i is None):
        raise ValueError("--coordinator HOST:PORT: also give --num-processes and --process-id "
                         "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")


def start(launch: Launch, timeout_s: int = 300) -> None:
    """Applies `launch` before JAX starts its backend: CPU device count, then
    `jax.distributed.initialize`. Raises ValueError when JAX has already started."""
    try:
        if launch.local_devices is not None:
            jax.config.update("jax_num_cpu_devices", launch.local_devices)
        if launch.distributed:
            # gloo: cross-process collectives on CPU (GPUs and TPUs use their own).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            _join(launch, timeout_s)
    except RuntimeError as e:
        if "before" not in str(e):  # not "must be called before ... backend": pass it on
            raise
        if launch.local_devices is not None and jax.local_device_count() == launch.local_devices \
                and not launch.distributed:
            return  # already started with that many devices (say, called twice in one process)
        raise ValueError("--local-devices / multi-process flags must take effect before JAX "
                         "starts: pass them to `python -m train`, not to a process that has "
                         "already run JAX code") from e


def _join(launch: Launch, timeout_s: int) -> None:
    """jax.distributed.initialize; a coordinator that cannot be reached is a ValueError."""
    where = (f"the job at {launch.coordinator} as process {launch.process_id} of "
             f"{launch.num_processes}" if launch.coordinator != "auto" else "the cluster's job")
    try:
        if launch.coordinator == "auto":
            jax.distributed.initialize(initialization_timeout=timeout_s)
        else:
            jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                       initialization_timeout=timeout_s)
    except RuntimeError as e:
        if "before" in str(e):
            raise
        raise ValueError(f"could not join {where} within {timeout_s}s: {e}") from e
    except Exception as e:  # the coordinator client raises XLA's own error types
        raise ValueError(f"could not join {where} within {timeout_s}s: {e}") from e


def is_primary() -> bool:
    """Process 0 writes the run's shared files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def primary_first(name: str, fn: Callable[[], T]) -> T:
    """Runs `fn` on process 0, then on the others once it is done: process 0 writes what
    `fn` makes (a tokenizer, a cache), and the others find it and read it."""
    out = fn() if is_primary() else None
    barrier(name)
    return fn() if not is_primary() else out  # type: ignore[return-value]
