"""`python -m train finetune --task asr` (train/asr.py): a tiny Whisper-shaped model from
scratch on "speech" whose answer is known: each word is a tone of its own pitch, so a
transcript is the sequence of pitches heard. A word-level tokenizer.json with Whisper's
forced prefix (<|sot|> <|en|> <|transcribe|> <|notimestamps|> $A <|eot|>); the evaluation's
WER is checked against zoo.generate run by hand from that prefix on the best checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from train import asr, finetune
from train.export import restore_run
from train.objectives import asr as asr_batch
from train.tasks import load_encoder
from train_util import word_level_tokenizer

PITCH = {"red": 300.0, "green": 700.0, "blue": 1500.0, "cat": 3000.0}  # Hz
SPECIALS = ["<pad>", "<|eot|>", "<unk>", "<|sot|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
PREFIX = "<|sot|> <|en|> <|transcribe|> <|notimestamps|>"
SEQ = 10
# a 0.5 s window: 50 frames of 16 mel bins, 25 encoder positions
OVERRIDES = ["num_mel_bins=16", "encoder_max_len=25"]
SR = zoo.audio.SAMPLE_RATE


def _write_manifest(folder: Path, name: str, n: int, seed: int) -> None:
    """n clips of 1-3 words, 0.12 s of tone each, at 16 kHz or 22,050 Hz (resampled on reading)."""
    import soundfile

    rng = random.Random(seed)
    (folder / "clips").mkdir(exist_ok=True)
    with open(folder / name, "w") as f:
        for i in range(n):
            words = [rng.choice(list(PITCH)) for _ in range(rng.randint(1, 3))]
            rate = rng.choice([SR, 22050])
            t = np.arange(int(0.12 * rate)) / rate
            wave = np.concatenate([0.5 * np.sin(2 * np.pi * PITCH[w] * t) for w in words])
            clip = f"clips/{name}-{i}.wav"
            soundfile.write(str(folder / clip), wave, rate, subtype="PCM_16")
            f.write(json.dumps({"audio": clip, "text": " ".join(words).capitalize() + "."}) + "\n")


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("speech")
    template = f"{PREFIX} $A <|eot|>"
    tok = word_level_tokenizer(SPECIALS, list(PITCH), template,
                               [(t, SPECIALS.index(t)) for t in SPECIALS if t in template])
    tok.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Lowercase(),
                                                      tokenizers.normalizers.Replace(".", "")])
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(out / "tokenizer")
    _write_manifest(out, "train.jsonl", 96, 0)
    _write_manifest(out, "dev.jsonl", 16, 1)
    return out


def test_transcripts_follow_the_forced_prefix(speech_dir):
    """The decoder reads start_id, then the prefix, then the text; generation starts from the
    same prompt. A start id that opens the prefix itself (Whisper's <|startoftranscript|>) is
    read once."""
    enc = load_encoder(speech_dir / "tokenizer")
    sot, eot = SPECIALS.index("<|sot|>"), SPECIALS.index("<|eot|>")
    prefix = [sot, 4, 5, 6]
    assert asr.forced_prefix(enc) == prefix
    rows, prompt = asr.encode_transcripts(enc, ["Red cat."], SEQ, start_id=0)
    red, cat = (enc.encode_text(w)[0][0] for w in ("red", "cat"))
    assert rows["target"][0].tolist() == prefix + [red, cat, eot] + [0] * (SEQ - 7)
    assert rows["target_mask"][0].sum() == 7 and prompt.tolist() == [0] + prefix
    rows, prompt = asr.encode_transcripts(enc, ["Red cat."], SEQ, start_id=sot)
    assert rows["target"][0, :6].tolist() == [4, 5, 6, red, cat, eot] and prompt.tolist() == prefix


def test_asr_objective_masks_training_features_only():
    rows = {"features": np.random.default_rng(0).standard_normal((4, 16, 50)).astype(np.float32),
            "target": np.ones((4, SEQ), np.int32), "target_mask": np.ones((4, SEQ), bool),
            "weights": np.ones(4, np.float32)}
    plain = asr_batch(None, rows, start_id=0, spec_augment=(2, 4, 2, 10))
    np.testing.assert_array_equal(np.asarray(plain["inputs"]), rows["features"])
    masked = asr_batch(jax.random.key(0), rows, start_id=0, spec_augment=(2, 4, 2, 10))
    assert not np.array_equal(np.asarray(masked["inputs"]), rows["features"])
    assert np.asarray(masked["decoder_inputs"])[:, 0].tolist() == [0] * 4


def test_asr_trains_and_scores_what_it_generates(speech_dir, tmp_path, monkeypatch):
    """40 steps with SpecAugment on a data=2 mesh: the held-out loss falls, eval_wer is
    reported (and names best/); the evaluation generates from the forced prefix, and its WER
    equals jiwer's on zoo.generate's transcripts of that checkpoint, decoded by the tokenizer."""
    prompts, real = [], zoo.generate

    def generate(*args, decoder_prompt=None, **kw):  # the model would also write the prefix unforced
        prompts.append(None if decoder_prompt is None else np.asarray(decoder_prompt).tolist())
        return real(*args, decoder_prompt=decoder_prompt, **kw)

    monkeypatch.setattr(finetune.zoo, "generate", generate)
    run_dir = tmp_path / "run"
    argv = ["--model", "tiny-encdec", "--tokenizer", str(speech_dir / "tokenizer"), *OVERRIDES, "--task", "asr",
            "--data", str(speech_dir / "train.jsonl"), "--eval-data", str(speech_dir / "dev.jsonl"),
            "--run-dir", str(run_dir), "--batch-size", "16", "--seq-len", str(SEQ), "--lr", "1e-2",
            "--steps", "40", "--eval-every", "40", "--spec-augment", "1", "3", "1", "5", "--mesh", "data=2"]
    assert finetune.main(argv) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_wer" in r]
    assert [r["step"] for r in evals] == [40] and evals[-1]["eval_loss"] < 0.5 * rows[0]["loss"]
    best = json.loads((run_dir / "run.json").read_text())["best"]
    assert best["metric"] == "eval_wer" and best["step"] == 40 and best["eval_wer"] < 1.0

    monkeypatch.undo()
    assert prompts and all(p == [0, *range(3, 7)] for p in prompts)  # <pad> (the start id), then the prefix
    state = restore_run(run_dir)
    cfg = state.cfg
    enc = load_encoder(run_dir / "tokenizer")
    dev = asr.read_manifest(speech_dir / "dev.jsonl")
    feats = asr.features(dev, cfg.num_mel_bins, 2 * cfg.encoder_max_len)
    prompt = jnp.asarray([cfg.decoder_start_id] + asr.forced_prefix(enc))
    out = np.asarray(zoo.generate(state.params, cfg, feats, SEQ, decoder_prompt=prompt))
    texts = [enc.decode(r[:list(r).index(cfg.eos_id)] if cfg.eos_id in r else r) for r in out]
    assert asr.wer(dev.texts, texts) == pytest.approx(best["eval_wer"])


@pytest.mark.parametrize("argv, match", [
    (["--task", "seq2seq", "--spec-augment", "1", "2", "3", "4"],
     "--spec-augment: masks audio features, for --task asr"),
    (["--task", "asr", "--spec-augment", "1", "2"], "spec_augment .*: expected four non-negative integers"),
])
def test_asr_flags_refused(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        finetune.resolve(["--model", "tiny-encdec", "--tokenizer", "x", "--data", "d", *argv])


def test_asr_needs_a_feature_encoder(speech_dir, tmp_path, capsys):
    argv = ["--model", "tiny-encdec", "--tokenizer", str(speech_dir / "tokenizer"), "--task", "asr",
            "--data", str(speech_dir / "train.jsonl"), "--run-dir", str(tmp_path / "run"), "--steps", "1"]
    assert finetune.main(argv) == 2
    assert "--task asr trains a feature encoder-decoder (Config.num_mel_bins set" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
