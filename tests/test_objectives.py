"""Invariants of the pretraining objectives (train/objectives.py, train/noising.py)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from conftest import tiny
from train import objectives as O
from train_util import ordinary, vocab

V = vocab(200, sentinels=40)


def _until_eos(row):
    row = [int(t) for t in row]
    return row[: row.index(V.eos_id)]


def _rebuild(inputs, targets):
    """(original text, sentinels of the inputs, sentinels of the targets) from T5 inputs and
    targets: each sentinel in the inputs is replaced by what follows it in the targets."""
    sent = set(V.sentinel_ids)
    spans, cur = {}, None
    for t in _until_eos(targets):
        if t in sent:
            cur = spans[t] = []
        else:
            cur.append(t)
    inputs = _until_eos(inputs)
    out = [x for t in inputs for x in (spans[t] if t in sent else [t])]
    return out, [t for t in inputs if t in sent], [t for t in _until_eos(targets) if t in sent]


@pytest.mark.parametrize("raw", [30, 70, 114, 568])
def test_span_corruption_rebuilds_the_original(raw):
    rows = ordinary(np.random.default_rng(raw), (6, raw), V)
    batch = jax.jit(lambda k, t: O.span_corruption(k, t, vocab=V))(jax.random.key(raw), rows)
    noise, spans = train.noising.t5_counts(raw)
    in_len, tgt_len = O.t5_lengths(raw)
    assert batch["inputs"].shape == (6, in_len) and batch["targets"].shape == (6, tgt_len)
    for i in range(6):
        rebuilt, in_sent, tgt_sent = _rebuild(np.asarray(batch["inputs"][i]), np.asarray(batch["targets"][i]))
        assert rebuilt == rows[i].tolist()
        # Sentinels <extra_id_0>, <extra_id_1>, ...: descending ids, the same order on both sides.
        assert in_sent == tgt_sent == list(V.sentinel_ids[:spans])
        assert sum(1 for t in batch["targets"][i] if int(t) not in V.sentinel_ids) - 1 == noise
    np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])
    assert np.all(np.asarray(batch["decoder_inputs"][:, 0]) == V.pad_id)


def test_span_corruption_noise_fraction_and_span_length():
    raw = 1000
    rows = ordinary(np.random.default_rng(0), (4, raw), V)
    big = vocab(400, sentinels=120)
    batch = jax.jit(lambda k, t: O.span_corruption(k, t, vocab=big))(jax.random.key(0), rows)
    n_noise = np.asarray(batch["targets"] < big.size - 120).sum(1) - 1  # minus eos
    assert np.allclose(n_noise / raw, 0.15, atol=0.005)
    spans = np.isin(np.asarray(batch["inputs"]), big.sentinel_ids).sum(1)
    assert np.allclose(n_noise / spans, 3.0, atol=0.1)


def test_t5_lengths_fill_the_encoder_exactly():
    for inputs_length in (64, 128, 512, 568):
        raw = O.t5_raw_length(inputs_length)
        assert O.t5_lengths(raw)[0] <= inputs_length < O.t5_lengths(raw + 1)[0]
    # T5's published pair: 512 inputs come from 568 raw tokens with 114 targets.
    assert O.t5_raw_length(512) == 568 and O.t5_lengths(568) == (512, 114)


def test_span_corruption_needs_enough_sentinels():
    with pytest.raises(ValueError, match="sentinels"):
        O.span_corruption(jax.random.key(0), np.ones((1, 200), np.int32) * 20, vocab=vocab(200, 3))


def test_mlm_rates_and_specials():
    rng = np.random.default_rng(1)
    rows = ordinary(rng, (64, 256), V)
    specials = rng.random(rows.shape) < 0.1
    rows = np.where(specials, rng.choice(V.special_ids, rows.shape), rows).astype(np.int32)
    seg = np.ones_like(rows)
    seg[:, -16:] = 0  # padding
    b = jax.jit(lambda k, t, s: O.mlm(k, t, s, vocab=V))(jax.random.key(1), rows, seg)
    chosen = np.asarray(b["weights"]) > 0
    eligible = ~np.isin(rows, V.special_ids) & (seg > 0)
    assert not np.any(chosen & ~eligible)  # specials and padding are never chosen
    np.testing.assert_array_equal(np.asarray(b["inputs"])[~chosen], rows[~chosen])
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01
    inputs = np.asarray(b["inputs"])[chosen]
    masked = inputs == V.mask_id
    kept = inputs == rows[chosen]
    replaced = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.03 and abs(replaced.mean() - 0.1) < 0.03
    assert not np.any(np.isin(inputs[replaced], V.special_ids))
    np.testing.assert_array_equal(b["targets"], rows)


def test_random_replacements_cover_exactly_the_ordinary_ids():
    v = vocab(40, sentinels=5)
    ids = np.asarray(O._random_normal_ids(jax.random.key(0), (20000,), v))
    assert set(ids.tolist()) == set(range(40)) - set(v.special_ids)


def _reference_infill_check(original, inputs, n_mask):
    """inputs = original with spans removed and one mask per span; the kept tokens appear
    in order and the masks stand where the spans were."""
    out = [t for t in inputs.tolist() if t != V.pad_id]
    kept = [t for t in out if t != V.mask_id]
    it = iter(original.tolist())
    assert all(any(t == o for o in it) for t in kept)  # a subsequence of the original
    assert len(original) - len(kept) == n_mask


def test_denoise_targets_are_the_original():
    rng = np.random.default_rng(2)
    rows = ordinary(rng, (8, 128), V)
    rows[:, ::9] = 10  # sentence ends
    b = jax.jit(lambda k, t: O.denoise(k, t, vocab=V))(jax.random.key(2), rows)
    np.testing.assert_array_equal(b["targets"], rows)
    assert b["inputs"].shape == rows.shape
    assert np.all(np.asarray(b["weights"]) == 1)
    np.testing.assert_array_equal(b["decoder_inputs"][:, 1:], rows[:, :-1])
    # Without permutation the infilling is checkable against the original order.
    b2 = jax.jit(lambda k, t: O.denoise(k, t, vocab=V, sentence_permutation=False))(jax.random.key(3), rows)
    for i in range(8):
        _reference_infill_check(rows[i], np.asarray(b2["inputs"][i]), round(128 * 0.3))
    masks = np.asarray(b2["inputs"] == V.mask_id).sum(1)
    assert 0.3 * 128 / 3 * 0.5 < masks.mean() < 0.3 * 128 / 3 * 1.5  # Poisson(3) spans


def test_sentence_permutation_keeps_sentences_whole():
    x = jnp.asarray([11, 12, 10, 13, 10, 14, 15, 16, 10, 17], jnp.int32)
    is_end = jnp.zeros(V.size, bool).at[10].set(True)
    sentences = [(11, 12, 10), (13, 10), (14, 15, 16, 10), (17,)]
    orders = {sum(p, ()) for p in itertools.permutations(sentences)}
    seen = set()
    for i in range(20):
        y = tuple(np.asarray(train.noising.permute_sentences(jax.random.key(i), x, is_end)).tolist())
        assert y in orders  # whole sentences, reordered
        seen.add(y)
    assert len(seen) > 5


def test_clm_never_predicts_across_segments():
    rows = ordinary(np.random.default_rng(3), (2, 12), V)
    seg = np.asarray([[1] * 5 + [2] * 4 + [3] * 3, [1] * 10 + [0] * 2], np.int32)
    b = O.clm(None, rows, seg, vocab=V)
    w = np.asarray(b["weights"])
    np.testing.assert_array_equal(w[0], [1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(w[1], [1] * 9 + [0] * 3)
    np.testing.assert_array_equal(np.asarray(b["targets"])[0, :4], rows[0, 1:5])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2])


def test_prefix_lm_prefix_inside_each_segment():
    rows = ordinary(np.random.default_rng(4), (16, 40), V)
    seg = np.repeat(np.asarray([[1] * 15 + [2] * 20 + [3] * 5]), 16, 0).astype(np.int32)
    b = jax.jit(lambda k, t, s: O.prefix_lm(k, t, s, vocab=V))(jax.random.key(4), rows, seg)
    prefix, w = np.asarray(b["prefix_mask"]), np.asarray(b["weights"])
    for r in range(16):
        for s in (1, 2, 3):
            p = prefix[r][seg[r] == s]
            n = int(p.sum())
            assert 1 <= n < len(p) and p[:n].all()  # a proper, contiguous prefix
            ws = w[r][seg[r] == s]
            # Loss from the last prefix token on, never at the segment's last token.
            np.testing.assert_array_equal(ws, [0] * (n - 1) + [1] * (len(p) - n) + [0])


def test_objective_family_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="'mlm' trains encoder models.*decoder"):
        train.make_objective("mlm", tiny("tiny-decoder"), vocab(128), 32)
    with pytest.raises(ValueError, match="span_corruption"):
        train.make_objective("span_corruption", tiny("tiny-encoder"), vocab(128), 32)
    with pytest.raises(ValueError, match="unknown name"):
        train.check_objective("gpt", "decoder")
    with pytest.raises(ValueError, match="tokenizer has 300 ids"):
        train.make_objective("clm", tiny("tiny-decoder"), vocab(300), 32)


def test_objectives_reject_bad_rows():
    with pytest.raises(ValueError, match="tokens"):
        O.clm(None, np.zeros((4,), np.int32), vocab=V)
    with pytest.raises(ValueError, match="integer"):
        O.mlm(jax.random.key(0), np.zeros((2, 8), np.float32), vocab=V)
    with pytest.raises(ValueError, match="inputs_length"):
        O.span_corruption(jax.random.key(0), np.full((1, 100), 20, np.int32), vocab=V, inputs_length=50)
    with pytest.raises(ValueError, match="mask token"):
        O.denoise(jax.random.key(0), np.full((1, 20), 20, np.int32), vocab=vocab(128).__class__(
            size=128, pad_id=0, eos_id=1))
