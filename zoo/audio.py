"""Audio front-end: 16 kHz waveforms -> Whisper's log-mel features, and SpecAugment.

`log_mel` computes what transformers' `WhisperFeatureExtractor` (and OpenAI's Whisper)
computes, in JAX, batched and jittable:

    waveform [B, samples] float, 16 kHz, mono, values in [-1, 1]
      -> zero-padded to the window (frames * 160 samples; 30 s for frames = 3000)
      -> STFT: 400-point periodic Hann window, hop 160, centred (reflect-padded by 200 each side)
      -> power |X|^2, the last STFT frame dropped (frames of them)
      -> slaney-scale mel filterbank (80 or 128 bins, 0-8 kHz, slaney area normalisation)
      -> log10(max(mel, 1e-10)), floored at (each example's max - 8), then (x + 4) / 4
      -> float32 [B, n_mels, frames]

Inputs that would give a silently wrong spectrogram are errors: another sample rate (resample
on the host first with `resample`), several channels (`[B, C, samples]`, `[samples, C]`),
integer PCM (convert to float in [-1, 1]), and audio longer than the window. Long audio is
either split into windows with `windows` (each window is one model input; the caller joins
the transcripts) or cut with `trim=True`, which keeps the first window as transformers'
feature extractor does by default.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000  # Whisper's rate; every other rate is resampled on the host first
N_FFT = 400  # 25 ms windows
HOP = 160  # 10 ms hop: 100 frames a second
MAX_CHANNELS = 8  # a 2-D input whose last axis is this small is [samples, channels], not a batch


# --- the mel filterbank (numpy, once per size) ---------------------------------------------

def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, np.float64)
    linear = hz * 3.0 / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    linear = mel * 200.0 / 3.0
    log = 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0)
    return np.where(mel >= 15.0, log, linear)


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 [n_fft // 2 + 1, n_mels]: triangular filters with edges evenly spaced on the
    slaney mel scale from 0 Hz to sample_rate / 2, each scaled by 2 / its width in Hz (slaney
    normalisation: every filter has the same area), as librosa's `filters.mel` (Whisper's)."""
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # the rfft's bin frequencies
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower) / (centre - lower)
    falling = (upper - bins[:, None]) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return (triangles * (2.0 / (upper - lower))).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _hann(n: int) -> np.ndarray:
    """The periodic Hann window (an n + 1 point symmetric one without its last point), as
    torch.hann_window and transformers' window_function use for the STFT."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


# --- checks --------------------------------------------------------------------------------

def _sizes(cfg: Any, n_mels: int | None, frames: int | None) -> tuple[int, int]:
    """(n_mels, frames): the keywords, else the config's num_mel_bins and twice its encoder's
    positions, encoder_max_len (else max_len): the stride-2 stem halves the frames into them."""
    if cfg is None and (n_mels is None or frames is None):
        raise ValueError("log_mel: pass cfg (a config with num_mel_bins: Whisper) or both n_mels= and frames=")
    if n_mels is None:
        if cfg.num_mel_bins is None:
            raise ValueError("log_mel: cfg.num_mel_bins is None (the model reads token ids, not features); "
                             "pass n_mels= to compute features anyway")
        n_mels = cfg.num_mel_bins
    if frames is None:
        frames = 2 * (cfg.encoder_max_len or cfg.max_len)
    if not (isinstance(n_mels, int) and n_mels > 0 and isinstance(frames, int) and frames > 0):
        raise ValueError(f"log_mel: expected positive integers n_mels and frames, got {n_mels!r} and {frames!r}")
    return n_mels, frames


def _checked(waveform: Any, sample_rate: int) -> jax.Array:
    """The waveform as float32 [B, samples]; ValueError for a rate other than 16 kHz, several
    channels or integer samples (none of which a spectrogram can be right for)."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"log_mel: expected audio at {SAMPLE_RATE} Hz, got sample_rate={sample_rate}; "
                         f"resample it first: zoo.audio.resample(waveform, {sample_rate}, {SAMPLE_RATE})")
    dtype = np.dtype(waveform.dtype if hasattr(waveform, "dtype") else np.asarray(waveform).dtype)
    if not jnp.issubdtype(dtype, jnp.floating):  # jnp's: bfloat16 counts as a float
        raise ValueError(f"log_mel: expected float samples in [-1, 1], got dtype {dtype}; convert integer PCM "
                         f"first (int16: waveform / 32768.0, or soundfile.read(path, dtype='float32'))")
    shape = tuple(np.shape(waveform))
    if len(shape) not in (1, 2):
        raise ValueError(f"log_mel: expected mono audio [samples] or [B, samples], got shape {shape}; "
                         f"mix channels down first (e.g. waveform.mean(axis=channel_axis))")
    if len(shape) == 2 and shape[1] <= MAX_CHANNELS < shape[0]:
        raise ValueError(f"log_mel: got shape {shape}, which looks like [samples, channels] (stereo or "
                         f"multi-channel); expected mono [B, samples]: mix down with waveform.mean(axis=1)")
    x = jnp.asarray(waveform, jnp.float32)
    return x[None] if x.ndim == 1 else x


