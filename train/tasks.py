"""Fine-tuning data: labelled text files -> examples -> token rows, and the checkpoint's own
tokenizer.

Files (`read_examples`): TSV, CSV or JSONL, one example a line, a text or a text pair and a
label (an integer or a name). A TSV/CSV file's first line is a header when one of its fields
names the label column (`label`, `labels`, `class`, `target`, `category`, any case); the
other columns are the text (one) or the pair (two). Without a header, the label column is
the first or the last, whichever holds integers, else fewer distinct values, else shorter
fields, so `label<TAB>text` and `text<TAB>label` both read. A JSONL line is an object with a `label` and a `text` /
`sentence`, or a pair (`text_a`/`text_b`, `sentence1`/`sentence2`, `premise`/`hypothesis`,
`question`/`sentence`). Every error names the file, the line and what was expected.

Tagged files (`read_tagged`, `--task tag`): CoNLL style, one `token label` per line (the
first and the last whitespace-separated field; columns between are ignored), a blank line
between sentences, `-DOCSTART-` lines skipped.

Tokenizers (`load_encoder`): a Hugging Face directory's `tokenizer.json` (the `tokenizers`
library, with its post-processor's special tokens: `[CLS] a [SEP] b [SEP]` and token types
for BERT), a WordPiece `vocab.txt` alone (BERT's template), or a SentencePiece model
(`spiece.model` / `tokenizer.model`, through `zoo.tokenizer`: `[bos] a [eos] b [eos]`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import zoo

LABEL_COLUMNS = ("label", "labels", "class", "target", "category")
_JSON_TEXT = (("text", None), ("sentence", None), ("text_a", "text_b"), ("sentence1", "sentence2"),
              ("premise", "hypothesis"), ("question", "sentence"))
_JSON_LABEL = ("label", "labels")
# Files copied from a checkpoint's directory into the run dir, and out again by export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "merges.txt", "vocab.json")


class DataError(ValueError):
    """A data file that cannot be read as labelled examples (the message names file and line)."""


@dataclasses.dataclass(frozen=True)
class Examples:
    """Texts (and second texts of pairs, or None), raw labels as written, and the line of each."""

    path: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.texts)


# --- reading files -------------------------------------------------------------------------

def data_file(path: str | Path) -> Path:
    """`path` as a Path; FileNotFoundError naming it when no such file exists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    return path


