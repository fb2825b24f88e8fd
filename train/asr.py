"""Speech recognition data (`--task asr`): a JSONL manifest of audio files and transcripts ->
log-mel features; transcripts -> word error rate with `jiwer`.

A manifest line is `{"audio": "clips/0001.wav", "text": "four hundred and twelve"}`; a
relative path is read from the manifest's folder. Audio is read with `soundfile` (WAV, FLAC,
OGG, ...) as float32 in [-1, 1], must be mono, is resampled to 16 kHz on the host
(`zoo.audio.resample`) and must fit the model's window (`frames * 160` samples). Every error
names the manifest line and the audio file.

Word error rate (`wer`): (substitutions + deletions + insertions) / reference words over the
whole set, after one normalisation of both sides (`normalize`): lowercase, apostrophes
dropped ("don't" -> "dont"), every other punctuation character a space ("twenty-one" ->
"twenty one"), runs of whitespace one space.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from train.seq2seq import encode_texts
from train.tasks import DataError, TextEncoder, data_file, json_line
from zoo import audio
from zoo.nn.stem import frames


@dataclasses.dataclass(frozen=True)
class Utterances:
    """Audio files (resolved paths), their transcripts, and the manifest line of each."""

    path: str
    audio: list[str]
    texts: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def read_manifest(path: str | Path) -> Utterances:
    """The utterances of a JSONL manifest (module docstring); DataError naming the line when
    a line is not an object with an `audio` path and a non-empty `text`, or its file is missing."""
    path = data_file(path)
    out = Utterances(str(path), [], [], [])
    for n, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        obj = json_line(raw, path, n)
        if not (isinstance(obj, dict) and isinstance(obj.get("audio"), str) and isinstance(obj.get("text"), str)):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{path} line {n}: expected an object with 'audio' (a file path) and 'text' strings, "
                            f"got {got}")
        if not obj["text"].strip():
            raise DataError(f"{path} line {n}: expected a transcript in 'text', got an empty string")
        clip = path.parent / obj["audio"]
        if not clip.is_file():
            raise DataError(f"{path} line {n}: audio file {clip} not found (a relative 'audio' path is read from "
                            f"the manifest's folder)")
        out.audio.append(str(clip)), out.texts.append(obj["text"]), out.lines.append(n)
    if not out.texts:
        raise DataError(f"{path}: the manifest has no utterances")
    return out


def load_audio(path: str | Path, where: str = "") -> np.ndarray:
    """float32 [samples] at 16 kHz: the mono file at `path` (any rate soundfile reads),
    resampled. `where` (e.g. "manifest.jsonl line 3: ") leads every error message."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [frames, channels]
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise DataError(f"{where}{path}: not a readable audio file ({e})") from None
    if data.shape[1] != 1:
        raise DataError(f"{where}{path}: expected mono audio, got {data.shape[1]} channels; mix it down first "
                        f"(e.g. sox in.wav -c 1 out.wav, or average the channels)")
    return audio.resample(data[:, 0], int(rate), audio.SAMPLE_RATE)


def features(utts: Utterances, n_mels: int, frames: int, batch: int = 32) -> np.ndarray:
    """float32 [N, n_mels, frames]: each utterance's Whisper log-mel features (zoo.audio.log_mel),
    computed `batch` clips at a time. DataError naming the line and file for audio longer than
    the window (frames * 160 samples)."""
    fn = jax.jit(lambda w: audio.log_mel(w, n_mels=n_mels, frames=frames))
    window = frames * audio.HOP
    out = np.zeros((len(utts), n_mels, frames), np.float32)
    for start in range(0, len(utts), batch):
        waves = np.zeros((min(batch, len(utts) - start), window), np.float32)
        for i in range(len(waves)):
            k = start + i
            where = f"{utts.path} line {utts.lines[k]}: "
            x = load_audio(utts.audio[k], where)
            if x.size > window:
                raise DataError(f"{where}{utts.audio[k]} lasts {x.size / audio.SAMPLE_RATE:.2f} s, longer than the "
                                f"model's window of {window / audio.SAMPLE_RATE:.2f} s ({frames} frames); cut it "
                                f"into shorter clips (zoo.audio.windows splits audio into windows)")
            waves[i, :x.size] = x
        # a full batch always, so the last one compiles no second program
        padded = np.zeros((batch, window), np.float32)
        padded[:len(waves)] = waves
        out[start:start + len(waves)] = np.asarray(fn(padded))[:len(waves)]
    return out


