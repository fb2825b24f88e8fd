"""Helpers shared by the training tests: small vocabularies, tokenizers and corpora."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from train.tokens import Tokenizer, Vocab, train_tokenizer

SHAKESPEARE = Path(os.environ["ZOO_DATA_DIR"]) / "tinyshakespeare.txt"  # set by conftest


def vocab(size: int = 128, sentinels: int = 20) -> Vocab:
    """A synthetic vocabulary: pad 0, eos 1, unk 2, mask 3, sentinels at the top, and id 10
    ending sentences. Ordinary tokens are 11 .. size - sentinels - 1."""
    return Vocab(size=size, pad_id=0, eos_id=1, unk_id=2, mask_id=3,
                 sentinel_ids=tuple(size - 1 - i for i in range(sentinels)), sentence_end_ids=(10,))


def ordinary(rng: np.random.Generator, shape: tuple[int, ...], v: Vocab) -> np.ndarray:
    """Random non-special ids of `v`, int32."""
    return rng.integers(11, v.size - len(v.sentinel_ids), shape).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shakespeare_texts(chars: int = 200_000, pieces: int = 20) -> tuple[str, ...]:
    """The first `chars` characters of Tiny Shakespeare, cut into `pieces` documents."""
    text = SHAKESPEARE.read_text()[:chars]
    step = len(text) // pieces
    return tuple(text[i * step:(i + 1) * step] for i in range(pieces))


@functools.lru_cache(maxsize=None)
def small_tokenizer(sentinels: int = 0, vocab_size: int = 512) -> Tokenizer:
    model_type = "unigram" if sentinels else "bpe"
    return train_tokenizer(shakespeare_texts(), vocab_size=vocab_size + sentinels,
                           num_sentinels=sentinels, model_type=model_type)


def cli_args(run_dir: Path, tokenizer_path: Path, *extra: str) -> list[str]:
    """`python -m train` arguments of a tiny Shakespeare run: tiny-decoder, a given tokenizer,
    batch 8 x 32, then `extra`."""
    return ["--model", "tiny-decoder", "--data", str(SHAKESPEARE), "--tokenizer", str(tokenizer_path),
            "--run-dir", str(run_dir), "--batch-size", "8", "--seq-len", "32", *extra]
