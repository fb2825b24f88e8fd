"""train.hostmem: when the entry points restart under glibc's hugetlb tunable, and that the
restart keeps the interpreter and arguments."""

import os
import platform
import subprocess
import sys

from train import hostmem


def test_restart_only_where_it_changes_something():
    helps = lambda env, mode="madvise", libc="glibc": hostmem.restart_helps(env, mode, libc)
    assert helps({})
    assert helps({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not helps({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + hostmem.TUNABLE})
    assert not helps({"ZOO_HUGE_PAGES": "0"})
    assert not helps({}, mode="always") and not helps({}, mode="never") and not helps({}, mode=None)
    assert not helps({}, libc="") and not helps({}, libc="musl")


def test_the_tunable_joins_those_already_set():
    assert hostmem.with_tunable({})["GLIBC_TUNABLES"] == hostmem.TUNABLE
    env = hostmem.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{hostmem.TUNABLE}", "X": "1"}


def test_huge_page_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem.huge_page_mode(path) == "madvise"
    assert hostmem.huge_page_mode(tmp_path / "missing") is None


def test_the_module_entry_point_restarts_itself_with_the_tunable():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ZOO_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-m", "train.hostmem"], env=env, capture_output=True,
                         text=True, check=True).stdout
    expected = hostmem.restart_helps(env, hostmem.huge_page_mode(), platform.libc_ver()[0])
    assert (hostmem.TUNABLE in out) == expected
    off = subprocess.run([sys.executable, "-m", "train.hostmem"], env={**env, "ZOO_HUGE_PAGES": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert hostmem.TUNABLE not in off