def read_examples(path: str | Path) -> Examples:
    """The labelled examples of a TSV, CSV or JSONL file (see the module docstring)."""
    path = data_file(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix not in (".tsv", ".csv", ".txt"):
        raise DataError(f"{path}: expected a .tsv, .csv or .jsonl file, got {path.suffix or 'no suffix'!r}")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        if suffix == ".csv":
            rows = list(csv.reader(f))
        else:  # TSV: a tab separates columns and quotes are text (SST-2's sentences hold them)
            rows = [line.rstrip("\r\n").split("\t") for line in f]
    numbered = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not numbered:
        raise DataError(f"{path}: the file has no examples")
    return _from_rows(path, numbered, "tab-separated" if suffix != ".csv" else "comma-separated")


def _from_rows(path: Path, rows: list[tuple[int, list[str]]], sep: str) -> Examples:
    first_line, first = rows[0]
    names = [c.strip().lower() for c in first]
    header = next((i for i, n in enumerate(names) if n in LABEL_COLUMNS), None)
    body = rows[1:] if header is not None else rows
    width = len(first)
    if width not in (2, 3):
        raise DataError(f"{path} line {first_line}: expected 2 {sep} columns (label, text) or 3 (label, "
                        f"text, second text), got {width}")
    for line, row in body:
        if len(row) != width:
            raise DataError(f"{path} line {line}: expected {width} {sep} columns as line {first_line}, "
                            f"got {len(row)}")
    if not body:
        raise DataError(f"{path}: the file has a header and no examples")
    label_col = header if header is not None else _label_column(body, width)
    text_cols = [c for c in range(width) if c != label_col]
    texts = [r[text_cols[0]] for _, r in body]
    pairs = [r[text_cols[1]] for _, r in body] if len(text_cols) == 2 else None
    labels = [r[label_col].strip() for _, r in body]
    lines = [line for line, _ in body]
    for line, label in zip(lines, labels):
        if not label:
            raise DataError(f"{path} line {line}: expected a label in column {label_col + 1}, got an empty field")
    return Examples(str(path), texts, pairs, labels, lines)


def _label_column(rows: list[tuple[int, list[str]]], width: int) -> int:
    """Without a header: the first or the last column, whichever looks more like labels:
    integers, then fewer distinct values, then shorter fields (the first on a tie)."""
    def score(col: int) -> tuple:
        values = [r[col].strip() for _, r in rows]
        return (not all(_is_int(v) for v in values), len(set(values)), sum(map(len, values)))
    return 0 if score(0) <= score(width - 1) else width - 1


def json_line(raw: str, path: Path, n: int) -> Any:
    """The JSON value of line n of a JSONL file; DataError naming the file and line if invalid."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {n}: expected a JSON object, got invalid JSON ({e.msg})") from None


def _read_jsonl(path: Path) -> Examples:
    texts, pairs, labels, lines, keys = [], [], [], [], None
    for n, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        obj = json_line(raw, path, n)
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
        if keys is None:
            keys = next((k for k in _JSON_TEXT if k[0] in obj and (k[1] is None or k[1] in obj)), None)
        label_key = next((k for k in _JSON_LABEL if k in obj), None)
        if keys is None or label_key is None or keys[0] not in obj or (keys[1] and keys[1] not in obj):
            want = " or ".join("/".join(filter(None, k)) for k in _JSON_TEXT)
            raise DataError(f"{path} line {n}: expected keys 'label' and a text ({want}), got {sorted(obj)}")
        texts.append(str(obj[keys[0]]))
        if keys[1]:
            pairs.append(str(obj[keys[1]]))
        labels.append(str(obj[label_key]).strip())
        lines.append(n)
    if not texts:
        raise DataError(f"{path}: the file has no examples")
    return Examples(str(path), texts, pairs if keys[1] else None, labels, lines)


@dataclasses.dataclass(frozen=True)
class Tagged:
    """Sentences as words with one tag each, and the line each sentence starts on."""

    path: str
    words: list[list[str]]
    tags: list[list[str]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.words)


def read_tagged(path: str | Path) -> Tagged:
    """The sentences of a CoNLL-style file (see the module docstring)."""
    path = data_file(path)
    words, tags, lines = [], [], []
    current: tuple[list[str], list[str]] | None = None
    for n, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = raw.split()
        if not fields or fields[0] == "-DOCSTART-":
            current = None
            continue
        if len(fields) < 2:
            raise DataError(f"{path} line {n}: expected a token and its label separated by whitespace, got {raw!r}")
        if current is None:
            current = ([], [])
            words.append(current[0]), tags.append(current[1]), lines.append(n)
        current[0].append(fields[0])
        current[1].append(fields[-1])
    if not words:
        raise DataError(f"{path}: the file has no sentences (expected `token label` lines)")
    return Tagged(str(path), words, tags, lines)


def tag_ids(data: Tagged, names: Sequence[str], train: Tagged | None = None) -> list[list[int]]:
    """Each sentence's tag ids under `names`; a tag outside them is a DataError naming the line
    (for the eval set, `train` given: one the train set lacks)."""
    index = {n: i for i, n in enumerate(names)}
    seen = None if train is None else {t for tags in train.tags for t in tags}
    out = []
    for tags, line in zip(data.tags, data.lines):
        for k, tag in enumerate(tags):
            if seen is not None and tag not in seen:
                raise DataError(f"{data.path} line {line + k}: tag {tag!r} does not occur in the train set "
                                f"{train.path} (its tags: {sorted(seen)}); every eval tag must be trained")
            if tag not in index:
                raise DataError(f"{data.path} line {line + k}: expected a tag among {list(names)}, got {tag!r}")
        out.append([index[t] for t in tags])
    return out


# --- labels --------------------------------------------------------------------------------

def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def label_names(train: Examples, known: Sequence[str] | None = None) -> tuple[str, ...]:
    """The label names in id order: `known` (a head's id2label) when given, else integer
    labels 0..max ("LABEL_i", transformers' names) or the sorted names found."""
    if known is not None:
        return tuple(known)
    if all(_is_int(x) for x in train.labels):
        return tuple(f"LABEL_{i}" for i in range(max(int(x) for x in train.labels) + 1))
    return tuple(sorted(set(train.labels)))


def label_ids(data: Examples, names: Sequence[str], train: Examples | None = None) -> np.ndarray:
    """int32 [N] ids of data's labels under `names` (an integer label is its id, a name its
    index). A label outside them is a DataError naming the line; for the eval set (`train`
    given), also one the train set lacks."""
    index = {n: i for i, n in enumerate(names)}
    seen = None if train is None else set(train.labels)
    out = np.zeros(len(data), np.int32)
    for k, (raw, line) in enumerate(zip(data.labels, data.lines)):
        if seen is not None and raw not in seen:
            raise DataError(f"{data.path} line {line}: label {raw!r} does not occur in the train set "
                            f"{train.path} (its labels: {sorted(seen)}); every eval label must be trained")
        if _is_int(raw) and raw not in index:
            i = int(raw)
            if not 0 <= i < len(names):
                raise DataError(f"{data.path} line {line}: expected a label id in 0..{len(names) - 1} "
                                f"(or a name: {list(names)}), got {raw}")
        elif raw in index:
            i = index[raw]
        else:
            raise DataError(f"{data.path} line {line}: expected a label among {list(names)} "
                            f"(or an id 0..{len(names) - 1}), got {raw!r}")
        out[k] = i
    return out


# --- tokenizers ----------------------------------------------------------------------------

@dataclasses.dataclass
class TextEncoder:
    """Texts (or pairs) -> rows [N, T] of ids, token types and mask, with the checkpoint's
    special tokens. `fast`: a `tokenizers.Tokenizer`; else `sp`: a `train.tokens.Tokenizer`
    (SentencePiece, with the specials pretraining appends: ids as `python -m train` gave them)."""

    source: Path  # the directory (or file) it was read from; its files are copied by `save`
    pad_id: int
    vocab_size: int
    fast: Any = None
    sp: Any = None

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None, seq_len: int) -> dict[str, np.ndarray]:
        """{"tokens", "token_types", "mask"}: int32/int32/bool [N, seq_len], cut at seq_len
        (the longer text first) and padded right with pad_id."""
        n = len(texts)
        out = {"tokens": np.full((n, seq_len), self.pad_id, np.int32),
               "token_types": np.zeros((n, seq_len), np.int32), "mask": np.zeros((n, seq_len), bool)}
        for i, (ids, types) in enumerate(self._encode(texts, pairs, seq_len)):
            k = min(len(ids), seq_len)
            out["tokens"][i, :k], out["token_types"][i, :k], out["mask"][i, :k] = ids[:k], types[:k], True
        return out

    def encode_text(self, text: str, special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]] | None]:
        """One text's ids, uncut, and the (start, end) characters of each (None for a
        SentencePiece encoder); special_tokens: with those the tokenizer adds around a text
        (a BOS, BERT's [CLS] ... [SEP])."""
        if self.fast is not None:
            self.fast.no_truncation()
            e = self.fast.encode(text, add_special_tokens=special_tokens)
            return list(e.ids), list(e.offsets)
        ids = self.sp.encode([text])[0]
        v = self.sp.vocab
        if special_tokens:
            ids = ([v.bos_id] if v.bos_id is not None else []) + ids + [v.eos_id]
        return ids, None

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ids, special tokens (padding, BOS, EOS, ...) dropped."""
        ids = [int(i) for i in ids]
        if self.fast is not None:
            return self.fast.decode(ids, skip_special_tokens=True)
        v = self.sp.vocab
        return self.sp.decode([i for i in ids if i not in (v.pad_id, v.eos_id, v.bos_id)])

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence id the tokenizer closes a text with (None if it names none)."""
        if self.sp is not None:
            return self.sp.vocab.eos_id
        for token in (_read_config(self.source).get("eos_token") if self.source.is_dir() else None, "</s>", "[SEP]"):
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.fast.token_to_id(token) is not None:
                return int(self.fast.token_to_id(token))
        return None

    def encode_words(self, words: Sequence[Sequence[str]], seq_len: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Pre-split sentences -> rows as `encode`, and word int32 [N, seq_len]: the index of
        the word whose FIRST sub-word sits at each position, -1 elsewhere (special tokens,
        later sub-words, padding): where a word's tag is scored."""
        n = len(words)
        rows = {"tokens": np.full((n, seq_len), self.pad_id, np.int32),
                "token_types": np.zeros((n, seq_len), np.int32), "mask": np.zeros((n, seq_len), bool)}
        first = np.full((n, seq_len), -1, np.int32)
        for i, (ids, word_of) in enumerate(self._encode_words(words, seq_len)):
            k = min(len(ids), seq_len)
            rows["tokens"][i, :k], rows["mask"][i, :k] = ids[:k], True
            seen = set()
            for t, w in enumerate(word_of[:k]):
                if w is not None and w not in seen:
                    first[i, t] = w
                    seen.add(w)
        return rows, first

    def _encode_words(self, words: Sequence[Sequence[str]], seq_len: int):
        if self.fast is not None:
            self.fast.no_padding()
            self.fast.enable_truncation(max_length=seq_len)
            for e in self.fast.encode_batch([list(w) for w in words], is_pretokenized=True):
                yield e.ids, e.word_ids
            return
        v = self.sp.vocab
        head = [v.bos_id] if v.bos_id is not None else []
        for sentence in words:
            pieces = self.sp.encode(list(sentence))
            ids = head + [i for p in pieces for i in p] + [v.eos_id]
            word_of = [None] * len(head) + [w for w, p in enumerate(pieces) for _ in p] + [None]
            yield ids, word_of

    def _encode(self, texts: Sequence[str], pairs: Sequence[str] | None, seq_len: int):
        if self.fast is not None:
            self.fast.no_padding()
            self.fast.enable_truncation(max_length=seq_len)
            inputs = list(texts) if pairs is None else list(zip(texts, pairs))
            for e in self.fast.encode_batch(inputs):
                yield e.ids, e.type_ids
            return
        v = self.sp.vocab
        head = [v.bos_id] if v.bos_id is not None else []
        tail = [v.eos_id]
        a_ids = self.sp.encode(list(texts))
        b_ids = self.sp.encode(list(pairs)) if pairs is not None else [None] * len(a_ids)
        for a, b in zip(a_ids, b_ids):
            first = head + a + tail
            second = [] if b is None else b + tail
            yield first + second, [0] * len(first) + [1] * len(second)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in TOKENIZER_FILES:
            f = self.source / name if self.source.is_dir() else None
            if f is not None and f.is_file():
                h.update(name.encode() + f.read_bytes())
        if not self.source.is_dir():
            h.update(self.source.read_bytes())
        return h.hexdigest()[:16]

    def save(self, directory: Path) -> None:
        """Copies the tokenizer's files into `directory` (the run dir's tokenizer/, an export)."""
        directory.mkdir(parents=True, exist_ok=True)
        files = ([self.source / n for n in TOKENIZER_FILES if (self.source / n).is_file()]
                 if self.source.is_dir() else [self.source])
        for f in files:  # a lone SentencePiece file goes under a name load_encoder looks for
            shutil.copyfile(f, directory / (f.name if self.source.is_dir() else "tokenizer.model"))


def load_encoder(path: str | Path, pad_id: int | None = None) -> TextEncoder:
    """The tokenizer of a checkpoint directory (or a SentencePiece .model file); `pad_id`:
    the model config's, used when the tokenizer names no pad token."""
    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        import tokenizers

        fast = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        return TextEncoder(path, _pad_of(fast, pad_id, path), fast.get_vocab_size(), fast=fast)
    if path.is_dir() and (path / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        lower = _read_config(path).get("do_lower_case", True)
        fast = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=lower)._tokenizer
        return TextEncoder(path, _pad_of(fast, pad_id, path), fast.get_vocab_size(), fast=fast)
    from train.tokens import load_tokenizer

    model = next((path / n for n in zoo.tokenizer.MODEL_FILES if (path / n).is_file()), None) \
        if path.is_dir() else path
    if model is None or not model.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer; expected tokenizer.json, vocab.txt or a SentencePiece "
                                f"model ({', '.join(zoo.tokenizer.MODEL_FILES)})")
    sp = load_tokenizer(model, zoo.tokenizer.load(model.parent).extra_ids if path.is_dir() else 0)
    return TextEncoder(path, sp.vocab.pad_id, sp.vocab.size, sp=sp)


def _read_config(path: Path) -> dict:
    f = path / "tokenizer_config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _pad_of(fast: Any, pad_id: int | None, path: Path) -> int:
    if fast.padding is not None:
        return int(fast.padding["pad_id"])
    for token in ("[PAD]", "<pad>", _read_config(path).get("pad_token")):
        if isinstance(token, str) and fast.token_to_id(token) is not None:
            return int(fast.token_to_id(token))
    if pad_id is None:
        raise ValueError(f"{path}: the tokenizer names no pad token and the model config no pad_token_id")
    return pad_id
