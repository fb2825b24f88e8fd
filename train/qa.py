"""Extractive question answering (`python -m train finetune --task qa`): SQuAD v1.1 / v2.0 JSON
-> windows of (question, context) tokens with answer-span targets, and the windows' start/end
logits -> answer texts -> exact match and F1 as the SQuAD evaluation script defines them.

A context longer than the window is cut into several windows that overlap by `stride`
tokens (the question is repeated in each). A window whose context part does not hold the
whole answer is trained to point at its first token ([CLS]), as is every window of an
unanswerable question (v2.0 `is_impossible`). An answer is read back from the best
(start <= end, at most `max_answer` tokens, both in the context) span over all windows of a
question, by the sum of the two logits, and mapped to the context's characters through the
tokenizer's offsets; a v2.0 question is answered "" when the [CLS] span scores higher.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import string
from pathlib import Path
from typing import Any

import numpy as np

from train.tasks import DataError, TextEncoder, data_file


@dataclasses.dataclass(frozen=True)
class Questions:
    """Each question with its context and gold answers (text, character start); `lines` names
    each question for messages (SQuAD is one JSON document: "question ID")."""

    path: str
    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[tuple[str, int]]]  # [] for an unanswerable question
    lines: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def read_squad(path: str | Path) -> Questions:
    """The questions of a SQuAD-format JSON file (v1.1 or v2.0)."""
    path = data_file(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: expected SQuAD JSON, got invalid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: expected SQuAD JSON, an object with a 'data' list of articles")
    out = Questions(str(path), [], [], [], [], [])
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            context = para.get("context")
            if not isinstance(context, str):
                raise DataError(f"{path}: data[{a}].paragraphs[{p}]: expected a 'context' string")
            for q in para.get("qas", []):
                _add(out, q, context, f"{path}: data[{a}].paragraphs[{p}]")
    if not out.ids:
        raise DataError(f"{path}: the file has no questions (data[].paragraphs[].qas[])")
    return out


def _add(out: Questions, q: Any, context: str, where: str) -> None:
    if not isinstance(q, dict) or not isinstance(q.get("question"), str):
        raise DataError(f"{where}: expected each qas entry to hold a 'question' string")
    qid = str(q.get("id", len(out.ids)))
    answers = [] if q.get("is_impossible") else q.get("answers", [])
    gold = []
    for ans in answers:
        text, start = ans.get("text"), ans.get("answer_start")
        if not isinstance(text, str) or not isinstance(start, int) or context[start:start + len(text)] != text:
            raise DataError(f"{where}: question {qid}: answer {ans!r} is not the context's text at answer_start")
        gold.append((text, start))
    if not gold and not q.get("is_impossible"):
        raise DataError(f"{where}: question {qid}: expected answers, or is_impossible: true (SQuAD v2.0)")
    out.ids.append(qid), out.questions.append(q["question"]), out.contexts.append(context)
    out.answers.append(gold), out.lines.append(f"question {qid}")


@dataclasses.dataclass
class Windows:
    """The windows of the questions: device rows (tokens, token_types, mask, labels [N, 2]:
    the start and end token of the answer, 0 where the window lacks it) and what reading the
    answers back needs (the question of each window, the characters of its context tokens)."""

    rows: dict[str, np.ndarray]
    question: np.ndarray  # int [N]: index into Questions
    offsets: np.ndarray  # int [N, T, 2]: characters of each context token, -1 elsewhere


def windows(enc: TextEncoder, data: Questions, seq_len: int, stride: int) -> Windows:
    """Every question's windows over its context (module docstring)."""
    if enc.fast is None:
        raise DataError(f"{data.path}: --task qa needs a tokenizer.json or vocab.txt tokenizer (its character "
                        f"offsets map answers to tokens); this checkpoint's is SentencePiece")
    fast = enc.fast
    fast.no_padding()
    try:
        fast.enable_truncation(max_length=seq_len, stride=stride, strategy="only_second")
    except Exception as e:  # tokenizers rejects a stride that leaves no room to move forward
        raise ValueError(f"--doc-stride {stride}: too large for --seq-len {seq_len} ({e})") from None
    rows = collections.defaultdict(list)
    question, offsets = [], []
    for i in range(len(data)):
        try:
            first = fast.encode(data.questions[i], data.contexts[i])
        except Exception as e:
            raise ValueError(f"{data.path}: question {data.ids[i]}: cannot fit it into --seq-len {seq_len} with "
                             f"--doc-stride {stride} ({e})") from None
        for e in [first, *first.overflowing]:
            ctx = np.array([s == 1 for s in e.sequence_ids])
            off = np.where(ctx[:, None], np.array(e.offsets), -1)
            k = len(e.ids)
            pad = seq_len - k
            rows["tokens"].append(np.pad(e.ids, (0, pad), constant_values=enc.pad_id))
            rows["token_types"].append(np.pad(e.type_ids, (0, pad)))
            rows["mask"].append(np.arange(seq_len) < k)
            rows["labels"].append(_span(data.answers[i], off))
            question.append(i)
            offsets.append(np.pad(off, ((0, pad), (0, 0)), constant_values=-1))
    out = {k: np.stack(v).astype(bool if k == "mask" else np.int32) for k, v in rows.items()}
    return Windows(out, np.array(question, np.int32), np.stack(offsets).astype(np.int32))


