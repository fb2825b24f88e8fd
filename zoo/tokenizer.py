"""SentencePiece tokenizers: load the ones checkpoints ship (spiece.model, tokenizer.model),
train new ones in-process, and T5-style sentinel tokens.

    tok = zoo.tokenizer.load("path/to/t5_dir")              # spiece.model, extra ids from its config
    ids = tok.encode("The <extra_id_0> walks")              # sentinels in text become their ids
    tok.decode(ids)                                         # -> "The <extra_id_0> walks"
    tok = zoo.tokenizer.train(texts, vocab_size=8000, extra_ids=100)

Sentinels (`extra_ids`) are appended after the SentencePiece vocabulary, as Hugging Face's T5
tokenizer does: `<extra_id_0>` is the highest id, `vocab_size - 1`, and `<extra_id_N>` is
`vocab_size - 1 - N`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece as spm

MODEL_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A SentencePiece model plus `extra_ids` sentinel tokens after its vocabulary."""

    sp: spm.SentencePieceProcessor
    extra_ids: int = 0

    # Sizes and special ids ---------------------------------------------------------------------
    @property
    def base_size(self) -> int:
        """Pieces in the SentencePiece model (ids below this are pieces)."""
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        """Pieces plus sentinels: every id this tokenizer produces is below it."""
        return self.base_size + self.extra_ids

    @property
    def pad_id(self) -> int | None:
        return _id_or_none(self.sp.pad_id())

    @property
    def eos_id(self) -> int | None:
        return _id_or_none(self.sp.eos_id())

    @property
    def bos_id(self) -> int | None:
        return _id_or_none(self.sp.bos_id())

    @property
    def unk_id(self) -> int | None:
        return _id_or_none(self.sp.unk_id())

    def sentinel(self, n: int) -> int:
        """The id of `<extra_id_n>`: vocab_size - 1 - n."""
        if not 0 <= n < self.extra_ids:
            raise ValueError(f"sentinel: n must be in [0, {self.extra_ids}) (extra_ids), got {n}")
        return self.vocab_size - 1 - n

    def is_sentinel(self, token_id: int) -> bool:
        return self.base_size <= token_id < self.vocab_size

    # Text <-> ids ------------------------------------------------------------------------------
    def encode(self, text: str | Sequence[str], *, add_bos: bool = False,
               add_eos: bool = False) -> list[int] | list[list[int]]:
        """A string -> list of ids; a list of strings -> list of lists. `<extra_id_N>` in the
        text becomes sentinel N (when extra_ids > N)."""
        if isinstance(text, str):
            return self._encode_one(text, add_bos, add_eos)
        return [self._encode_one(t, add_bos, add_eos) for t in text]

    def _encode_one(self, text: str, add_bos: bool, add_eos: bool) -> list[int]:
        ids: list[int] = [self.bos_id] if add_bos and self.bos_id is not None else []
        start = 0
        for match in _SENTINEL.finditer(text):
            n = int(match.group(1))
            if n >= self.extra_ids:
                continue  # not a sentinel of this tokenizer: plain text
            ids += self.sp.encode(text[start:match.start()])
            ids.append(self.sentinel(n))
            start = match.end()
        ids += self.sp.encode(text[start:])
        if add_eos:
            if self.eos_id is None:
                raise ValueError("encode: add_eos=True, but this SentencePiece model has no eos id")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int] | Any) -> str:
        """ids -> text; control ids (pad, eos, bos) vanish, sentinels print as `<extra_id_N>`.

        A sentinel stands as a word: a space before it (after text) and the space SentencePiece
        marks on the next piece after it, so `decode(encode("The <extra_id_0> walks"))` gives
        the text back. The ids do not record spaces around a sentinel (transformers' T5
        tokenizer encodes to the same ids and decodes without the space before it)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        out, run, after_text = [], [], False
        for i in ids + [None]:
            if i is not None and not self.is_sentinel(i):
                run.append(i)
                continue
            if run:
                text = self.sp.decode(run)
                # SentencePiece drops the leading space of a run; keep it after a sentinel.
                if out and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                out.append(text)
                after_text = bool(text) and not text[-1].isspace()
                run = []
            if i is not None:
                out.append((" " if after_text else "") + self.piece(i))
                after_text = False
        return "".join(out)

    def piece(self, token_id: int) -> str:
        """The piece (or sentinel) text of one id."""
        if self.is_sentinel(token_id):
            return f"<extra_id_{self.vocab_size - 1 - token_id}>"
        return self.sp.id_to_piece(token_id)

    # Persistence -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The serialized SentencePiece model (sentinels are not part of it: keep extra_ids)."""
        return self.sp.serialized_model_proto()

    def save(self, path: str | os.PathLike) -> None:
        """Writes the .model file (load it back with load(path, extra_ids=...))."""
        Path(path).write_bytes(self.to_bytes())