def _fit(x: jax.Array, samples: int, trim: bool) -> jax.Array:
    """[B, S] -> [B, samples]: zero-padded on the right, or cut when trim (else an error)."""
    have = x.shape[1]
    if have > samples:
        if not trim:
            raise ValueError(f"log_mel: the audio has {have} samples ({have / SAMPLE_RATE:.2f} s), longer than the "
                             f"model's window of {samples} ({samples / SAMPLE_RATE:.2f} s); split it with "
                             f"zoo.audio.windows(waveform, ...) or pass trim=True to keep the first window")
        return x[:, :samples]
    return jnp.pad(x, ((0, 0), (0, samples - have)))


# --- features ------------------------------------------------------------------------------

def log_mel(waveform: Any, cfg: Any = None, *, n_mels: int | None = None, frames: int | None = None,
            sample_rate: int = SAMPLE_RATE, trim: bool = False) -> jax.Array:
    """Whisper's log-mel features of 16 kHz mono audio (see the module docstring).

    waveform: float [samples] or [B, samples] in [-1, 1]; cfg: a Whisper-shaped config
    (num_mel_bins, encoder_max_len), or n_mels= and frames= directly (they override cfg).
    Audio shorter than frames * 160 samples is zero-padded; longer is an error unless trim.
    Returns float32 [B, n_mels, frames] (B = 1 for a 1-D waveform). Each example is scaled by
    its own maximum, so a batch equals its rows one at a time. Jittable (cfg and the keywords
    static): the checks read only shapes and dtypes.
    """
    n_mels, frames = _sizes(cfg, n_mels, frames)
    x_BS = _fit(_checked(waveform, sample_rate), frames * HOP, trim)
    x_BS = jnp.pad(x_BS, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")  # centred frames
    # STFT frames 0 .. frames - 1 (Whisper drops the last of frames + 1)
    starts = np.arange(frames)[:, None] * HOP + np.arange(N_FFT)[None, :]
    windowed_BFN = x_BS[:, starts] * _hann(N_FFT)
    spectrum_BFK = jnp.fft.rfft(windowed_BFN, axis=-1)
    power_BFK = jnp.real(spectrum_BFK) ** 2 + jnp.imag(spectrum_BFK) ** 2
    # HIGHEST: the filterbank sum must not drop to bf16/TF32 passes on accelerators
    mel_BMF = jnp.einsum("bfk,km->bmf", power_BFK, mel_filters(n_mels), precision=jax.lax.Precision.HIGHEST)
    log_BMF = jnp.log10(jnp.maximum(mel_BMF, 1e-10))
    floor_B11 = jnp.max(log_BMF, axis=(1, 2), keepdims=True) - 8.0  # 80 dB below each example's peak
    return ((jnp.maximum(log_BMF, floor_B11) + 4.0) / 4.0).astype(jnp.float32)


def windows(waveform: Any, cfg: Any = None, *, frames: int | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Long mono audio [samples] -> float32 [N, frames * 160]: consecutive, non-overlapping
    model windows (30 s for Whisper), the last zero-padded; N = ceil(samples / window), at
    least 1. Each row is one `log_mel` input; a transcript of the whole is the windows'
    transcripts joined in order (a word cut at a boundary may be split or lost: overlap and
    timestamp-based joining, as Whisper's long-form decoding does, are not done here)."""
    _, frames = _sizes(cfg, 1, frames)
    x = np.asarray(_checked(waveform, sample_rate))
    if x.shape[0] != 1:
        raise ValueError(f"windows: expected one mono waveform [samples], got shape {np.shape(waveform)}")
    size = frames * HOP
    n = max(1, math.ceil(x.shape[1] / size))
    out = np.zeros((n, size), np.float32)
    out.reshape(-1)[: x.shape[1]] = x[0]
    return out


def resample(waveform: Any, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 audio at to_rate from audio at from_rate, along the last axis, on the host:
    scipy.signal.resample_poly (a polyphase FIR filter with a Kaiser window: the
    anti-aliasing low-pass is part of it) with up/down reduced by their gcd."""
    from scipy.signal import resample_poly

    if not (isinstance(from_rate, int) and isinstance(to_rate, int) and from_rate > 0 and to_rate > 0):
        raise ValueError(f"resample: expected positive integer rates in Hz, got {from_rate!r} and {to_rate!r}")
    x = np.asarray(waveform)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"resample: expected float samples in [-1, 1], got dtype {x.dtype}; convert integer "
                         f"PCM first (int16: waveform / 32768.0)")
    x = x.astype(np.float32)  # also what scipy needs of a bfloat16 input
    if from_rate == to_rate:
        return x
    g = math.gcd(from_rate, to_rate)
    return resample_poly(x, to_rate // g, from_rate // g, axis=-1).astype(np.float32)


# --- SpecAugment ---------------------------------------------------------------------------

def _bands(key: jax.Array, batch: int, count: int, width: int, size: int) -> jax.Array:
    """bool [B, size]: the union of `count` bands per example, each of a width drawn from
    0..width (capped at size) and a start drawn so the band fits."""
    width = min(width, size)
    k_width, k_start = jax.random.split(key)
    w_BC = jax.random.randint(k_width, (batch, count), 0, width + 1)
    start_BC = (jax.random.uniform(k_start, (batch, count)) * (size - w_BC + 1)).astype(jnp.int32)
    pos = jnp.arange(size)
    inside = (pos >= start_BC[..., None]) & (pos < (start_BC + w_BC)[..., None])  # [B, count, size]
    return jnp.any(inside, axis=1) if count else jnp.zeros((batch, size), bool)


def spec_augment_mask(key: jax.Array, shape: tuple[int, int, int], *, freq_masks: int, freq_width: int,
                      time_masks: int, time_width: int) -> jax.Array:
    """bool [B, n_mels, frames]: True where SpecAugment masks (whole mel rows and whole frame
    columns), drawn independently per example."""
    b, n_mels, frames = shape
    for name, value in (("freq_masks", freq_masks), ("freq_width", freq_width), ("time_masks", time_masks),
                        ("time_width", time_width)):
        if not (isinstance(value, int) and value >= 0):
            raise ValueError(f"spec_augment: expected a non-negative integer {name}, got {value!r}")
    k_freq, k_time = jax.random.split(key)
    rows_BM = _bands(k_freq, b, freq_masks, freq_width, n_mels)
    cols_BF = _bands(k_time, b, time_masks, time_width, frames)
    return rows_BM[:, :, None] | cols_BF[:, None, :]


def spec_augment(key: jax.Array, feats: jax.Array, *, freq_masks: int, freq_width: int, time_masks: int,
                 time_width: int) -> jax.Array:
    """SpecAugment (Park et al. 2019) without time warping: per example, `freq_masks` bands of
    0..freq_width mel bins and `time_masks` bands of 0..time_width frames set to that
    example's mean feature. The paper masks to zero features that were normalised to mean
    zero, so the mean is its "no information" value; Whisper's features are not mean-zero (0
    is log10 power -4, a loud band), so zero would insert a signal. feats: [B, n_mels,
    frames] -> same shape and dtype. Jittable (the counts and widths static)."""
    if feats.ndim != 3:
        raise ValueError(f"spec_augment: expected features [B, n_mels, frames], got shape {feats.shape}")
    mask = spec_augment_mask(key, feats.shape, freq_masks=freq_masks, freq_width=freq_width,
                             time_masks=time_masks, time_width=time_width)
    mean_B11 = jnp.mean(feats, axis=(1, 2), keepdims=True)
    return jnp.where(mask, mean_B11, feats).astype(feats.dtype)
