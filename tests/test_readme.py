"""The README's examples work as written.

Every ```python block runs by itself, as a reader who copies that one block runs it: in a
fresh Python process whose working directory is an empty temporary folder, with this
checkout importable (as after `pip install -e .`) and nothing else: no shared data, no other
block's variables. A block whose first line is `# needs 8 devices ...` runs with 8 fake CPU
devices (what a TPU v5e-8 host has); the others run as a one-device process. The comment
lines after a `# prints:` line are what the block prints: its stdout must be exactly those
lines (in order, all `# prints:` sections of the block together).

Every `python -m train ...` command of the ```bash blocks must parse into a run (flags,
`KEY=VALUE` settings, a ```yaml block named by its first line, `# NAME.yaml: COMMAND`),
without running it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_CPU_COMPILE

from train import export, finetune
from train.cli import resolve
from train.sample import parser as sample_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NEEDS_8 = re.compile(r"#\s*needs 8 devices\b")
PRINTS = "# prints:"
TIMEOUT_S = 600
# Shell variables the commands use for what differs per host: any valid value parses.
SHELL_VARS = {"NUM_HOSTS": "4", "HOST_INDEX": "1"}


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    section: str  # the heading above it, with the paragraph's bold lead if it has one
    code: str


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, each named by the section it is in."""
    out, heading, lead, fence = [], "top", "", None
    for line in text.splitlines():
        if fence is not None:
            if line.startswith("```"):
                out.append(Block(fence[0], _slug(heading + (" " + lead if lead else "")), "\n".join(fence[1])))
                fence = None
            else:
                fence[1].append(line)
        elif line.startswith("```"):
            fence = (line[3:].strip(), [])
        elif line.startswith("#"):
            heading, lead = line.lstrip("#").strip(), ""
        elif m := re.match(r"\*\*(.+?)\.?\*\*", line):
            lead = m.group(1)
    return out


def expected_output(code: str) -> list[str] | None:
    """The lines a block says it prints (the comments after `# prints:`), or None."""
    lines, expected, on = code.splitlines(), None, False
    for line in lines:
        if line.strip() == PRINTS:
            expected, on = expected or [], True
        elif on and line.startswith("#"):
            expected.append(line[2:] if line.startswith("# ") else line[1:])
        else:
            on = False
    return expected


def _ids(items: list[Block]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for b in items:
        seen[b.section] = seen.get(b.section, 0) + 1
        ids.append(b.section if seen[b.section] == 1 else f"{b.section}-{seen[b.section]}")
    return ids


ALL = blocks(README.read_text())
PYTHON = [b for b in ALL if b.lang == "python"]


def _env(devices: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ZOO_DATA_DIR")}
    env.update(extra, XLA_FLAGS=FAST_CPU_COMPILE)
    if devices > 1:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


def test_readme_has_python_blocks():
    assert len(PYTHON) >= 10, [b.section for b in PYTHON]
    first_lines = [b.code.splitlines()[0] for b in PYTHON]
    assert any(NEEDS_8.match(line) for line in first_lines), "no block runs on 8 devices"


def test_expected_output_parsing():
    code = "x = 1\nprint(x)\n# prints:\n# 1\n#\ny = 2  # a comment\n# not output\n"
    assert expected_output(code) == ["1", ""]
    assert expected_output("print(1)  # 1") is None


@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_python_block_runs(block: Block, tmp_path: Path, compile_cache_env: dict[str, str]):
    devices = 8 if NEEDS_8.match(block.code.splitlines()[0]) else 1
    script = tmp_path / "block.py"
    script.write_text(block.code + "\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(devices, compile_cache_env),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    where = f"README block in {block.section} ({devices} device(s))"
    assert done.returncode == 0, f"{where} failed:\n{block.code}\n--- stderr:\n{done.stderr[-4000:]}"
    expected = expected_output(block.code)
    if expected is not None:
        got = done.stdout.rstrip("\n").splitlines()
        assert [g.rstrip() for g in got] == [e.rstrip() for e in expected], \
            f"{where}: its `# prints:` comments differ from what it prints:\n{done.stdout}"


def _commands(items: list[Block]) -> list[list[str]]:
    """The argument lists of every `python -m train` command in bash blocks."""
    out = []
    for b in items:
        if b.lang != "bash":
            continue
        for line in b.code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", "train"]:
                args = [a for a in words[3:] if a != "&"]
                out.append([re.sub(r"\$(\w+)", lambda m: SHELL_VARS[m.group(1)], a) for a in args])
    return out


COMMANDS = _commands(ALL)


def test_readme_has_commands():
    assert len(COMMANDS) >= 10 and any(c[:1] == ["sample"] for c in COMMANDS)


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:60] or "main-job" for c in COMMANDS])
def test_train_command_parses(args: list[str], tmp_path: Path, monkeypatch):
    """Flags and settings resolve into a RunConfig (sample: its parser), as `python -m
    train` does before it trains; relative paths are not read."""
    monkeypatch.chdir(tmp_path)
    if args[:1] == ["sample"]:
        sample_parser().parse_args(args[1:])
    elif args[:1] == ["finetune"]:
        finetune.resolve(args[1:])
    elif args[:1] == ["export"]:
        export.export_parser().parse_args(args[1:])
    else:
        resolve(args)


def test_yaml_commands_parse(tmp_path: Path, monkeypatch):
    """The command in a yaml block's first line (`# t5.yaml: python -m train --config ...`)."""
    monkeypatch.chdir(tmp_path)
    found = 0
    for b in ALL:
        if b.lang == "yaml" and (m := re.match(r"#\s*(\S+\.ya?ml):\s*python -m train (.*)", b.code)):
            (tmp_path / m.group(1)).write_text(b.code)
            resolve(shlex.split(m.group(2)))
            found += 1
    assert found, "no yaml block with a `# NAME.yaml: python -m train ...` first line"
