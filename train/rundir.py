"""A run directory that survives damage: exit codes, atomic run files, validated reads, and
the lock that keeps one job per run dir.

Every run file (run.json, config.json, a rewritten metrics.jsonl) is written to a temporary
file beside it and renamed over it, so a kill leaves the old file or the new one, never a
part. The lock is `RUN_DIR/lock`, held with `flock` by process 0 of the job: the kernel drops
it when that process dies, so a run killed by SIGKILL never blocks the next one, and the file
names the holder (host, pid) for the message a second writer gets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

# Exit status of `python -m train` (README "Stopping and resuming"); 128 + N: stopped by signal N.
EXIT_DONE = 0
EXIT_USAGE = 2  # bad flags or settings, or a run dir that holds another run
EXIT_DAMAGED = 3  # no intact checkpoint to resume from, or a run file that cannot be read
EXIT_LOCKED = 4  # another process is using the run dir
EXIT_WRITE = 5  # a checkpoint or run file could not be written (disk full)
EXIT_NOT_FINITE = 6  # the loss (or the state) stopped being finite


class RunStop(RuntimeError):
    """A run that cannot go on; `exit_code` is its exit status."""

    exit_code = EXIT_USAGE


class Damaged(RunStop):
    exit_code = EXIT_DAMAGED


class Locked(RunStop):
    exit_code = EXIT_LOCKED


class WriteFailed(RunStop):
    exit_code = EXIT_WRITE


class NotFinite(RunStop):
    exit_code = EXIT_NOT_FINITE


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or anything it was raised from) says the disk or quota is full; TensorStore
    reports it as text ("[OS error 28: No space left on device]")."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def first_line(e: BaseException, limit: int = 200) -> str:
    """A one-line reason for `e`: the first line of the innermost error it was raised from
    (orbax wraps TensorStore's precise error in one that quotes a whole spec)."""
    seen = {id(e)}
    while (inner := e.__cause__ or (None if e.__suppress_context__ else e.__context__)) is not None \
            and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    text = (str(e).strip().splitlines() or [""])[0].strip()
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- files ----------------------------------------------------------------------------------

def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Writes `data` to `path` through a temporary file and a rename: readers (and a run
    killed mid-write) see the old content or the new, never a part. OSError passes on."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_json(path: str | Path, kind: type = dict) -> Any:
    """The JSON value in `path`, of type `kind`; Damaged names the file, the line and what
    is wrong (an empty file, a cut-off one, garbage, another type)."""
    path = Path(path)
    text = path.read_text(errors="replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        what = "is empty" if not text.strip() else f"line {e.lineno}: {e.msg}"
        raise Damaged(f"{path} {what}: the file is damaged; restore it from a copy, or move it "
                      f"away and give the run's settings as flags") from None
    if not isinstance(value, kind):
        raise Damaged(f"{path} line 1: expected a JSON {'object' if kind is dict else kind.__name__}, "
                      f"got {type(value).__name__}: the file is damaged")
    return value


# --- the lock -------------------------------------------------------------------------------

class RunLock:
    """`RUN_DIR/lock`, held with flock while a run writes the run dir.

    acquire() raises Locked naming the holder when a live process holds it. A lock left by a
    process that died is free (the kernel released it) and is taken over. release() removes
    the file. Where the file system has no flock, a lock whose holder is a dead process on
    this host is taken over, and one held from another host is refused with how to clear it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Locked(self._refusal(self._holder())) from None
            except OSError:  # no flock here (some network file systems): go by the pid
                holder = self._holder()
                if holder and _alive(holder):
                    os.close(fd)
                    raise Locked(self._refusal(holder)) from None
            # Another process may have released and removed the file between our open and
            # our flock: then we hold a lock on a file nobody else can see; open it again.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        return self

    def release(self) -> None:
        """Removes the lock file while still holding it, then lets go."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refusal(self, holder: dict[str, Any]) -> str:
        who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}" if holder
               else "another process")
        since = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}"
                 if isinstance(holder.get("since"), (int, float)) else "")
        return (f"{self.path.parent} is in use by {who}{since}: wait for it to finish or stop it; "
                f"two runs writing one run dir would corrupt it (if that process is gone, "
                f"delete {self.path})")


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder may still run: a dead pid on this host is not; a holder on
    another host cannot be checked from here and counts as alive."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def locked(run_dir: str | Path, enabled: bool = True) -> Iterator[RunLock | None]:
    """Holds the run dir's lock inside (when `enabled`: process 0 of a job)."""
    if not enabled:
        yield None
        return
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()


__all__ = ["EXIT_DONE", "EXIT_USAGE", "EXIT_DAMAGED", "EXIT_LOCKED", "EXIT_WRITE", "EXIT_NOT_FINITE",
           "RunStop", "Damaged", "Locked", "WriteFailed", "NotFinite", "RunLock", "locked",
           "write_atomic", "read_json", "is_disk_full", "first_line"]
