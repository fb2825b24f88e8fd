"""Sequence-to-sequence fine-tuning data (`python -m train finetune --task seq2seq`): source and
target texts -> encoder and decoder token rows; generated ids -> texts -> sacreBLEU's BLEU
and chrF.

Pairs come from two parallel files (`--data train.en train.de`: line i of one translates
line i of the other), from a TSV file with two columns (a header naming `source` and
`target` is skipped) or from JSONL lines with `source` and `target`. Both sides are
tokenized with the tokenizer's own special tokens (T5's closing `</s>`, BART's `<s> ... </s>`),
as transformers' `tokenizer(source, text_target=target)` does.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from train.tasks import DataError, TextEncoder, data_file, json_line


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Source and target texts and the line of each pair."""

    path: str
    sources: list[str]
    targets: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.sources)


def read_pairs(paths: Sequence[str]) -> Pairs:
    """The pairs of one TSV/JSONL file or of two parallel text files (module docstring)."""
    files = [data_file(p) for p in paths]
    if len(files) == 2:
        a, b = (f.read_text(encoding="utf-8", errors="replace").splitlines() for f in files)
        if len(a) != len(b):
            raise DataError(f"{files[0]} has {len(a)} lines and {files[1]} {len(b)}: expected parallel files, "
                            f"line i of one translating line i of the other")
        keep = [i for i in range(len(a)) if a[i].strip() or b[i].strip()]
        for i in keep:
            if not (a[i].strip() and b[i].strip()):
                raise DataError(f"{files[0] if not a[i].strip() else files[1]} line {i + 1}: empty, while the "
                                f"other file's line {i + 1} is not")
        return _checked(Pairs(f"{files[0]}+{files[1]}", [a[i] for i in keep], [b[i] for i in keep],
                              [i + 1 for i in keep]))
    if len(files) != 1:
        raise DataError(f"--data: --task seq2seq reads one TSV/JSONL file or two parallel files, got {len(files)}")
    path = files[0]
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = Pairs(str(path), [], [], [])
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    for n, raw in enumerate(text, 1):
        if not raw.strip():
            continue
        if jsonl:
            obj = json_line(raw, path, n)
            if not (isinstance(obj, dict) and isinstance(obj.get("source"), str) and isinstance(obj.get("target"), str)):
                raise DataError(f"{path} line {n}: expected an object with 'source' and 'target' strings")
            src, tgt = obj["source"], obj["target"]
        else:
            cols = raw.split("\t")
            if len(cols) != 2:
                raise DataError(f"{path} line {n}: expected 2 tab-separated columns (source, target), got {len(cols)}")
            if not out.lines and [c.strip().lower() for c in cols] == ["source", "target"]:
                continue
            src, tgt = cols
        out.sources.append(src), out.targets.append(tgt), out.lines.append(n)
    return _checked(out)


def _checked(p: Pairs) -> Pairs:
    if not p.sources:
        raise DataError(f"{p.path}: the file has no pairs")
    return p


def encode_pairs(enc: TextEncoder, data: Pairs, seq_len: int) -> dict[str, np.ndarray]:
    """{"tokens", "mask"} of the sources and {"target", "target_mask"} of the targets: int32 /
    bool [N, seq_len], cut at seq_len (keeping the closing special token) and padded right."""
    out = {}
    for name, mask_name, texts in (("tokens", "mask", data.sources), ("target", "target_mask", data.targets)):
        out[name], out[mask_name] = encode_texts(enc, texts, seq_len)
    return out


def encode_texts(enc: TextEncoder, texts: Sequence[str], seq_len: int,
                 drop_first: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 and mask bool [N, seq_len]: each text with the tokenizer's special tokens,
    without a leading `drop_first` id, cut at seq_len (keeping the closing special token)
    and padded right."""
    ids = np.full((len(texts), seq_len), enc.pad_id, np.int32)
    mask = np.zeros((len(texts), seq_len), bool)
    for i, text in enumerate(texts):
        row = enc.encode_text(text, special_tokens=True)[0]
        if drop_first is not None and row[:1] == [drop_first]:
            row = row[1:]
        if len(row) > seq_len:
            row = row[:seq_len - 1] + row[-1:]
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    return ids, mask


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """eval_bleu and eval_chrf: sacreBLEU's corpus BLEU (13a tokenisation) and chrF, 0-100."""
    import sacrebleu

    return {"eval_bleu": float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score),
            "eval_chrf": float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)}
