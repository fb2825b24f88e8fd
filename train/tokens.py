"""Tokenizers for training, on top of `zoo.tokenizer`: train one in-process on the corpus,
or load a `.model`, and describe its special tokens (`Vocab`) for the objectives.

T5 sentinels are `zoo.tokenizer`'s extra ids (`<extra_id_0>` the highest id). Special tokens
an objective needs and a loaded model lacks (a pad, an eos, a `<mask>`) are appended after
them, so any SentencePiece model can train any objective.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import zoo.tokenizer

_MASK = "<mask>"
# Pieces that end a sentence, for BART sentence permutation: prose ends with . ! ?, code with
# a newline (the byte piece <0x0A> under byte fallback).
_SENTENCE_END = (".", "!", "?", "<0x0A>", "\n")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Special token ids of a tokenizer; hashable, so it is a static argument under jit.

    sentinel_ids[i] is `<extra_id_i>` (descending ids, T5 order); sentence_end_ids are the
    pieces that close a sentence (BART sentence permutation)."""

    size: int
    pad_id: int
    eos_id: int
    unk_id: int | None = None
    bos_id: int | None = None
    mask_id: int | None = None
    sentinel_ids: tuple[int, ...] = ()
    sentence_end_ids: tuple[int, ...] = ()

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Every id an objective must never mask or sample: pad, eos, unk, bos, mask, sentinels."""
        ids = {self.pad_id, self.eos_id, self.unk_id, self.bos_id, self.mask_id, *self.sentinel_ids}
        return tuple(sorted(i for i in ids if i is not None))


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A `zoo.tokenizer.Tokenizer` plus the pieces appended after its vocabulary."""

    base: zoo.tokenizer.Tokenizer
    extra: tuple[str, ...]  # pieces with ids base.vocab_size, base.vocab_size + 1, ...
    vocab: Vocab

    @property
    def model_proto(self) -> bytes:
        return self.base.to_bytes()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no eos/bos added). Text is plain text here: a literal
        "<extra_id_0>" in the corpus stays text and never becomes a sentinel."""
        return self.base.sp.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; sentinels and appended pieces are written by name."""
        n, out, run = self.base.vocab_size, [], []
        for i in [int(i) for i in ids] + [None]:
            if i is not None and i < n:
                run.append(i)
                continue
            out.append(self.base.decode(run))
            run = []
            if i is not None:
                out.append(self.extra[i - n])
        return "".join(out)

    def save(self, path: str | Path) -> None:
        """Writes the SentencePiece model; `load_tokenizer(path, num_sentinels)` rebuilds
        this tokenizer (the appended pieces follow from the model)."""
        self.base.save(path)


def _build(base: zoo.tokenizer.Tokenizer) -> Tokenizer:
    """Appends whatever specials the model lacks and describes them all."""
    sp, n = base.sp, base.vocab_size
    pieces = [sp.id_to_piece(i) for i in range(base.base_size)]
    extra: list[str] = []

    def find_or_append(piece: str, existing: int | None) -> int:
        if existing is not None:
            return existing
        if piece in pieces:
            return pieces.index(piece)
        extra.append(piece)
        return n + len(extra) - 1

    pad = find_or_append("<pad>", base.pad_id)
    eos = find_or_append("</s>", base.eos_id)
    mask = find_or_append(_MASK, None)
    ends = tuple(i for i, p in enumerate(pieces) if p.endswith(_SENTENCE_END) and not sp.is_control(i))
    vocab = Vocab(size=n + len(extra), pad_id=pad, eos_id=eos, unk_id=base.unk_id,
                  bos_id=base.bos_id, mask_id=mask,
                  sentinel_ids=tuple(base.sentinel(i) for i in range(base.extra_ids)),
                  sentence_end_ids=ends)
    return Tokenizer(base, tuple(extra), vocab)


def load_tokenizer(path: str | Path, num_sentinels: int = 0) -> Tokenizer:
    """A SentencePiece `.model` file; `num_sentinels` T5 extra ids are appended (encdec)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no SentencePiece model at {path}")
    try:
        base = zoo.tokenizer.from_bytes(path.read_bytes(), num_sentinels)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError depending on the damage
        raise ValueError(f"tokenizer: {path} is not a SentencePiece model ({e})") from None
    return _build(base)


def _training_lines(texts: Sequence[str], max_lines: int) -> Iterator[str]:
    """Non-empty lines, evenly strided over the corpus so a large corpus is sampled
    deterministically (SentencePiece's own sampling would need its global seed)."""
    total = sum(t.count("\n") + 1 for t in texts)
    stride = max(1, total // max_lines)
    k = 0
    for text in texts:
        for line in text.splitlines():
            if k % stride == 0 and line.strip():
                yield line
            k += 1


# Lines sampled for training: unigram training time grows faster than linearly with them.
MAX_LINES = {"bpe": 200_000, "unigram": 30_000}


def train_tokenizer(texts: Sequence[str], *, vocab_size: int, model_type: str = "bpe",
                    num_sentinels: int = 0, max_lines: int | None = None) -> Tokenizer:
    """Trains SentencePiece in-process on `texts` (`zoo.tokenizer.train`): unigram for
    T5-style encdec, BPE otherwise. `vocab_size` counts the sentinels.

    pad=0, eos=1, unk=2, no bos, `<mask>`=3; byte fallback so any text round-trips; whitespace
    kept as is (code indentation matters). A small corpus may give fewer pieces than asked:
    `Tokenizer.vocab.size` is the size to build the model with."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer: model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size - num_sentinels < 300:
        raise ValueError(f"tokenizer: vocab_size must leave >= 300 pieces (256 bytes + specials) "
                         f"besides {num_sentinels} sentinels, got {vocab_size}")
    base = zoo.tokenizer.train(
        _training_lines(texts, max_lines or MAX_LINES[model_type]), vocab_size - num_sentinels,
        model_type,
        extra_ids=num_sentinels, hard_vocab_limit=False, user_defined_symbols=[_MASK],
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        shuffle_input_sentence=False)
    return _build(base)
