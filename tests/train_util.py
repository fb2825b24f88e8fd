"""Helpers shared by the training tests: small vocabularies, tokenizers and corpora."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

import zoo
from train.loop import main
from train.report import read_metrics
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


def losses_on_two_meshes(tmp_path: Path, tokenizer_path: Path, model: str, overrides: dict[str, Any],
                         mesh: str, *extra: str) -> tuple[list[float], list[float], zoo.Config]:
    """Four steps of `python -m train --model MODEL [extra] KEY=VALUE...` on one device and on
    `mesh`: (one-device losses, mesh losses, the Config the run saved). The one-device loss falls."""
    losses = {}
    for m in ("data=1", mesh):
        run_dir = tmp_path / m.replace(",", "_").replace("=", "")
        argv = cli_args(run_dir, tokenizer_path, "--model", model, *extra, "--steps", "4", "--lr", "1e-2",
                        "--warmup", "0", "--eval-every", "4", "--eval-batches", "1", "--mesh", m,
                        *[f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        assert main(argv) == 0, m
        losses[m] = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    one, on_mesh = losses.values()
    assert len(one) == 4 and one[-1] < one[0], one
    return one, on_mesh, zoo.Config.from_json((run_dir / "config.json").read_text())


def word_level_tokenizer(specials: list[str], words: list[str], template: str, template_ids: list) -> Any:
    """A `tokenizers.Tokenizer` of whole words (ids: specials, then words) split on spaces,
    the specials as special added tokens and `template` (e.g. "<s> $A </s>", with its
    (token, id) pairs) as the post-processor: the tokenizer.json of the fine-tuning tests."""
    import tokenizers

    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in specials])
    tok.post_processor = tokenizers.processors.TemplateProcessing(single=template, special_tokens=template_ids)
    return tok
