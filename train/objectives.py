"""Pretraining objectives: pure functions from (key, token rows) to a batch dict.

Every objective returns fixed shapes and runs under `jax.jit` (it is jitted next to the step
in the training loop):

    inputs [B, T] int32, targets [B, T'] int32, weights [B, T'] float32 (0: no loss),
    decoder_inputs [B, T'] (encdec), segment_ids / positions [B, T] (packed rows),
    prefix_mask [B, T] bool (prefix LM).

| objective         | family  | rows it reads                               |
|-------------------|---------|---------------------------------------------|
| `clm`             | decoder | packed rows (segment ids, positions)        |
| `prefix_lm`       | decoder | packed rows                                 |
| `mlm`             | encoder | packed rows                                 |
| `span_corruption` | encdec  | raw token stream chunks (`train.noising`)   |
| `denoise`         | encdec  | raw token stream chunks (`train.noising`)   |

Fine-tuning tasks (`python -m train finetune`, train/finetune.py) are objectives too:
`classify` makes one target per row (or per token), which the step scores with the state's
task head; `sft` is next-token prediction weighted by the rows' loss mask, `seq2seq` teacher-forced
source -> target for encoder-decoders, `asr` the same from log-mel features (Whisper).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

import zoo
from train import noising
from train.noising import denoise, span_corruption, t5_lengths, t5_raw_length
from train.tokens import Vocab

Batch = dict[str, jax.Array]

FAMILY_OF = {"clm": "decoder", "prefix_lm": "decoder", "mlm": "encoder",
             "span_corruption": "encdec", "denoise": "encdec"}
DEFAULT_OBJECTIVE = {"decoder": "clm", "encoder": "mlm", "encdec": "span_corruption"}

__all__ = ["FAMILY_OF", "Objective", "asr", "check_objective", "classify", "clm", "denoise", "make_objective", "mlm",
           "prefix_lm", "segment_positions", "seq2seq", "sft", "span_corruption", "t5_lengths", "t5_raw_length"]


def check_objective(name: str, family: str) -> None:
    """Raises ValueError unless objective `name` trains models of `family`."""
    if name not in FAMILY_OF:
        raise ValueError(f"objective: unknown name {name!r}; expected one of {sorted(FAMILY_OF)}")
    if FAMILY_OF[name] != family:
        fits = sorted(k for k, v in FAMILY_OF.items() if v == family)
        raise ValueError(f"objective: {name!r} trains {FAMILY_OF[name]} models, but the model's "
                         f"family is {family!r}; use one of {fits}")


def classify(key: jax.Array | None, rows: dict[str, jax.Array], *, token_types: bool = True,
             spans: bool = False) -> Batch:
    """Sequence or token classification, or answer spans. rows: tokens [B, T], mask bool
    [B, T], labels int [B] (a label per row), [B, T] (a tag per token, -1 where none is
    scored) or, with spans=True, [B, 2] (the answer's start and end token), weights [B] (0: a
    padding row of the last eval batch), token_types [B, T] (encoders: BERT's segments of a
    text pair; token_types=False drops them, for models without), teacher_logits (passed
    on) -> inputs, segment_ids (1 on real tokens: the mask), targets and weights shaped as
    labels. No RNG."""
    del key
    labels, weights = rows["labels"].astype(jnp.int32), rows["weights"].astype(jnp.float32)
    if spans:
        weights = jnp.broadcast_to(weights[:, None], labels.shape)
    elif labels.ndim == 2:
        weights = weights[:, None] * (labels >= 0)
        labels = jnp.maximum(labels, 0)
    batch = {"inputs": rows["tokens"], "segment_ids": rows["mask"].astype(jnp.int32),
             "targets": labels, "weights": weights}
    if token_types:
        batch["token_types"] = rows["token_types"]
    if "teacher_logits" in rows:  # distillation's targets (train/finetune.py --teacher)
        batch["teacher_logits"] = rows["teacher_logits"].astype(jnp.float32)
    return batch


def sft(key: jax.Array | None, rows: dict[str, jax.Array]) -> Batch:
    """Supervised fine-tuning of a decoder: next-token prediction weighted by the loss mask.
    rows: tokens [B, T], mask bool [B, T], loss_mask bool [B, T] (the tokens to learn to
    write), weights [B] (0: a padding row) -> inputs, segment_ids (the mask), targets [B, T]
    (the next token) and weights [B, T] (1 where the next token is one to learn). No RNG."""
    del key
    tokens = rows["tokens"].astype(jnp.int32)
    shift = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
    weights = shift(rows["loss_mask"] & rows["mask"]).astype(jnp.float32) * rows["weights"][:, None]
    return {"inputs": tokens, "segment_ids": rows["mask"].astype(jnp.int32), "targets": shift(tokens),
            "weights": weights}


def seq2seq(key: jax.Array | None, rows: dict[str, jax.Array], *, start_id: int) -> Batch:
    """Source -> target for encoder-decoders (teacher forcing). rows: tokens [B, S] (the
    source, padded with pad_id), target [B, T], target_mask bool [B, T], weights [B] ->
    inputs, decoder_inputs (the target shifted right after start_id), targets [B, T] and
    weights [B, T] (the real target tokens of real rows). No RNG."""
    del key
    return {"inputs": rows["tokens"].astype(jnp.int32), **_teacher_forced(rows, start_id)}


def asr(key: jax.Array | None, rows: dict[str, jax.Array], *, start_id: int,
        spec_augment: tuple[int, ...] = ()) -> Batch:
    """Speech -> transcript for a feature encoder-decoder (Whisper): `seq2seq` with rows
    features float [B, M, F] (`zoo.audio.log_mel`) as the inputs in place of source tokens.
    spec_augment (freq_masks, freq_width, time_masks, time_width) masks the features with
    `zoo.audio.spec_augment` when a key is given (training); key None: unmasked."""
    feats = rows["features"].astype(jnp.float32)
    if key is not None and spec_augment:
        fm, fw, tm, tw = spec_augment
        feats = zoo.audio.spec_augment(key, feats, freq_masks=fm, freq_width=fw, time_masks=tm, time_width=tw)
    return {"inputs": feats, **_teacher_forced(rows, start_id)}


def _teacher_forced(rows: dict[str, jax.Array], start_id: int) -> Batch:
    """decoder_inputs (target [B, T] shifted right after start_id), targets, and weights
    [B, T]: the real target tokens (target_mask) of real rows (weights [B])."""
    target = rows["target"].astype(jnp.int32)
    start = jnp.full_like(target[:, :1], start_id)
    return {"decoder_inputs": jnp.concatenate([start, target[:, :-1]], 1), "targets": target,
            "weights": rows["target_mask"].astype(jnp.float32) * rows["weights"][:, None]}


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] position of each token inside its segment (0 at every segment start)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], segment_ids.shape)
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    start = jax.lax.cummax(jnp.where(segment_ids != prev, idx, 0), axis=1)
    return idx - start


def _packed(tokens: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None,
            vocab: Vocab) -> tuple[jax.Array, jax.Array]:
    """Segment ids (0 = padding) and positions; an unpacked row is one segment."""
    noising.check_rows("tokens", tokens)
    if segment_ids is None:
        segment_ids = (tokens != vocab.pad_id).astype(jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    return segment_ids, positions.astype(jnp.int32)


def _next_token(tokens: jax.Array, segment_ids: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Targets = the next token of the same segment; weights 0 at segment ends and padding."""
    nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)), constant_values=pad_id)
    nxt_seg = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
    valid = (segment_ids == nxt_seg) & (segment_ids > 0)
    return jnp.where(valid, nxt, pad_id), valid