# --- transcripts ---------------------------------------------------------------------------

def forced_prefix(enc: TextEncoder) -> list[int]:
    """The ids the tokenizer's template puts before every text (Whisper's
    <|startoftranscript|><|en|><|transcribe|><|notimestamps|>; none for most tokenizers)."""
    plain = enc.encode_text("a", special_tokens=False)[0]
    full = enc.encode_text("a", special_tokens=True)[0]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k]
    raise ValueError(f"{enc.source}: the tokenizer's special-token template changes the text's own ids "
                     f"({plain} -> {full}); cannot tell its forced prefix")


def encode_transcripts(enc: TextEncoder, texts: Sequence[str], seq_len: int,
                       start_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({"target", "target_mask"} int32 / bool [N, seq_len], decoder prompt int32 [P]).

    The targets are the texts with the tokenizer's special tokens, a leading start_id
    dropped (the decoder reads start_id first: transformers' Whisper recipe), cut at seq_len
    keeping the closing token. The prompt is start_id and the rest of the forced prefix:
    what generation starts from, so the new tokens are the transcript."""
    prefix = forced_prefix(enc)
    if prefix[:1] == [start_id]:
        prefix = prefix[1:]
    if len(prefix) + 2 > seq_len:
        raise ValueError(f"--seq-len {seq_len}: the tokenizer's forced prefix {prefix} leaves no room for a "
                         f"transcript; use at least {len(prefix) + 2}")
    ids, mask = encode_texts(enc, texts, seq_len, drop_first=start_id)
    return {"target": ids, "target_mask": mask}, np.asarray([start_id, *prefix], np.int32)


def encode_utterances(enc: TextEncoder, utts: Utterances, cfg: Any, seq_len: int) -> tuple[dict[str, np.ndarray],
                                                                                        np.ndarray]:
    """The rows of `--task asr`: {"features" float32 [N, num_mel_bins, frames], "target",
    "target_mask" [N, seq_len]} for a feature encoder-decoder `cfg` (frames: what its
    encoder reads), and the decoder prompt int32 [P] (`encode_transcripts`)."""
    if cfg.num_mel_bins is None:
        raise ValueError("--task asr trains a feature encoder-decoder (Config.num_mel_bins set: Whisper); this "
                         "model reads token ids")
    if cfg.decoder_start_id is None:
        raise ValueError("--task asr: the model config names no decoder_start_id (the decoder's first token)")
    rows, prompt = encode_transcripts(enc, utts.texts, seq_len, cfg.decoder_start_id)
    return {"features": features(utts, cfg.num_mel_bins, frames(cfg)), **rows}, prompt


# --- word error rate -----------------------------------------------------------------------

_APOSTROPHES = "'\u2019"


def normalize(text: str) -> str:
    """The text WER compares: lowercase, apostrophes dropped, other punctuation (Unicode
    category P) a space, whitespace runs one space, no leading or trailing space."""
    text = "".join("" if c in _APOSTROPHES else " " if unicodedata.category(c).startswith("P") else c
                   for c in text.lower())
    return re.sub(r"\s+", " ", text).strip()


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate of hypotheses against references (jiwer.wer on the normalised
    texts): total edits / total reference words, 0 = perfect, above 1 possible."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"wer: expected as many hypotheses as references, got {len(hypotheses)} and "
                         f"{len(references)}")
    refs, hyps = [normalize(r) for r in references], [normalize(h) for h in hypotheses]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"wer: reference {empty[0]} ({references[empty[0]]!r}) has no words after normalisation")
    return float(jiwer.wer(refs, hyps)) if refs else 0.0
