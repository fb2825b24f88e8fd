"""A deterministic, resumable data pipeline in numpy.

corpus files -> texts -> token stream (each document + eos, cached in the run dir)
-> fixed-length rows -> held-out split -> seeded shuffle per epoch -> global batches,
each process reading its own slice of the rows.

Rows are cut from the stream back to back, so nothing is padded; a row carries segment ids
(1, 2, ... one per document piece) and positions that restart at every document, and the
models mask attention across segments, so packed documents never see each other. The
pipeline's whole state is its position `(epoch, index)`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import sysconfig
from pathlib import Path
from typing import Sequence

import numpy as np

from train.tokens import Tokenizer

EVAL_EVERY_ROW = 50  # one row in 50 (2%) is held out


def stdlib_files() -> list[Path]:
    """The .py files of the running Python's standard library, sorted (no site-packages):
    real text that every machine has, so the main job needs no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    return sorted(files)


def resolve_files(data: Sequence[str] | None) -> list[Path]:
    """Files named by `--data` entries (files, globs, directories), sorted and unique;
    none given: the standard library."""
    if not data:
        return stdlib_files()
    out: set[Path] = set()
    for entry in data:
        path = Path(entry)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        elif path.is_file():
            found = [path]
        else:
            found = [Path(p) for p in glob.glob(entry, recursive=True) if Path(p).is_file()]
        if not found:
            raise FileNotFoundError(f"--data: {entry!r} matches no file")
        out.update(p.absolute() for p in found)
    return sorted(out)


def read_texts(files: Sequence[Path]) -> list[str]:
    """Each file as text (undecodable bytes replaced); empty files are skipped, and a corpus
    with no text at all is a ValueError (before a tokenizer is trained on nothing)."""
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    texts = [t for t in texts if t.strip()]
    if not texts:
        names = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise ValueError(f"data: the corpus has no text ({len(files)} file(s), all empty or "
                         f"whitespace: {names}); --data needs files with text")
    return texts


@dataclasses.dataclass(frozen=True)
class Stream:
    """All documents as one int32 stream; doc_starts[i] is where document i begins."""

    tokens: np.ndarray  # [N]
    doc_starts: np.ndarray  # [D]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.tokens.tobytes())
        h.update(self.doc_starts.tobytes())
        return h.hexdigest()[:16]


def tokenize(texts: Sequence[str], tokenizer: Tokenizer, cache_dir: str | Path | None = None) -> Stream:
    """Token stream of `texts` (bos? + ids + eos per document), cached under cache_dir by a
    hash of the texts and the tokenizer."""
    h = hashlib.sha256(tokenizer.model_proto)
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8", "replace")).digest())
    cache = Path(cache_dir) / f"tokens-{h.hexdigest()[:16]}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            return Stream(z["tokens"], z["doc_starts"])
    vocab = tokenizer.vocab
    head = [vocab.bos_id] if vocab.bos_id is not None else []
    docs = [np.asarray(head + ids + [vocab.eos_id], np.int32) for ids in tokenizer.encode(texts)]
    if not docs:
        raise ValueError("data: the corpus has no text")
    lengths = np.asarray([len(d) for d in docs], np.int64)
    stream = Stream(np.concatenate(docs), np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, tokens=stream.tokens, doc_starts=stream.doc_starts)
        tmp.replace(cache)
    return stream


def rows_of(stream: Stream, row_ids: np.ndarray, row_len: int) -> dict[str, np.ndarray]:
    """Rows [n, row_len] cut back to back from the stream, with segment ids (1.. per
    document piece in the row) and positions (0 at each document start or row start)."""
    starts = row_ids.astype(np.int64)[:, None] * row_len
    index = starts + np.arange(row_len)[None, :]  # [n, L]
    doc = np.searchsorted(stream.doc_starts, index, side="right") - 1
    segment_ids = (doc - doc[:, :1] + 1).astype(np.int32)
    positions = (index - np.maximum(stream.doc_starts[doc], starts)).astype(np.int32)
    return {"tokens": stream.tokens[index], "segment_ids": segment_ids, "positions": positions}


@dataclasses.dataclass
class Pipeline:
    """Global batches of rows for one process.

    Rows are split train/held-out by index (every EVAL_EVERY_ROW-th row is held out); each
    epoch visits the train rows in a permutation seeded by (seed, epoch); a global batch is
    the next `batch_size` rows of it, and process p reads rows [p*b, (p+1)*b) of the batch
    with b = batch_size / process_count. The remainder of an epoch is dropped."""

    stream: Stream
    row_len: int
    batch_size: int
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.batch_size % self.process_count:
            raise ValueError(f"data: batch_size {self.batch_size} must be a positive multiple of "
                             f"the process count {self.process_count}")
        n = len(self.stream.tokens) // self.row_len
        ids = np.arange(n)
        held = ids % EVAL_EVERY_ROW == EVAL_EVERY_ROW - 1
        self.train_rows, self.eval_rows = ids[~held], ids[held]
        if len(self.train_rows) < self.batch_size:
            raise ValueError(f"data: the corpus gives {len(self.train_rows)} training rows of "
                             f"{self.row_len} tokens ({len(self.stream.tokens)} tokens in all), "
                             f"fewer than one batch of {self.batch_size}; use more data, a "
                             f"smaller --batch-size or a smaller --seq-len")
        if len(self.eval_rows) == 0:  # a tiny corpus: evaluate on the first training rows
            self.eval_rows = self.train_rows[: self.batch_size]

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_position(self, position: dict[str, int]) -> None:
        epoch, index = int(position["epoch"]), int(position["index"])
        if epoch < 0 or not 0 <= index <= len(self.train_rows):
            raise ValueError(f"data: position {position} is outside this corpus "
                             f"({len(self.train_rows)} training rows)")
        self.epoch, self.index = epoch, index

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.train_rows)

    def _local(self, rows: np.ndarray) -> np.ndarray:
        per = len(rows) // self.process_count
        return rows[self.process_index * per:(self.process_index + 1) * per]

    def next_batch(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch: tokens/segment_ids/positions
        [batch_size / process_count, row_len]; advances the position."""
        if self.index + self.batch_size > len(self.train_rows):
            self.epoch, self.index = self.epoch + 1, 0
        rows = self._order(self.epoch)[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return rows_of(self.stream, self._local(rows), self.row_len)

    def eval_batches(self, count: int) -> list[dict[str, np.ndarray]]:
        """`count` fixed held-out batches (held-out rows in order, repeated to fill them)."""
        need = count * self.batch_size
        rows = np.resize(self.eval_rows, need)
        return [rows_of(self.stream, self._local(rows[i:i + self.batch_size]), self.row_len)
                for i in range(0, need, self.batch_size)]

    @property
    def epoch_steps(self) -> int:
        return len(self.train_rows) // self.batch_size
