"""Encoder-decoder noising objectives with fixed shapes: T5 span corruption and BART
denoising. Both are written per row and vmapped; every length is a static Python int, so
they run under jit with no host round trip.

Removing tokens with fixed shapes: a row keeps a boolean `emit` per position; the output
index of an emitted token is the count of emitted tokens before it, and a scatter into a
padded buffer builds the shorter sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from train.tokens import Vocab

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0


def check_rows(name: str, tokens: jax.Array) -> None:
    """tokens: int [B, T] with T >= 2."""
    shape = getattr(tokens, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{name}: expected int tokens [batch, length], got shape {shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {tokens.dtype}")
    if shape[1] < 2:
        raise ValueError(f"{name}: expected rows of at least 2 tokens, got length {shape[1]}")


# --- T5 span corruption ------------------------------------------------------------------

def t5_counts(raw_len: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of raw_len tokens, rounded as T5 rounds them."""
    noise = min(max(int(round(raw_len * density)), 1), raw_len - 1)
    spans = max(int(round(noise / mean_span)), 1)
    return noise, spans


def t5_lengths(raw_len: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> tuple[int, int]:
    """(inputs length, targets length) after corrupting raw_len tokens, eos included:
    every noise span becomes one sentinel in the inputs; every kept span one in the targets."""
    noise, spans = t5_counts(raw_len, density, mean_span)
    return raw_len - noise + spans + 1, noise + spans + 1


def t5_raw_length(inputs_length: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> int:
    """The largest raw length whose corrupted inputs fit in `inputs_length` (T5's
    `random_spans_helper`): packed chunks of this length fill the encoder exactly, or leave
    at most one padding position where rounding makes an exact fit impossible."""
    if inputs_length < 4:
        raise ValueError(f"span_corruption: inputs_length must be >= 4, got {inputs_length}")
    raw = 2
    while t5_lengths(raw + 1, density, mean_span)[0] <= inputs_length:
        raw += 1
    return raw


def check_sentinels(vocab: Vocab, raw_len: int, density: float = NOISE_DENSITY,
                    mean_span: float = MEAN_SPAN) -> None:
    spans = t5_counts(raw_len, density, mean_span)[1]
    if len(vocab.sentinel_ids) < spans:
        raise ValueError(f"span_corruption: rows of {raw_len} tokens need {spans} sentinels, but "
                         f"the tokenizer has {len(vocab.sentinel_ids)} (<extra_id_*> tokens)")


def _random_partition(key: jax.Array, n_items: int, n_parts: int) -> jax.Array:
    """Lengths [n_parts] of a uniformly random split of n_items into non-empty parts."""
    if n_parts == n_items:
        return jnp.ones(n_parts, jnp.int32)
    cut = jax.random.permutation(key, jnp.arange(n_items - 1) < n_parts - 1)
    part = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(cut.astype(jnp.int32))])
    return jnp.zeros(n_parts, jnp.int32).at[part].add(1)


def t5_span_numbers(key: jax.Array, length: int, noise: int, spans: int) -> jax.Array:
    """[length] index of the span each position lies in: kept spans are even (0, 2, ...),
    noise spans odd; the row starts with a kept span and ends with a noise span."""
    k_noise, k_keep = jax.random.split(key)
    noise_len = _random_partition(k_noise, noise, spans)
    keep_len = _random_partition(k_keep, length - noise, spans)
    starts = jnp.cumsum(jnp.stack([keep_len, noise_len], axis=1).reshape(-1))[:-1]
    return jnp.cumsum(jnp.zeros(length, jnp.int32).at[starts].add(1))


def _compact(values: jax.Array, emit: jax.Array, out_len: int, fill: int) -> jax.Array:
    """values[emit] in order, padded with `fill` to out_len (one row)."""
    idx = jnp.where(emit, jnp.cumsum(emit) - 1, out_len)
    return jnp.full(out_len, fill, values.dtype).at[idx].set(values, mode="drop")


