"""Huge pages for the host memory of XLA:CPU programs.

XLA allocates an execution's temporaries afresh on every call, as one block (close to a
gigabyte for the CPU benchmark's training step). glibc serves a block that size with `mmap`
and unmaps it on free, so every step the kernel faults it in and zeroes it again, 4 KiB at a
time. glibc's `hugetlb` tunable advises its mappings for transparent huge pages, so the same
block comes in 2 MiB at a time: far fewer faults and a shorter step, for any JAX program,
zoo's or not (measured in bench/RESULTS.md, "Huge pages for XLA's host temporaries").
Tunables are read when a process starts, so the command-line entry points
(`python -m train`, `python -m bench`) restart themselves with it first thing; elsewhere
(notebooks, your own scripts) set it before starting Python:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py

It applies where it can help: Linux with glibc and transparent huge pages in "madvise" mode
(with "always" every mapping gets huge pages already; with "never" none can).
ZOO_HUGE_PAGES=0 turns the restart off.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "ZOO_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_mode(path: Path = THP_MODE) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None where
    there is none to read (not Linux)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def restart_helps(env: Mapping[str, str], mode: str | None, libc: str) -> bool:
    """Whether restarting with the tunable changes anything: glibc, "madvise" mode, the
    tunable not already set, not turned off with ZOO_HUGE_PAGES=0."""
    return (libc == "glibc" and mode == "madvise" and env.get(OPT_OUT) != "0"
            and TUNABLE not in env.get("GLIBC_TUNABLES", "").split(":"))


def with_tunable(env: Mapping[str, str]) -> dict[str, str]:
    """env with the tunable added to any GLIBC_TUNABLES already there."""
    current = env.get("GLIBC_TUNABLES", "")
    return {**env, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def restart_with_huge_pages() -> None:
    """Replaces this process with the same interpreter and arguments (`sys.orig_argv`) under
    the tunable when `restart_helps`; otherwise returns. Call it first in a `__main__`, before
    threads start or output is written: the process image is replaced, not forked."""
    if not restart_helps(os.environ, huge_page_mode(), platform.libc_ver()[0]):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, with_tunable(os.environ))


if __name__ == "__main__":  # `python -m train.hostmem`: restart if it helps, then report
    restart_with_huge_pages()
    print(f"transparent huge pages: {huge_page_mode()}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")