def clm(key: jax.Array | None, tokens: jax.Array, segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None, *, vocab: Vocab) -> Batch:
    """Next-token prediction. tokens [B, T] -> inputs = tokens, targets = tokens shifted left
    within each segment (packed documents never predict across their boundary). No RNG."""
    del key
    seg, pos = _packed(tokens, segment_ids, positions, vocab)
    targets, valid = _next_token(tokens, seg, vocab.pad_id)
    return {"inputs": tokens, "targets": targets, "weights": valid.astype(jnp.float32),
            "segment_ids": seg, "positions": pos}


def _row_prefix(key: jax.Array, seg: jax.Array, pos: jax.Array) -> jax.Array:
    """One row [T]: a random prefix of 1..len-1 tokens in every segment."""
    t = seg.shape[0]
    length = jnp.zeros(t + 1, jnp.int32).at[seg].add(1, mode="drop")
    u = jax.random.uniform(key, (t + 1,))
    split = 1 + jnp.floor(u * jnp.maximum(length - 1, 0)).astype(jnp.int32)
    return (pos < split[jnp.clip(seg, 0, t)]) & (seg > 0)


def prefix_lm(key: jax.Array, tokens: jax.Array, segment_ids: jax.Array | None = None,
              positions: jax.Array | None = None, *, vocab: Vocab) -> Batch:
    """Prefix LM: each segment is split at a uniform random point; the prefix attends
    bidirectionally (`prefix_mask`, read by the decoder) and only the rest is predicted."""
    seg, pos = _packed(tokens, segment_ids, positions, vocab)
    prefix = jax.vmap(_row_prefix)(jax.random.split(key, tokens.shape[0]), seg, pos)
    targets, valid = _next_token(tokens, seg, vocab.pad_id)
    next_in_prefix = jnp.pad(prefix[:, 1:], ((0, 0), (0, 1)))
    weights = (valid & ~next_in_prefix).astype(jnp.float32)
    return {"inputs": tokens, "targets": targets, "weights": weights, "segment_ids": seg,
            "positions": pos, "prefix_mask": prefix}


