"""Synthetic speech for the ASR demonstration: espeak-ng speaks texts to 16 kHz WAV files and a
JSONL manifest (train/asr.py's format) lists them, split into train and held-out sets.

    python -m bench.speech_data --out runs/speech --count 3000 --texts numbers
    python -m bench.speech_data --out runs/speech --count 3000 --texts multi30k --max-words 6

Texts: `numbers` are integers 0..--max-number in words, British style ("four hundred and
twelve"); `multi30k` are the English sentences of Multi30k's train split (from the shared
data folder, `ZOO_DATA_DIR` or ../shared/data) of at most --max-words words; `both` mixes
them half and half. Each utterance draws a text, a voice (--voices, espeak-ng names) and a
speed (--speeds, words per minute), so one text is heard in several voices. The held-out
set is a fraction of the distinct texts (--held-out), none of which occurs in the train set:
its word error rate measures recognition of new word sequences, not recall. espeak-ng writes
22,050 Hz WAVs; they are resampled to 16 kHz (zoo.audio.resample) and written as 16-bit PCM
under OUT/clips/, with OUT/train.jsonl and OUT/heldout.jsonl beside them, and
OUT/tokenizer.model: a SentencePiece unigram model of --vocab-size pieces (fewer when the
texts allow fewer) trained on the train texts, for `python -m train finetune --task asr
--tokenizer OUT/tokenizer.model`. Nothing is downloaded; espeak-ng comes from Debian
(`apt-get install espeak-ng`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from zoo import audio

VOICES = ("en-us", "en-gb", "en-gb-scotland")
SPEEDS = (130, 160, 190)  # words per minute; espeak-ng's default is 175
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in English words, British style: 412 -> "four hundred and twelve"."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words: expected 0 <= n < 1000000, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    tail = "" if rest == 0 else (" and " if rest < 100 else " ") + number_words(rest)
    return number_words(n // 1000) + " thousand" + tail


def data_dir() -> Path:
    """The shared data folder: ZOO_DATA_DIR, else ../shared/data beside the checkout."""
    if "ZOO_DATA_DIR" in os.environ:
        return Path(os.environ["ZOO_DATA_DIR"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def sentences(max_words: int) -> list[str]:
    """Multi30k's English train sentences of at most max_words words, distinct, file order."""
    path = data_dir() / "multi30k" / "train.en"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Multi30k's English side not found (set ZOO_DATA_DIR to the shared data "
                                f"folder, or use --texts numbers)")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return list(dict.fromkeys(s for s in lines if s and len(s.split()) <= max_words))


def texts_of(kind: str, max_number: int, max_words: int) -> list[str]:
    """The distinct texts of --texts `kind`."""
    numbers = [number_words(n) for n in range(max_number + 1)] if kind in ("numbers", "both") else []
    words = sentences(max_words) if kind in ("multi30k", "both") else []
    if kind == "both":  # half and half: as many sentences as numbers (or all there are)
        words = words[:len(numbers)]
    return numbers + words