def _span(answers: list[tuple[str, int]], off: np.ndarray) -> np.ndarray:
    """int [2]: the tokens holding the first answer's first and last character, (0, 0) when
    there is none or this window does not hold all of it."""
    if not answers:
        return np.zeros(2, np.int64)
    text, start = answers[0]
    end = start + len(text)
    inside = off[:, 0] >= 0
    first = np.flatnonzero(inside & (off[:, 0] <= start) & (off[:, 1] > start))
    last = np.flatnonzero(inside & (off[:, 0] < end) & (off[:, 1] >= end))
    if not len(first) or not len(last):
        return np.zeros(2, np.int64)
    return np.array([first[0], last[-1]])


# --- reading answers back and scoring them -----------------------------------------------------

def answers(logits: np.ndarray, w: Windows, data: Questions, max_answer: int = 30,
            allow_empty: bool = False) -> list[str]:
    """Each question's answer text from its windows' logits [N, T, 2] (start, end)."""
    best: list[tuple[float, str]] = [(-np.inf, "")] * len(data)
    null = [np.inf] * len(data)
    for n in range(len(w.question)):
        q, off = w.question[n], w.offsets[n]
        start, end = logits[n, :, 0], logits[n, :, 1]
        null[q] = min(null[q], float(start[0] + end[0]))
        ctx = off[:, 0] >= 0
        score = start[:, None] + end[None, :]
        allowed = ctx[:, None] & ctx[None, :] & np.triu(np.ones_like(score, bool)) & \
            ~np.triu(np.ones_like(score, bool), max_answer)
        if not allowed.any():
            continue
        s, e = np.unravel_index(np.argmax(np.where(allowed, score, -np.inf)), score.shape)
        if score[s, e] > best[q][0]:
            best[q] = (float(score[s, e]), data.contexts[q][off[s, 0]:off[e, 1]])
    return [("" if allow_empty and null[q] > best[q][0] else best[q][1]) for q in range(len(data))]


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of two normalised answers (both empty: 1)."""
    p, g = normalize(prediction).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], data: Questions) -> dict[str, float]:
    """eval_exact_match and eval_f1 (fractions of 1; the script prints them x100): each
    question's best over its gold answers ("" for an unanswerable one), averaged."""
    em, f = [], []
    for pred, gold in zip(predictions, data.answers):
        texts = [t for t, _ in gold] or [""]
        em.append(max(float(normalize(pred) == normalize(t)) for t in texts))
        f.append(max(f1(pred, t) for t in texts))
    return {"eval_exact_match": float(np.mean(em)), "eval_f1": float(np.mean(f))}