def _id_or_none(i: int) -> int | None:
    return None if i < 0 else i


def from_bytes(model: bytes, extra_ids: int = 0) -> Tokenizer:
    """A Tokenizer from a serialized SentencePiece model."""
    if extra_ids < 0:
        raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
    return Tokenizer(spm.SentencePieceProcessor(model_proto=model), extra_ids)


def _extra_ids_of(directory: Path) -> int:
    """Sentinel count a Hugging Face tokenizer_config.json declares (0 when none)."""
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return 0
    d = json.loads(config.read_text())
    if isinstance(d.get("extra_ids"), int) and d["extra_ids"] > 0:
        return d["extra_ids"]
    specials = d.get("additional_special_tokens") or d.get("extra_special_tokens") or []
    specials = [s.get("content", "") if isinstance(s, dict) else str(s) for s in specials]
    return sum(1 for s in specials if _SENTINEL.fullmatch(s))


def load(path: str | os.PathLike, extra_ids: int | None = None) -> Tokenizer:
    """Loads a SentencePiece .model file, or the one in a checkpoint directory (spiece.model,
    tokenizer.model). extra_ids: sentinel count; default: what the directory's
    tokenizer_config.json declares (T5: 100), else 0."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if path.is_dir():
        found = [path / name for name in MODEL_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"tokenizer.load: no SentencePiece model in {str(path)!r}; "
                                    f"expected one of {MODEL_FILES}")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"tokenizer.load: {str(path)!r} does not exist")
    if extra_ids is None:
        extra_ids = _extra_ids_of(directory)
    return from_bytes(path.read_bytes(), extra_ids)


# SentencePiece's default max_sentence_length: it silently skips longer training sentences.
_SP_MAX_SENTENCE_BYTES = 4192
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def training_lines(texts: Iterable[str]) -> list[str]:
    """Every non-empty line of every text: SentencePiece's unit of training (what it reads
    from a file), so a whole document is never one oversized "sentence"."""
    return [line for text in texts for line in text.splitlines() if line.strip()]


def train(texts: Iterable[str], vocab_size: int, model_type: str = "unigram", extra_ids: int = 0,
          **options: Any) -> Tokenizer:
    """Trains a SentencePiece model in memory (no files) on an iterable of strings.

    texts: documents or sentences; each is split into lines (`training_lines`) and
    max_sentence_length defaults to the longest line in bytes, so no text is skipped (an
    explicit, smaller max_sentence_length makes SentencePiece skip the longer lines).
    vocab_size: pieces in the SentencePiece model (sentinels come on top: the Tokenizer's
    vocab_size is vocab_size + extra_ids); more than the corpus allows is a ValueError that
    names the largest size it allows. model_type: "unigram", "bpe", "char" or "word".
    Ids follow T5: pad 0, eos 1, unk 2, no bos; `options` are passed to
    SentencePieceTrainer and override these (e.g. bos_id=3, character_coverage=0.9995,
    input_sentence_size=1_000_000, shuffle_input_sentence=True, hard_vocab_limit=False to
    accept fewer pieces than asked).
    """
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"train: model_type must be unigram, bpe, char or word, got {model_type!r}")
    if not isinstance(vocab_size, int) or vocab_size < 4:
        raise ValueError(f"train: vocab_size must be an int >= 4, got {vocab_size!r}")
    lines = training_lines(texts)
    if not lines:
        raise ValueError("train: texts hold no text to train on (every text is empty or whitespace)")
    longest = max(len(line.encode("utf-8")) for line in lines)
    settings = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                    num_threads=os.cpu_count() or 1, minloglevel=2,
                    max_sentence_length=max(_SP_MAX_SENTENCE_BYTES, longest))
    settings.update(options)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                       vocab_size=vocab_size, model_type=model_type, **settings)
    except RuntimeError as e:
        clear = _vocab_error(str(e), vocab_size, len(lines))
        if clear is None:
            raise
        raise clear from None
    return from_bytes(model.getvalue(), extra_ids)


def _vocab_error(message: str, vocab_size: int, num_lines: int) -> ValueError | None:
    """SentencePiece's vocabulary-size failures as one clear line (None: another failure)."""
    high, low = _TOO_HIGH.search(message), _TOO_LOW.search(message)
    if high:
        return ValueError(f"train: vocab_size {vocab_size} is more than this corpus ({num_lines} "
                          f"lines) allows; the largest it allows is {high.group(2)} (or pass "
                          f"hard_vocab_limit=False to accept fewer pieces)")
    if low:
        return ValueError(f"train: vocab_size {vocab_size} is below the {low.group(2)} pieces "
                          f"the corpus's characters and the special tokens need; raise it "
                          f"or lower character_coverage")
    return None