def _random_normal_ids(key: jax.Array, shape: tuple[int, ...], vocab: Vocab) -> jax.Array:
    """Uniform ids over the vocabulary minus its special ids: draw r in [0, V - S) and step
    over the specials below it (sorted specials s_j: id = r + #{j: s_j - j <= r})."""
    specials = jnp.asarray(vocab.special_ids, jnp.int32)
    shifted = specials - jnp.arange(specials.shape[0], dtype=jnp.int32)
    r = jax.random.randint(key, shape, 0, vocab.size - specials.shape[0], dtype=jnp.int32)
    return r + jnp.searchsorted(shifted, r, side="right").astype(jnp.int32)


def mlm(key: jax.Array, tokens: jax.Array, segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None, *, vocab: Vocab, rate: float = 0.15,
        mask_rate: float = 0.8, random_rate: float = 0.1) -> Batch:
    """BERT masked LM: each non-special token is chosen with probability `rate`; a chosen
    token becomes `<mask>` (80%), a random non-special token (10%) or stays (10%). Loss only
    on chosen tokens; special tokens and padding are never chosen."""
    if vocab.mask_id is None:
        raise ValueError("mlm: the tokenizer has no mask token (Vocab.mask_id is None)")
    if not (0.0 < rate < 1.0 and mask_rate >= 0 and random_rate >= 0 and mask_rate + random_rate <= 1):
        raise ValueError(f"mlm: expected 0 < rate < 1 and mask_rate + random_rate <= 1, got "
                         f"rate={rate}, mask_rate={mask_rate}, random_rate={random_rate}")
    seg, pos = _packed(tokens, segment_ids, positions, vocab)
    k_choose, k_action, k_random = jax.random.split(key, 3)
    special = jnp.isin(tokens, jnp.asarray(vocab.special_ids, jnp.int32)) | (seg == 0)
    chosen = jax.random.bernoulli(k_choose, rate, tokens.shape) & ~special
    action = jax.random.uniform(k_action, tokens.shape)
    to_mask = chosen & (action < mask_rate)
    to_random = chosen & (action >= mask_rate) & (action < mask_rate + random_rate)
    inputs = jnp.where(to_mask, vocab.mask_id, tokens)
    inputs = jnp.where(to_random, _random_normal_ids(k_random, tokens.shape, vocab), inputs)
    return {"inputs": inputs.astype(jnp.int32), "targets": tokens,
            "weights": chosen.astype(jnp.float32), "segment_ids": seg, "positions": pos}


@dataclasses.dataclass(frozen=True)
class Objective:
    """An objective bound to a tokenizer and lengths: `obj(key, rows) -> batch`.

    row_len: tokens per row the data pipeline must supply (for span corruption, the raw
    length T5 computes so corrupted inputs are exactly `seq_len` long); packed: whether rows
    carry segment ids (documents packed with boundaries) or are raw chunks of the stream."""

    name: str
    vocab: Vocab
    seq_len: int
    row_len: int
    packed: bool
    decoder_start_id: int = 0

    def __call__(self, key: jax.Array, rows: dict[str, jax.Array]) -> Batch:
        tokens = rows["tokens"]
        if self.packed:
            fn: Callable = {"clm": clm, "prefix_lm": prefix_lm, "mlm": mlm}[self.name]
            return fn(key, tokens, rows.get("segment_ids"), rows.get("positions"), vocab=self.vocab)
        if self.name == "span_corruption":
            return span_corruption(key, tokens, vocab=self.vocab, inputs_length=self.seq_len,
                                   decoder_start_id=self.decoder_start_id)
        return denoise(key, tokens, vocab=self.vocab, decoder_start_id=self.decoder_start_id)

    @property
    def target_len(self) -> int:
        if self.name == "span_corruption":
            return t5_lengths(self.row_len)[1]
        return self.seq_len


def make_objective(name: str, cfg: zoo.Config, vocab: Vocab, seq_len: int) -> Objective:
    """Checks that `name` fits `cfg.family` and the tokenizer, and binds the lengths.
    Raises ValueError before anything is traced or compiled."""
    check_objective(name, cfg.family)
    if not isinstance(seq_len, int) or seq_len < 4:
        raise ValueError(f"objective: seq_len must be an int >= 4, got {seq_len!r}")
    if vocab.size > cfg.vocab_size:
        raise ValueError(f"objective: the tokenizer has {vocab.size} ids but the model only "
                         f"{cfg.vocab_size} (set vocab_size from the tokenizer)")
    if name in ("mlm", "denoise") and vocab.mask_id is None:
        raise ValueError(f"objective {name!r}: the tokenizer has no mask token")
    start = cfg.decoder_start_id if cfg.decoder_start_id is not None else vocab.pad_id
    if name == "span_corruption":
        raw = t5_raw_length(seq_len)
        noising.check_sentinels(vocab, raw)
        return Objective(name, vocab, seq_len, raw, packed=False, decoder_start_id=start)
    if name == "denoise":
        return Objective(name, vocab, seq_len, seq_len, packed=False, decoder_start_id=start)
    return Objective(name, vocab, seq_len, seq_len, packed=True)