def _with_eos(row: jax.Array, n: int, eos: int) -> jax.Array:
    return row.at[n].set(eos)


def span_corruption(key: jax.Array, tokens: jax.Array, *, vocab: Vocab,
                    noise_density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN,
                    inputs_length: int | None = None, decoder_start_id: int | None = None) -> dict:
    """T5 span corruption of raw rows [B, R].

    round(R * density) tokens in round(noise / mean_span) spans (random lengths >= 1) are
    noise. inputs = kept text with each noise span replaced by a sentinel, then eos;
    targets = each noise span after its sentinel, then eos. Sentinels run <extra_id_0>,
    <extra_id_1>, ... (descending ids). Shapes: inputs [B, inputs_length] (default: exact),
    targets/decoder_inputs/weights [B, noise + spans + 1]."""
    check_rows("span_corruption", tokens)
    raw = tokens.shape[1]
    noise, spans = t5_counts(raw, noise_density, mean_span)
    in_len, tgt_len = t5_lengths(raw, noise_density, mean_span)
    check_sentinels(vocab, raw, noise_density, mean_span)
    width = in_len if inputs_length is None else inputs_length
    if width < in_len:
        raise ValueError(f"span_corruption: rows of {raw} tokens corrupt to {in_len} inputs, more "
                         f"than inputs_length={inputs_length}; use t5_raw_length(inputs_length)")
    sentinels = jnp.asarray(vocab.sentinel_ids[:spans], jnp.int32)
    pad, eos = vocab.pad_id, vocab.eos_id

    def row(k: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        span = t5_span_numbers(k, raw, noise, spans)
        is_noise = span % 2 == 1
        first = span != jnp.pad(span[:-1], (1, 0), constant_values=-1)
        sentinel = sentinels[span // 2]
        inputs = _compact(jnp.where(is_noise, sentinel, x), ~is_noise | first, width, pad)
        targets = _compact(jnp.where(is_noise, x, sentinel), is_noise | first, tgt_len, pad)
        return _with_eos(inputs, in_len - 1, eos), _with_eos(targets, tgt_len - 1, eos)

    inputs, targets = jax.vmap(row)(jax.random.split(key, tokens.shape[0]), tokens)
    return _seq2seq(inputs, targets, jnp.ones(targets.shape, jnp.float32),
                    pad if decoder_start_id is None else decoder_start_id)


def _seq2seq(inputs: jax.Array, targets: jax.Array, weights: jax.Array, start: int) -> dict:
    decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=start)
    return {"inputs": inputs.astype(jnp.int32), "targets": targets.astype(jnp.int32),
            "decoder_inputs": decoder_inputs.astype(jnp.int32), "weights": weights}


# --- BART denoising --------------------------------------------------------------------

def permute_sentences(key: jax.Array, x: jax.Array, is_end: jax.Array) -> jax.Array:
    """One row [T]: sentences (runs closed by an `is_end` token) in random order."""
    t = x.shape[0]
    ends = is_end[x].astype(jnp.int32)
    sentence = jnp.cumsum(ends) - ends
    rank = jax.random.uniform(key, (t + 1,))[sentence]
    return x[jnp.lexsort((jnp.arange(t), rank))]


def _infill_spans(key: jax.Array, length: int, n_mask: int, lam: float) -> tuple[jax.Array, ...]:
    """Poisson(lam) span lengths covering n_mask of `length` positions, placed at random
    without overlap. Returns (starts [M], lengths [M], valid [M]) with M = n_mask;
    zero-length spans are insertions."""
    m = max(n_mask, 1)
    k_len, k_cut = jax.random.split(key)
    lengths = jax.random.poisson(k_len, lam, (m,)).astype(jnp.int32)
    before = jnp.cumsum(lengths) - lengths
    valid = before < n_mask
    lengths = jnp.where(valid, jnp.minimum(lengths, n_mask - before), 0)
    kept = length - jnp.sum(lengths)
    # Span j starts after cut_j kept tokens and every earlier span: spans never overlap.
    cuts = jax.random.randint(k_cut, (m,), 0, kept + 1)
    cuts = jnp.sort(jnp.where(valid, cuts, length + 1))
    starts = cuts + jnp.cumsum(lengths) - lengths
    return starts, lengths, valid


def text_infilling(key: jax.Array, x: jax.Array, n_mask: int, lam: float, mask_id: int,
                   pad: int, deletion: float = 0.0) -> jax.Array:
    """One row [T]: spans covering n_mask tokens each become one mask token (zero-length
    spans insert one); with `deletion` > 0 other tokens are also dropped. Padded to T."""
    t = x.shape[0]
    k_span, k_del = jax.random.split(key)
    starts, lengths, valid = _infill_spans(k_span, t, n_mask, lam)
    at = jnp.where(valid, starts, t)
    diff = jnp.zeros(t + 1, jnp.int32).at[at].add(valid.astype(jnp.int32))
    diff = diff.at[jnp.where(valid, starts + lengths, t)].add(-valid.astype(jnp.int32))
    keep = jnp.cumsum(diff)[:t] <= 0
    if deletion > 0:
        keep = keep & ~jax.random.bernoulli(k_del, deletion, (t,))
    keep_i = keep.astype(jnp.int32)
    before = jnp.concatenate([jnp.cumsum(keep_i) - keep_i, jnp.sum(keep_i)[None]])  # [T+1]
    spans_upto = jnp.cumsum(jnp.zeros(t + 1, jnp.int32).at[at].add(valid.astype(jnp.int32)))
    token_pos = jnp.where(keep, before[:t] + spans_upto[:t], t)
    mask_pos = jnp.where(valid, before[jnp.minimum(starts, t)] + jnp.arange(starts.shape[0]), t)
    out = jnp.full(t, pad, x.dtype).at[token_pos].set(x, mode="drop")
    return out.at[mask_pos].set(mask_id, mode="drop")


def denoise(key: jax.Array, tokens: jax.Array, *, vocab: Vocab, mask_ratio: float = 0.3,
            poisson_lambda: float = 3.0, sentence_permutation: bool = True, deletion: float = 0.0,
            decoder_start_id: int | None = None) -> dict:
    """BART denoising of raw rows [B, T]: sentence permutation, then text infilling of
    round(T * mask_ratio) tokens in Poisson(lambda) spans, one mask token per span (and
    optional token deletion). targets = the original rows; all outputs [B, T]."""
    check_rows("denoise", tokens)
    if vocab.mask_id is None:
        raise ValueError("denoise: the tokenizer has no mask token (Vocab.mask_id is None)")
    if not 0.0 < mask_ratio < 1.0 or not 0.0 <= deletion < 1.0 or poisson_lambda <= 0:
        raise ValueError(f"denoise: expected 0 < mask_ratio < 1, 0 <= deletion < 1 and lambda > 0, "
                         f"got {mask_ratio}, {deletion}, {poisson_lambda}")
    t = tokens.shape[1]
    n_mask = int(round(t * mask_ratio))
    is_end = jnp.zeros(vocab.size, bool).at[jnp.asarray(vocab.sentence_end_ids, jnp.int32)].set(True)

    def row(k: jax.Array, x: jax.Array) -> jax.Array:
        k_perm, k_fill = jax.random.split(k)
        if sentence_permutation and vocab.sentence_end_ids:
            x = permute_sentences(k_perm, x, is_end)
        return text_infilling(k_fill, x, n_mask, poisson_lambda, vocab.mask_id, vocab.pad_id, deletion)

    inputs = jax.vmap(row)(jax.random.split(key, tokens.shape[0]), tokens)
    weights = (tokens != vocab.pad_id).astype(jnp.float32)
    start = vocab.eos_id if decoder_start_id is None else decoder_start_id
    return _seq2seq(inputs, tokens, weights, start)
