"""Checkpoint files: `model.safetensors`, sharded `*.safetensors` with their index, and (only
when torch is installed) `pytorch_model.bin`, loaded with `weights_only=True`.

Tensors are read one at a time (safetensors maps the file; nothing is read until asked), so a
loader never holds more than the model it builds plus one tensor.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


class Weights:
    """Read-only access to a checkpoint's tensors by key, as numpy arrays.

    `prefix`: the base-model prefix (e.g. "bert.") that checkpoints of a bare base model
    (BertModel, LlamaModel) lack; `get("bert.x")` then also finds "x".
    """

    def __init__(self, files: dict[str, "_File"]):
        self._files = files  # key -> open file holding it
        self._prefix = ""
        self._stored_as: str | None = None

    def set_prefix(self, prefix: str, stored_as: str | None = None) -> None:
        """stored_as: the prefix this checkpoint keeps the base model under instead of `prefix`
        (LlamaForQuestionAnswering: "transformer." for "model.")."""
        self._prefix = prefix
        self._stored_as = stored_as

    def keys(self) -> set[str]:
        return set(self._files)

    def resolve(self, key: str) -> str | None:
        """The stored name of `key`, or None when the checkpoint lacks it."""
        if self._stored_as is not None and self._prefix and key.startswith(self._prefix):
            key = self._stored_as + key[len(self._prefix):]
        for name in _aliases(key):
            if name in self._files:
                return name
            if self._prefix and name.startswith(self._prefix) and name[len(self._prefix):] in self._files:
                return name[len(self._prefix):]
        return None

    def has(self, key: str) -> bool:
        return self.resolve(key) is not None

    def get(self, key: str) -> np.ndarray:
        stored = self.resolve(key)
        if stored is None:
            raise KeyError(key)
        return self._files[stored].get(stored)

    def float_dtype(self) -> np.dtype:
        """The dtype of the first floating-point tensor (the checkpoint's storage dtype)."""
        for key in sorted(self._files):
            dt = self._files[key].dtype(key)
            if np.issubdtype(dt, np.floating) or dt.name == "bfloat16":
                return dt
        return np.dtype(np.float32)

    def close(self) -> None:
        for f in set(self._files.values()):
            f.close()

    def __enter__(self) -> "Weights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _aliases(key: str) -> tuple[str, ...]:
    """`key` and the older names checkpoints may store it under (TF-era LayerNorm gamma/beta)."""
    if ".LayerNorm." in key:
        return key, re.sub(r"\.LayerNorm\.(weight|bias)$",
                           lambda m: ".LayerNorm." + {"weight": "gamma", "bias": "beta"}[m.group(1)], key)
    return (key,)


class _File:
    """One safetensors or torch file."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            self._handle = _safetensors().safe_open(str(path), framework="np")
            self._tensors = None
        else:
            self._handle = None
            self._tensors = _torch_load(path)

    def keys(self) -> list[str]:
        return list(self._handle.keys()) if self._handle is not None else list(self._tensors)

    def get(self, key: str) -> np.ndarray:
        if self._handle is not None:
            return self._handle.get_tensor(key)
        return _torch_to_numpy(self._tensors[key])

    def dtype(self, key: str) -> np.dtype:
        if self._handle is not None:
            name = self._handle.get_slice(key).get_dtype()
            return _SAFETENSORS_DTYPES.get(name, np.dtype(np.int64))
        return _torch_to_numpy(self._tensors[key].flatten()[:1]).dtype

    def close(self) -> None:
        self._handle = None
        self._tensors = None


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as e:
        raise ImportError("zoo.load_hf/save_hf need the safetensors package: pip install 'zoo[hf]'") from e
    return safetensors


def _np_bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


_SAFETENSORS_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                       "F16": np.dtype(np.float16), "BF16": _np_bfloat16()}


def _torch_load(path: Path) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{path.name}: reading PyTorch .bin checkpoints needs torch "
                         "(pip install torch), or convert the checkpoint to safetensors") from e
    # weights_only: the restricted unpickler, which refuses arbitrary objects; mmap: tensors
    # stay on disk until read (only the zip format, torch >= 1.6, can be mapped).
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits
        return t.view(torch.int16).numpy().view(_np_bfloat16()).copy()
    return t.numpy().copy()


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors first."""
    for index_name in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / SAFETENSORS).is_file():
        return [directory / SAFETENSORS]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    if (directory / TORCH_BIN).is_file():
        return [directory / TORCH_BIN]
    raise FileNotFoundError(
        f"load_hf: no weights in {str(directory)!r}; expected {SAFETENSORS}, {SAFETENSORS_INDEX} "
        f"with its shards, or {TORCH_BIN}")


def open_weights(directory: str | os.PathLike) -> Weights:
    """All tensors of a checkpoint directory, by key (read lazily)."""
    files: dict[str, _File] = {}
    for path in _weight_files(Path(directory)):
        if not path.is_file():
            raise FileNotFoundError(f"load_hf: weight shard {str(path)!r} named in the index is missing")
        f = _File(path)
        for key in f.keys():
            files[key] = f
    return Weights(files)


# --- writing ------------------------------------------------------------------------------------
def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], directory: str | os.PathLike,
                      max_shard_bytes: int) -> list[Path]:
    """Writes (key, array) pairs as `model.safetensors`, or as shards plus an index when they
    exceed `max_shard_bytes`. Holds at most one shard in memory."""
    save_file = _safetensors().numpy.save_file
    directory = Path(directory)
    shards: list[list[str]] = []
    written: list[Path] = []
    pending: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            path = directory / f"model-shard-{len(written):05d}.tmp"
            save_file(pending, str(path), metadata={"format": "pt"})  # "pt": transformers' check
            written.append(path)
            shards.append(list(pending))
            pending, size = {}, 0

    for key, array in tensors:
        if pending and size + array.nbytes > max_shard_bytes:
            flush()
        pending[key] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    if len(written) == 1:
        final = [directory / SAFETENSORS]
        written[0].replace(final[0])
        return final
    final = [directory / f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for tmp, path in zip(written, final):
        tmp.replace(path)
    weight_map = {key: path.name for keys, path in zip(shards, final) for key in keys}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return final
