"""zoo.audio: Whisper's log-mel features against transformers' WhisperFeatureExtractor, the
bad-input errors, resampling and SpecAugment; train.asr's manifest reader and WER; the
espeak-ng synthesis script end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import audio

SR = audio.SAMPLE_RATE
FRAMES = 200  # 2 s windows: the features are the same per frame as at 3000, and 15x cheaper
# One compiled program per shape (op-by-op dispatch compiles every primitive instead)
log_mel = jax.jit(audio.log_mel, static_argnums=1, static_argnames=("n_mels", "frames", "sample_rate", "trim"))


def _signals(samples: int) -> dict[str, np.ndarray]:
    """Real-valued test signals, float32 [samples], shorter than the window (so padded)."""
    t = np.arange(samples) / SR
    rng = np.random.default_rng(0)
    return {"tone": 0.5 * np.sin(2 * np.pi * 440 * t),
            "chirp": 0.3 * np.sin(2 * np.pi * (100 * t + 1500 * t ** 2)),  # 100 Hz -> ~5.5 kHz
            "noise": 0.2 * rng.uniform(-1, 1, samples),
            "silence": np.zeros(samples),
            "tone_and_noise": 0.05 * np.sin(2 * np.pi * 3000 * t) + 1e-3 * rng.standard_normal(samples)}


@pytest.fixture(scope="module", params=[80, 128])
def extractor(request):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=request.param)


def _Cfg(num_mel_bins: int, encoder_max_len: int) -> zoo.Config:
    """A Whisper-shaped config: log_mel reads num_mel_bins and encoder_max_len."""
    return zoo.preset("tiny-encdec", num_mel_bins=num_mel_bins, encoder_max_len=encoder_max_len)


def test_log_mel_matches_whisper_feature_extractor(extractor):
    """Every signal, padded to the window, equals transformers' numpy path within 1e-4, as one
    jitted batch (each row scaled by its own maximum, as the extractor does per waveform)."""
    n_mels = extractor.feature_size
    sigs = _signals(FRAMES * audio.HOP - 3001)
    batch = np.stack(list(sigs.values())).astype(np.float32)
    padded = np.pad(batch, ((0, 0), (0, FRAMES * audio.HOP - batch.shape[1])))
    want = extractor._np_extract_fbank_features(padded, "cpu")
    got = jax.jit(audio.log_mel, static_argnums=1)(batch, _Cfg(n_mels, FRAMES // 2))
    assert got.shape == (len(sigs), n_mels, FRAMES) and got.dtype == jnp.float32
    for i, name in enumerate(sigs):
        np.testing.assert_allclose(np.asarray(got[i]), want[i], atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_array_equal(audio.mel_filters(n_mels), extractor.mel_filters.astype(np.float32))


def test_log_mel_full_window_matches_extractor_call():
    """The real window (3000 frames, 30 s): 5 s of audio through WhisperFeatureExtractor's own
    __call__ (its padding to 480,000 samples included) against log_mel of the raw 5 s."""
    from transformers import WhisperFeatureExtractor

    x = _signals(5 * SR)["chirp"].astype(np.float32)
    want = WhisperFeatureExtractor(feature_size=80)(x, sampling_rate=SR, return_tensors="np").input_features
    got = audio.log_mel(x, n_mels=80, frames=3000)
    assert got.shape == (1, 80, 3000)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_log_mel_batch_rows_are_independent():
    """A loud tone beside near-silence: each row is floored at its own max - 8, so the batch
    equals the rows one at a time (a batch-wide max would flatten the quiet row)."""
    sigs = _signals(FRAMES * audio.HOP)
    loud, quiet = sigs["tone"], 1e-4 * sigs["noise"]
    batch = log_mel(np.stack([loud, quiet]).astype(np.float32), n_mels=80, frames=FRAMES)
    for i, x in enumerate((loud, quiet)):  # equal up to rounding (XLA may sum a batch in another order)
        alone = log_mel(x.astype(np.float32), n_mels=80, frames=FRAMES)[0]
        np.testing.assert_allclose(np.asarray(batch[i]), np.asarray(alone), atol=1e-6, rtol=0)
    # a batch-wide floor (the loud max - 8 in log10, - 2 after scaling) would lift the quiet row
    assert float(batch[1].min()) < float(batch[0].max()) - 2


def test_log_mel_sizes_from_cfg_and_keywords():
    x = jax.ShapeDtypeStruct((1000,), jnp.float32)
    assert jax.eval_shape(lambda w: audio.log_mel(w, _Cfg(128, 50)), x).shape == (1, 128, 100)
    assert jax.eval_shape(lambda w: audio.log_mel(w, _Cfg(128, 50), n_mels=80, frames=60), x).shape == (1, 80, 60)
    with pytest.raises(ValueError, match="n_mels="):
        audio.log_mel(np.zeros(1000, np.float32), frames=60)
    assert jax.eval_shape(lambda w: audio.log_mel(w, zoo.preset("tiny-encdec", num_mel_bins=80)), x).shape == \
        (1, 80, 2 * 128)  # no encoder_max_len: the encoder reads max_len positions
    with pytest.raises(ValueError, match=r"num_mel_bins is None \(the model reads token ids"):
        audio.log_mel(np.zeros(1000, np.float32), zoo.preset("tiny-encdec"))


@pytest.mark.parametrize("case", ["rate", "stereo_channels_last", "channels_axis", "int16", "too_long"])
def test_log_mel_bad_input(case):
    x = np.zeros(FRAMES * audio.HOP, np.float32)
    call, match = {
        "rate": (lambda: audio.log_mel(x, n_mels=80, frames=FRAMES, sample_rate=22050),
                 r"22050.*zoo\.audio\.resample\(waveform, 22050, 16000\)"),
        "stereo_channels_last": (lambda: audio.log_mel(np.zeros((4000, 2), np.float32), n_mels=80, frames=FRAMES),
                                 r"\(4000, 2\).*\[samples, channels\]"),
        "channels_axis": (lambda: audio.log_mel(np.zeros((2, 2, 4000), np.float32), n_mels=80, frames=FRAMES),
                          r"mono.*\(2, 2, 4000\)"),
        "int16": (lambda: audio.log_mel(np.zeros(4000, np.int16), n_mels=80, frames=FRAMES),
                  r"float samples in \[-1, 1\].*int16"),
        "too_long": (lambda: audio.log_mel(np.zeros(FRAMES * audio.HOP + 1, np.float32), n_mels=80, frames=FRAMES),
                     r"32001 samples.*window of 32000.*zoo\.audio\.windows.*trim=True"),
    }[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_long_audio_trim_and_windows():
    """trim=True keeps the first window; windows() splits into padded model windows that
    log_mel reads one per row."""
    x = _signals(FRAMES * audio.HOP * 2 + 500)["chirp"].astype(np.float32)
    trimmed = log_mel(x, n_mels=80, frames=FRAMES, trim=True)
    np.testing.assert_array_equal(np.asarray(trimmed), np.asarray(log_mel(x[:FRAMES * audio.HOP], n_mels=80,
                                                                         frames=FRAMES)))
    w = audio.windows(x, frames=FRAMES)
    assert w.shape == (3, FRAMES * audio.HOP) and w.dtype == np.float32
    np.testing.assert_array_equal(w.reshape(-1)[: x.size], x)
    assert not w.reshape(-1)[x.size:].any()
    assert jax.eval_shape(lambda a: audio.log_mel(a, n_mels=80, frames=FRAMES), w).shape == (3, 80, FRAMES)


def test_resample_keeps_pitch_and_duration():
    """A 1 kHz tone at 22,050 Hz (espeak-ng's rate) -> 16 kHz: the same duration, the peak
    still at 1 kHz."""
    x = np.sin(2 * np.pi * 1000 * np.arange(22050) / 22050).astype(np.float32)
    y = audio.resample(x, 22050)
    assert y.dtype == np.float32 and y.shape == (16000,)
    assert np.argmax(np.abs(np.fft.rfft(y))) == 1000  # 1 Hz bins over one second
    with pytest.raises(ValueError, match="int16"):
        audio.resample(np.zeros(10, np.int16), 8000)
    assert audio.resample(x.astype(jnp.bfloat16), 22050).dtype == np.float32  # bfloat16 is a float too


def test_spec_augment_bounds_and_determinism():
    feats = np.random.default_rng(0).standard_normal((6, 80, 100)).astype(np.float32)
    kw = dict(freq_masks=2, freq_width=10, time_masks=3, time_width=7)
    augment = jax.jit(lambda k, f: audio.spec_augment(k, f, **kw))
    mask = np.asarray(jax.jit(lambda k: audio.spec_augment_mask(k, feats.shape, **kw))(jax.random.key(1)))
    rows, cols = mask.all(axis=2), mask.all(axis=1)  # whole mel rows, whole frame columns
    np.testing.assert_array_equal(mask, rows[:, :, None] | cols[:, None, :])  # nothing but bands
    assert (rows.sum(1) <= 2 * 10).all() and (cols.sum(1) <= 3 * 7).all()
    assert len({m.tobytes() for m in mask}) == 6  # drawn per example
    out = np.asarray(augment(jax.random.key(1), feats))
    np.testing.assert_allclose(out, np.where(mask, feats.mean(axis=(1, 2), keepdims=True), feats), atol=1e-6)
    np.testing.assert_array_equal(out, np.asarray(augment(jax.random.key(1), feats)))
    assert not np.array_equal(out, np.asarray(augment(jax.random.key(2), feats)))
    # a width past the axis is capped at it: some examples lose every mel row, none errs
    widest = np.asarray(audio.spec_augment_mask(jax.random.key(3), (64, 10, 20), freq_masks=1, freq_width=50,
                                                time_masks=0, time_width=0))
    assert widest.all(axis=2).sum(1).max() == 10 and (widest.any(axis=2) == widest.all(axis=2)).all()


# --- train.asr: the manifest, the audio files, WER ------------------------------------------

def _wav(path, wave: np.ndarray, rate: int = SR) -> str:
    import soundfile

    soundfile.write(str(path), wave, rate, subtype="PCM_16")
    return path.name


def test_manifest_reads_resamples_and_names_bad_lines(tmp_path):
    """A 22,050 Hz clip is resampled to 16 kHz; each bad line is a DataError naming the
    manifest, the line and (for audio) the file."""
    import json

    from train import asr
    from train.tasks import DataError

    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)
    (tmp_path / "clips").mkdir()
    good = {"audio": "clips/" + _wav(tmp_path / "clips" / "a.wav", tone, 22050), "text": "a tone"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(good) + "\n\n")
    utts = asr.read_manifest(manifest)
    assert utts.texts == ["a tone"] and utts.lines == [1] and utts.audio == [str(tmp_path / "clips" / "a.wav")]
    assert asr.load_audio(utts.audio[0]).shape == (16000,)
    feats = asr.features(utts, 80, 150, batch=2)
    assert feats.shape == (1, 80, 150) and feats.dtype == np.float32

    stereo = _wav(tmp_path / "stereo.wav", np.zeros((800, 2)))
    long = _wav(tmp_path / "long.wav", np.zeros(SR * 2))
    (tmp_path / "notaudio.wav").write_text("hello")
    cases = [("{not json", r"m\.jsonl line 2: expected a JSON object"),
             (json.dumps({"audio": "clips/a.wav"}), r"line 2: expected an object with 'audio'.*'text'"),
             (json.dumps({"audio": "clips/a.wav", "text": " "}), r"line 2: expected a transcript"),
             (json.dumps({"audio": "missing.wav", "text": "x"}), r"line 2: audio file .*missing\.wav not found")]
    for line, match in cases:
        manifest.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(DataError, match=match):
            asr.read_manifest(manifest)
    for clip, match in ((stereo, r"line 2: .*stereo\.wav: expected mono audio, got 2 channels"),
                        ("notaudio.wav", r"line 2: .*notaudio\.wav: not a readable audio file"),
                        (long, r"line 2: .*long\.wav lasts 2\.00 s, longer than the model's window of 1\.50 s")):
        manifest.write_text(json.dumps(good) + "\n" + json.dumps({"audio": clip, "text": "x"}) + "\n")
        with pytest.raises(DataError, match=match):
            asr.features(asr.read_manifest(manifest), 80, 150)


def test_wer_normalises_case_and_punctuation():
    from train.asr import normalize, wer

    assert normalize("  Twenty-one, DON'T stop!  ") == "twenty one dont stop"
    assert wer(["Hello, World!", "twenty-one"], ["hello world", "twenty one"]) == 0.0
    # 5 reference words: one substitution, one deletion -> 2 / 5
    assert wer(["four hundred and twelve", "nine"], ["four hundred and eleven", ""]) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="as many hypotheses as references"):
        wer(["a"], [])
    with pytest.raises(ValueError, match=r"reference 0 \('\?!'\) has no words"):
        wer(["?!"], ["a"])


# --- bench.speech_data: espeak-ng -> manifest -> features -----------------------------------

def test_speech_data_synthesises_a_manifest_log_mel_reads(tmp_path):
    """Three utterances spoken by espeak-ng, read back through the manifest into log_mel."""
    import shutil

    from bench import speech_data
    from train import asr

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: apt-get install espeak-ng (.ci/run installs it)")
    counts = speech_data.synthesise(tmp_path, 3, held_out=0.5, max_number=20, seed=1, vocab_size=24)
    assert counts["train"] + counts["heldout"] == 3 and counts["dropped"] == 0
    utts = [asr.read_manifest(tmp_path / f"{s}.jsonl") for s in ("train", "heldout") if counts[s]]
    train_texts = set(utts[0].texts) if counts["train"] else set()
    assert not train_texts & set(utts[-1].texts if counts["heldout"] else ())  # held-out texts are new
    for u in utts:
        assert all(t in {speech_data.number_words(n) for n in range(21)} for t in u.texts)
        feats = asr.features(u, 80, 300)  # 3 s windows
        assert feats.shape == (len(u), 80, 300)
        assert (feats.std(axis=(1, 2)) > 0.1).all()  # speech, not silence
    tok = zoo.tokenizer.load(tmp_path / "tokenizer.model")  # trained on the train texts
    assert tok.pad_id == 0 and tok.eos_id == 1 and tok.vocab_size <= 24


def test_speech_data_without_espeak_says_how_to_install(monkeypatch, tmp_path):
    from bench import speech_data

    monkeypatch.setattr(speech_data.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        speech_data.synthesise(tmp_path, 3)


def test_asr_demo_window_covers_the_longest_clip_and_evaluations_are_timed(tmp_path):
    """bench.asr_demo: encoder_max_len from the manifests' longest clip (a clip of exactly
    3.000 s may last up to 3.0005 s: the window must be longer); an evaluation's time is its
    row's interval less its steps at the others' pace."""
    import json

    from bench import asr_demo

    for name, secs in (("train.jsonl", [1.2, 3.0]), ("heldout.jsonl", [2.5])):
        (tmp_path / name).write_text("".join(json.dumps({"seconds": s}) + "\n" for s in secs))
    assert asr_demo.window_of(tmp_path) == 160  # 2 x 160 frames = 3.2 s > 3.0005 s
    rows = [{"step": 10, "time_s": 20.0}, {"step": 20, "time_s": 30.0},
            {"step": 30, "time_s": 45.0, "loss": 1.0, "eval_loss": 2.0, "eval_wer": 0.5}]
    [row] = asr_demo.table(rows)
    assert row["eval_s"] == 5.0 and row["wall_s"] == 45.0 and row["eval_wer"] == 0.5