def espeak() -> str:
    """The espeak-ng executable; FileNotFoundError saying how to install it when missing."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng not found on PATH: install it with `apt-get install espeak-ng` "
                                "(Debian/Ubuntu; the speech demonstration synthesises its audio with it)")
    return exe


def speak(exe: str, text: str, voice: str, speed: int, out: Path) -> float:
    """Speaks `text` to a 16 kHz 16-bit mono WAV at `out`; returns its duration in seconds."""
    import soundfile

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        done = subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(raw), "--", text],
                              capture_output=True, text=True)
        if done.returncode != 0 or not raw.is_file():
            raise RuntimeError(f"espeak-ng -v {voice} -s {speed} failed on {text!r}: {done.stderr.strip()}")
        wave, rate = soundfile.read(str(raw), dtype="float32")
    wave16 = np.clip(audio.resample(wave, int(rate)), -1.0, 1.0)
    soundfile.write(str(out), wave16, audio.SAMPLE_RATE, subtype="PCM_16")
    return len(wave16) / audio.SAMPLE_RATE


def synthesise(out: str | Path, count: int, *, texts: str = "numbers", voices: Sequence[str] = VOICES,
               speeds: Sequence[int] = SPEEDS, held_out: float = 0.1, max_number: int = 999, max_words: int = 8,
               max_seconds: float = 30.0, seed: int = 0, workers: int = 2, vocab_size: int = 0) -> dict[str, int]:
    """Writes OUT/clips/*.wav, OUT/train.jsonl and OUT/heldout.jsonl, and with vocab_size > 0
    OUT/tokenizer.model (module docstring); returns the number of utterances in each split.
    Clips longer than max_seconds (the model's window) are left out of the manifests and
    counted as `dropped`."""
    exe = espeak()
    if not 0 < held_out < 1:
        raise ValueError(f"--held-out: expected a fraction between 0 and 1, got {held_out}")
    pool = texts_of(texts, max_number, max_words)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    n_held = max(1, int(round(held_out * len(pool))))
    held = {int(i) for i in order[:n_held]}
    picks = rng.integers(0, len(pool), count)
    voice_ids, speed_ids = rng.integers(0, len(voices), count), rng.integers(0, len(speeds), count)
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    jobs = [(pool[p], voices[v], int(speeds[s]), out / "clips" / f"{i:06d}.wav")
            for i, (p, v, s) in enumerate(zip(picks, voice_ids, speed_ids))]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as ex:  # espeak-ng runs as a subprocess
        seconds = list(ex.map(lambda job: speak(exe, *job), jobs))
    counts = {"train": 0, "heldout": 0, "dropped": 0}
    train_texts = []
    with open(out / "train.jsonl", "w") as train, open(out / "heldout.jsonl", "w") as heldout:
        for pick, (text, voice, speed, path), dur in zip(picks, jobs, seconds):
            if dur > max_seconds:
                counts["dropped"] += 1
                continue
            split = "heldout" if int(pick) in held else "train"
            row = {"audio": str(path.relative_to(out)), "text": text, "voice": voice, "speed": speed,
                   "seconds": round(dur, 3)}
            (heldout if split == "heldout" else train).write(json.dumps(row) + "\n")
            counts[split] += 1
            if split == "train":
                train_texts.append(text)
    if vocab_size and train_texts:
        tokenizer(train_texts, vocab_size).save(out / "tokenizer.model")
    return counts


def tokenizer(texts: Sequence[str], vocab_size: int):
    """A SentencePiece unigram model of the texts, at most vocab_size pieces (T5's ids: pad 0,
    eos 1, unk 2, no bos), as zoo.tokenizer trains it."""
    import zoo.tokenizer

    return zoo.tokenizer.train(sorted(set(texts)), vocab_size, hard_vocab_limit=False)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speech_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (clips/, train.jsonl, heldout.jsonl)")
    p.add_argument("--count", type=int, required=True, help="utterances to synthesise")
    p.add_argument("--texts", choices=("numbers", "multi30k", "both"), default="numbers")
    p.add_argument("--voices", default=",".join(VOICES), help="espeak-ng voices, comma-separated")
    p.add_argument("--speeds", default=",".join(map(str, SPEEDS)), help="words per minute, comma-separated")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of the distinct texts held out")
    p.add_argument("--max-number", type=int, default=999, help="numbers: the largest one spoken")
    p.add_argument("--max-words", type=int, default=8, help="multi30k: the longest sentence, in words")
    p.add_argument("--max-seconds", type=float, default=30.0, help="leave out clips longer than this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="espeak-ng processes at once")
    p.add_argument("--vocab-size", type=int, default=256,
                   help="pieces of OUT/tokenizer.model, trained on the train texts (0: no tokenizer)")
    a = p.parse_args(argv)
    try:
        counts = synthesise(a.out, a.count, texts=a.texts, voices=a.voices.split(","),
                            speeds=[int(s) for s in a.speeds.split(",")], held_out=a.held_out,
                            max_number=a.max_number, max_words=a.max_words, max_seconds=a.max_seconds,
                            seed=a.seed, workers=a.workers, vocab_size=a.vocab_size)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dropped = f", {counts['dropped']} dropped (over {a.max_seconds} s)" if counts["dropped"] else ""
    print(f"{a.out}: {counts['train']} train, {counts['heldout']} held-out utterances{dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
