"""One `python -m bench` row for two source trees, alternating in one run, so that a change is
measured against its parent under the same load:

    git worktree add /tmp/before <commit>
    python -m bench.paired --before /tmp/before [--after .] [--rounds 2] [--json out.json] \\
        -- train --remat minimal --iters 3

Each round runs `python -m bench ARGS` once in each tree (a process each, so nothing is
shared), in the order before, after, then after, before in the next round (ABBA), which
cancels a load that drifts steadily. Rows are the bench's zoo rows plus `tree` (before or
after), `commit`, `round` and `load` (the 1-minute load average when the process started).
The summary gives the median tokens/s of each tree and after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from bench import __main__ as bench_cli

COLUMNS = ("round", "tree", "commit", "load", "tokens_per_s", "mfu", "step_s", "compile_s", "peak_bytes")


def commit_of(tree: str) -> str:
    """The short commit a tree has checked out (with "+" when it has uncommitted changes)."""
    head = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return head + ("+" if dirty else "")


def run_bench(tree: str, bench_args: list[str]) -> dict[str, Any]:
    """The zoo row of `python -m bench bench_args` run in `tree` (its own zoo, train, bench)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tree's own packages
        subprocess.run([sys.executable, "-m", "bench", *bench_args, "--json", out], cwd=tree, env=env,
                       check=True)
        with open(out) as f:
            return json.load(f)[0]


def order(rounds: int) -> list[tuple[int, str]]:
    """(round, tree) in run order: before, after, after, before, ..."""
    out = []
    for r in range(rounds):
        trees = ("before", "after") if r % 2 == 0 else ("after", "before")
        out.extend((r, t) for t in trees)
    return out


def run(trees: dict[str, str], rounds: int, bench_args: list[str]) -> list[dict[str, Any]]:
    commits = {name: commit_of(path) for name, path in trees.items()}
    rows = []
    for r, name in order(rounds):
        load = os.getloadavg()[0]
        row = run_bench(trees[name], bench_args)
        rows.append({**row, "round": r, "tree": name, "commit": commits[name], "load": load})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median tokens/s of each tree and their ratio after / before."""
    med = {t: statistics.median(r["tokens_per_s"] for r in rows if r["tree"] == t) for t in ("before", "after")}
    return {"before_tokens_per_s": med["before"], "after_tokens_per_s": med["after"],
            "after_over_before": med["after"] / med["before"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the tree to compare against (a git worktree)")
    p.add_argument("--after", default=".", help="the tree with the change (default: this one)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None, help="write the rows and the summary here")
    args = p.parse_args(ours)
    if not bench_args or "--json" in bench_args or "--vs" in bench_args:
        p.error("give the bench's arguments after `--` (e.g. -- train --remat minimal), without --json or --vs")
    rows = run({"before": args.before, "after": args.after}, args.rounds, bench_args)
    result = summary(rows)
    print(f"device: {rows[0]['device']}  jax {rows[0]['jax']}  python -m bench {' '.join(bench_args)}")
    print(bench_cli.table(rows, COLUMNS))
    print(f"median tokens/s: before {result['before_tokens_per_s']:,.0f}, after "
          f"{result['after_tokens_per_s']:,.0f}, after / before {result['after_over_before']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": result, "bench_args": bench_args}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
