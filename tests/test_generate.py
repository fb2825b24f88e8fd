"""zoo.generate: greedy, sampling, beam search and speculative decoding, for the decoder
and encdec families; zoo.encode for embeddings.

Reference outputs come from full forward passes (teacher forcing) and from Hugging Face
transformers' generate on the same random weights (loaded with zoo's HF import)."""

import importlib
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from conftest import compiles, tiny, tokens

KEY = jax.random.key(0)
FWD = jax.jit(zoo.forward, static_argnums=1)
ENCODE = jax.jit(zoo.encode, static_argnums=1, static_argnames=("pooling", "normalize"))


def _model(name, seed=0, head_scale=1.0, **overrides):
    """A tiny model; head_scale > 1 sharpens its next-token distributions (random init
    gives near-uniform ones, which would make sampling tests blind)."""
    cfg = tiny(name, **overrides)
    params = zoo.init(cfg, jax.random.key(seed))
    if head_scale != 1.0:
        params["head"]["kernel"] = params["head"]["kernel"] * head_scale
    return cfg, params


def _teacher_forced(params, cfg, prompt, new, mask=None):
    """Logits [B, N, V] that predicted each of the new tokens [B, N], from one full forward;
    a decoder prompt with a mask is left-aligned first (any padding side)."""
    n = new.shape[1]
    if cfg.family == "encdec":
        start = jnp.full((new.shape[0], 1), cfg.decoder_start_id, jnp.int32)
        return FWD(params, cfg, prompt, jnp.concatenate([start, new[:, :-1]], axis=1), src_mask=mask).logits
    kw = {}
    if mask is not None:
        order = np.argsort(np.asarray(mask), axis=1, kind="stable")  # padding first
        prompt = jnp.take_along_axis(prompt, order, axis=1)
        kw["mask"] = jnp.concatenate([jnp.take_along_axis(mask, order, axis=1),
                                      jnp.ones(new.shape, bool)], axis=1)
    seq = jnp.concatenate([prompt, new], axis=1)
    return FWD(params, cfg, seq, **kw).logits[:, prompt.shape[1] - 1:prompt.shape[1] - 1 + n]


def _assert_greedy(params, cfg, prompt, out, mask=None):
    """out [B, N] is each row's greedy continuation (no stop tokens)."""
    logits = _teacher_forced(params, cfg, prompt, out, mask)
    assert jnp.argmax(logits, axis=-1).tolist() == out.tolist()


# --- greedy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,overrides", [
    ("tiny-decoder", dict(sliding_window=3)), ("tiny-encdec", {}),
    pytest.param("tiny-decoder", {}, marks=pytest.mark.slow), pytest.param("tiny-moe", {}, marks=pytest.mark.slow)])
def test_greedy_is_the_argmax_of_the_full_forward(name, overrides):
    cfg, params = _model(name, **overrides)
    prompt = tokens(jax.random.key(1), 2, 6)
    out = zoo.generate(params, cfg, prompt, 10, stop_tokens=())
    assert out.shape == (2, 10) and out.dtype == jnp.int32
    _assert_greedy(params, cfg, prompt, out)


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-encdec"])
def test_prompts_of_different_lengths(name):
    """Left or right padding: each row gets the greedy continuation of its own prompt."""
    cfg, params = _model(name)
    lengths = [7, 3, 5]
    prompt = np.asarray(tokens(jax.random.key(2), 3, 7))
    for side in ("right", "left"):
        padded, mask = np.zeros_like(prompt), np.zeros(prompt.shape, bool)
        for i, n in enumerate(lengths):
            cols = slice(0, n) if side == "right" else slice(7 - n, 7)
            padded[i, cols], mask[i, cols] = prompt[i, :n], True
        padded, mask = jnp.asarray(padded), jnp.asarray(mask)
        out = zoo.generate(params, cfg, padded, 8, prompt_mask=mask, stop_tokens=())
        _assert_greedy(params, cfg, padded, out, mask)


def test_stop_tokens_end_a_row_and_pad_after():
    cfg, params = _model("tiny-decoder")
    prompt = tokens(jax.random.key(3), 2, 5)
    free = zoo.generate(params, cfg, prompt, 10, stop_tokens=())
    stop = int(free[0, 3])
    out = zoo.generate(params, cfg, prompt, 10, stop_tokens=(stop, 127))
    for row_free, row in zip(free.tolist(), out.tolist()):
        end = row_free.index(stop) + 1 if stop in row_free else 10
        assert row[:end] == row_free[:end]
        assert row[end:] == [cfg.pad_id] * (10 - end)


def test_generate_runs_as_one_loop_inside_jit():
    cfg, params = _model("tiny-decoder")
    prompt = tokens(jax.random.key(4), 2, 5)
    jaxpr = jax.make_jaxpr(lambda p, x: zoo.generate(p, cfg, x, 8))(params, prompt)
    text = str(jaxpr)
    assert text.count("while[") == 1
    jitted = jax.jit(lambda p, x: zoo.generate(p, cfg, x, 8))(params, prompt)
    assert jitted.tolist() == zoo.generate(params, cfg, prompt, 8).tolist()


def test_generating_again_neither_recompiles_nor_reads_back_to_the_host():
    cfg, params = _model("tiny-decoder")
    params = jax.block_until_ready(zoo.decoding.unstacked(params))
    zoo.generate(params, cfg, tokens(jax.random.key(4), 2, 5), 8)
    prompt = jax.block_until_ready(tokens(jax.random.key(5), 2, 5))
    with compiles() as n, jax.transfer_guard_device_to_host("disallow"):
        out = zoo.generate(params, cfg, prompt, 8)
    assert n[0] == 0
    assert out.shape == (2, 8)


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-encdec"])
def test_generate_takes_parameters_already_in_the_decoding_layout(name):
    """A server converts once (zoo.decoding.unstacked); generate gives the same tokens, for
    greedy and beam search, and converting twice changes nothing."""
    cfg, params = _model(name)
    prompt = tokens(jax.random.key(16), 2, 5)
    flat = zoo.decoding.unstacked(params)
    assert zoo.decoding.unstacked(flat)["decoder"]["layers"][0].keys() == flat["decoder"]["layers"][0].keys()
    for beams in (1, 3):
        assert (zoo.generate(flat, cfg, prompt, 6, num_beams=beams).tolist()
                == zoo.generate(params, cfg, prompt, 6, num_beams=beams).tolist())


def test_generate_on_a_sharded_model_under_a_mesh():
    cfg, params = _model("tiny-decoder")
    prompt = tokens(jax.random.key(15), 4, 5)
    mesh = zoo.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = jax.device_put(params, zoo.sharding.tree_shardings(zoo.axes(cfg), mesh, params))
    with zoo.sharding.use(mesh):
        got = zoo.generate(sharded, cfg, prompt, 6)
    assert got.tolist() == zoo.generate(params, cfg, prompt, 6).tolist()


def test_int8_cache_generates_like_the_full_precision_cache():
    cfg, params = _model("tiny-decoder", head_scale=20.0)
    prompt = tokens(jax.random.key(5), 2, 6)
    plain = zoo.generate(params, cfg, prompt, 12, stop_tokens=())
    int8 = zoo.generate(params, cfg, prompt, 12, stop_tokens=(), cache_dtype="int8")
    assert float(jnp.mean(plain == int8)) >= 0.9


# --- sampling -------------------------------------------------------------------------------
def test_greedy_argmax_matches_jnp_argmax_on_ties_nans_and_infinities():
    from zoo.sampling import argmax
    rows = np.array([[1.0, 3.0, 3.0, 2.0],  # tie: the first wins
                     [-np.inf, -np.inf, -np.inf, -np.inf],
                     [0.0, np.nan, 5.0, np.nan],  # NaN wins, the first one
                     [np.inf, 1.0, np.inf, 0.0]], np.float32)
    rng = np.random.default_rng(0).standard_normal((2, 3, 1000)).astype(np.float32)
    for x in (jnp.asarray(rows), jnp.asarray(rows, jnp.bfloat16), jnp.asarray(rng)):
        got = jax.jit(argmax)(x)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))


def test_top_k_and_top_p_never_leave_the_allowed_set():
    cfg, params = _model("tiny-decoder", head_scale=30.0)
    prompt = tokens(jax.random.key(6), 16, 4)
    k_out = zoo.generate(params, cfg, prompt, 12, key=jax.random.key(7), top_k=3, stop_tokens=())
    logits = _teacher_forced(params, cfg, prompt, k_out)
    rank = jnp.sum(logits > jnp.take_along_axis(logits, k_out[..., None], -1), axis=-1)
    assert int(jnp.max(rank)) < 3

    top_p, temperature = 0.6, 0.7
    p_out = zoo.generate(params, cfg, prompt, 12, key=jax.random.key(8), top_p=top_p,
                         temperature=temperature, stop_tokens=())
    probs = jax.nn.softmax(_teacher_forced(params, cfg, prompt, p_out) / temperature, axis=-1)
    chosen = jnp.take_along_axis(probs, p_out[..., None], -1)
    better = jnp.sum(jnp.where(probs > chosen, probs, 0.0), axis=-1)  # mass ranked above
    assert float(jnp.max(better)) < top_p + 1e-5
    assert len(set(p_out.reshape(-1).tolist())) > 1  # it did sample


def _truncated(probs: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The law top-k then top-p sampling draws from, written out over sorted probabilities
    [V]: keep the k best, renormalise, keep a token while the better ones hold < top_p."""
    order = np.argsort(-probs, kind="stable")
    p = probs[order].copy()
    if top_k:
        p[top_k:] = 0.0
    p /= p.sum()
    before = np.cumsum(p) - p
    # A cut within float noise of top_p would make the reference itself ambiguous.
    assert np.all(np.abs(before[1:] - top_p) > 0.02) or top_p == 1.0
    p = np.where(before < top_p, p, 0.0)
    out = np.zeros_like(p)
    out[order] = p / p.sum()
    return out


@pytest.mark.parametrize("top_k,top_p,temperature", [(3, 1.0, 1.0), (0, 0.75, 1.0), (4, 0.8, 1.3)])
def test_top_k_and_top_p_sample_the_truncated_renormalised_distribution(top_k, top_p, temperature):
    """Statistical test, fixed seeds. Vocabulary 8: the first new token's law is written
    out from the full forward's logits and estimated from 4000 samples. Sampling noise gives
    a total-variation distance of about 0.5 * sqrt(2 / pi) * sum_i sqrt(p_i / n) <= 0.02;
    we allow 0.05. Keeping one token fewer (down to only the best) or one more is > 0.1 away
    (asserted on the reference itself)."""
    n = 4000
    cfg, params = _model("tiny-decoder", head_scale=12.0, vocab_size=8)
    prompt = jnp.array([[3, 5, 7, 4]], jnp.int32)
    probs = np.asarray(jax.nn.softmax(FWD(params, cfg, prompt).logits[0, -1] / temperature), np.float64)
    want = _truncated(probs, top_k, top_p)
    kept = int(np.sum(want > 0))
    assert 2 <= kept < 8 and want.max() < 0.85  # neither greedy nor untruncated in disguise
    tv = lambda a, b: 0.5 * float(np.abs(a - b).sum())
    assert tv(want, _truncated(probs, kept - 1, 1.0)) > 0.1
    assert tv(want, _truncated(probs, kept + 1, 1.0)) > 0.1

    kw = dict(top_k=top_k or None, top_p=top_p if top_p < 1.0 else None, temperature=temperature)
    draw = lambda k: zoo.generate(params, cfg, prompt, 1, key=k, stop_tokens=(), **kw)[0, 0]
    samples = np.asarray(jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(21), n)))
    got = np.bincount(samples, minlength=8) / n
    assert tv(got, want) < 0.05, (got.round(3), want.round(3))


def _filter_rows():
    """Fixed logits [R, 10] with the edge cases of the filters: ties (at and around a cut),
    -inf entries, a flat row, a peaked row, random rows."""
    rng = np.random.default_rng(0)
    rows = [[2.0, 2.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0, -3.0, -3.0],
            [1.0] * 10,
            [8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [3.0, -np.inf, 1.0, 1.0, -np.inf, 0.5, 0.5, 0.5, -2.0, 2.0],
            [0.0, np.log(2.0), np.log(4.0), np.log(8.0), -5.0, -5.0, np.log(8.0), 0.0, 1.0, 1.0]]
    return np.concatenate([np.asarray(rows, np.float32),
                           (rng.standard_normal((12, 10)) * 2).astype(np.float32)])


@pytest.mark.parametrize("settings", [dict(min_p=0.1), dict(min_p=0.3), dict(min_p=1.0),
                                      dict(typical_p=0.2), dict(typical_p=0.5), dict(typical_p=0.9),
                                      dict(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05, typical_p=0.8)])
def test_min_p_and_typical_p_keep_the_tokens_transformers_keeps(settings):
    """zoo.sampling.process on fixed logits keeps exactly the tokens transformers' warpers
    (TemperatureLogitsWarper, TopK, TopP, MinP, TypicalLogitsWarper, in generate's order) keep."""
    import torch
    from transformers import generation as hf
    from zoo.sampling import Sampler, process

    logits = _filter_rows()
    if "top_p" in settings:  # top-p cuts ties by position, transformers by torch.sort's order
        logits = logits[5:]
    warpers = [hf.TemperatureLogitsWarper(settings.get("temperature", 1.0))]
    if "top_k" in settings:
        warpers.append(hf.TopKLogitsWarper(settings["top_k"]))
    if "top_p" in settings:
        warpers.append(hf.TopPLogitsWarper(settings["top_p"]))
    if "min_p" in settings:
        warpers.append(hf.MinPLogitsWarper(settings["min_p"]))
    if "typical_p" in settings:
        warpers.append(hf.TypicalLogitsWarper(settings["typical_p"]))
    theirs = torch.tensor(logits)
    for w in warpers:
        theirs = w(None, theirs)
    sampler = Sampler(False, settings.get("temperature", 1.0), settings.get("top_k", 0),
                      settings.get("top_p", 1.0), settings.get("min_p", 0.0), settings.get("typical_p", 1.0))
    ours = np.asarray(process(jnp.asarray(logits), sampler))
    kept = np.isfinite(ours)
    assert (kept == np.isfinite(theirs.numpy())).all()
    assert kept.sum(axis=1).min() >= 1 and (kept != np.isfinite(logits)).any()  # it filtered


def test_min_p_and_typical_p_reach_the_sampler():
    """min_p=1 keeps only the best token (greedy); a tiny typical_p keeps only the token whose
    surprisal is closest to the entropy (checked on the teacher-forced logits)."""
    cfg, params = _model("tiny-decoder", head_scale=5.0)
    prompt = tokens(jax.random.key(17), 2, 5)
    greedy = zoo.generate(params, cfg, prompt, 6, stop_tokens=())
    assert zoo.generate(params, cfg, prompt, 6, key=KEY, min_p=1.0, stop_tokens=()).tolist() == greedy.tolist()
    typical = zoo.generate(params, cfg, prompt, 6, key=KEY, typical_p=1e-6, stop_tokens=())
    logp = jax.nn.log_softmax(_teacher_forced(params, cfg, prompt, typical), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1, keepdims=True)
    assert jnp.argmin(jnp.abs(-logp - entropy), axis=-1).tolist() == typical.tolist() != greedy.tolist()


def test_sampling_depends_on_the_key_only():
    cfg, params = _model("tiny-decoder", head_scale=5.0)
    prompt = tokens(jax.random.key(9), 4, 4)
    a = zoo.generate(params, cfg, prompt, 10, key=jax.random.key(1), stop_tokens=())
    b = zoo.generate(params, cfg, prompt, 10, key=jax.random.key(1), stop_tokens=())
    c = zoo.generate(params, cfg, prompt, 10, key=jax.random.key(2), stop_tokens=())
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


# --- contrastive search ---------------------------------------------------------------------
def _contrastive_reference(params, cfg, prompt, new, k, alpha):
    """Contrastive search written out for one unpadded prompt [T] without a cache: each
    step runs the whole sequence plus each of the k most probable tokens and keeps the best
    (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j) over the earlier tokens' states h_j.
    (Sequences are right-padded to one width: in a causal decoder that changes no state.)"""
    seq = [int(t) for t in prompt]
    width = 16
    padded = lambda rows: jnp.asarray([r + [0] * (width - len(r)) for r in rows])
    for _ in range(new):
        t = len(seq)
        out = FWD(params, cfg, padded([seq]))
        probs = np.asarray(jax.nn.softmax(out.logits[0, t - 1]), np.float64)
        context = np.asarray(out.hidden[0, :t], np.float64)
        top = [int(v) for v in np.argsort(-probs, kind="stable")[:k]]
        states = np.asarray(FWD(params, cfg, padded([seq + [v] for v in top])).hidden[:, t], np.float64)
        best, best_score = None, -np.inf
        for v, h in zip(top, states):
            cos = context @ h / (np.linalg.norm(context, axis=1) * np.linalg.norm(h))
            score = (1 - alpha) * probs[v] - alpha * cos.max()
            if score > best_score:
                best, best_score = int(v), score
        seq.append(best)
    return seq[len(prompt):]


def test_contrastive_search_equals_its_scoring_written_out():
    """Two prompts, one left-padded (the padding is no context), with a penalty that
    composes; the result is neither greedy's nor plain top-1."""
    cfg, params = _model("tiny-decoder", head_scale=3.0)
    k, alpha, new = 4, 0.6, 6
    prompt = np.asarray(tokens(jax.random.key(18), 2, 6))
    mask = np.ones(prompt.shape, bool)
    mask[1, :2] = False
    out = zoo.generate(params, cfg, jnp.asarray(prompt), new, prompt_mask=jnp.asarray(mask),
                       penalty_alpha=alpha, top_k=k, stop_tokens=())
    for row in range(2):
        assert out[row].tolist() == _contrastive_reference(params, cfg, prompt[row][mask[row]], new, k, alpha)
    greedy = zoo.generate(params, cfg, jnp.asarray(prompt), new, prompt_mask=jnp.asarray(mask), stop_tokens=())
    assert out.tolist() != greedy.tolist()


# --- batch serving ----------------------------------------------------------------------------
def test_return_lengths_counts_each_rows_tokens_up_to_its_stop():
    """Ragged prompts whose rows stop at different steps (or never): lengths count the stop
    token. (They are read off the tokens, so every strategy returns them alike.)"""
    num_beams = 1
    cfg, params = _model("tiny-decoder")
    prompt = tokens(jax.random.key(19), 3, 6)
    mask = jnp.arange(6)[None, :] >= jnp.array([[0], [3], [1]])
    free = zoo.generate(params, cfg, prompt, 10, prompt_mask=mask, num_beams=num_beams, stop_tokens=()).tolist()
    stop = free[0][2]
    out, lengths = zoo.generate(params, cfg, prompt, 10, prompt_mask=mask, num_beams=num_beams,
                                stop_tokens=(stop,), return_lengths=True)
    want = [row.index(stop) + 1 if stop in row else 10 for row in out.tolist()]
    assert lengths.dtype == jnp.int32 and lengths.tolist() == want
    assert min(want) < 10 and len(set(want)) > 1, want


# --- speculative ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,overrides,k", [("tiny-decoder", {}, 3), ("tiny-decoder", dict(sliding_window=4), 2),
                                              ("tiny-encdec", {}, 3)])
def test_speculative_greedy_equals_greedy(name, overrides, k):
    cfg, params = _model(name, **overrides)
    draft_cfg, draft_params = _model(name, seed=1, num_layers=1, **overrides)
    prompt = tokens(jax.random.key(10), 3, 6)
    mask = jnp.arange(6)[None, :] >= jnp.array([[0], [2], [5]])
    fast = zoo.generate(params, cfg, prompt, 12, prompt_mask=mask, draft_params=draft_params,
                        draft_cfg=draft_cfg, num_speculative=k, stop_tokens=())
    _assert_greedy(params, cfg, prompt, fast, mask)
    if overrides or cfg.family != "decoder":
        return
    # The target as its own draft accepts everything; a stop token ends rows mid-round.
    stop = int(fast[0, 4])
    plain = zoo.generate(params, cfg, prompt, 12, prompt_mask=mask, stop_tokens=(stop,))
    same = zoo.generate(params, cfg, prompt, 12, prompt_mask=mask, draft_params=params,
                        draft_cfg=cfg, num_speculative=k, stop_tokens=(stop,))
    assert same.tolist() == plain.tolist()


def _pair_frequencies(samples, vocab):
    """samples [n, 2] -> empirical joint distribution [vocab, vocab]."""
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (samples[:, 0], samples[:, 1]), 1)
    return counts / len(samples)


def test_speculative_sampling_follows_the_target_distribution():
    """Statistical test, fixed seeds. Vocabulary 8; the joint law of the 2nd and 3rd new
    tokens (the first is drawn by the target alone) is computed exactly from the target
    and estimated from 4000 speculative samples (k=2: acceptances, rejections, bonus tokens,
    two rows per call so the batch's common advance is exercised too).

    Bound: sampling noise alone gives a total-variation distance of about
    0.5 * sqrt(2 / pi) * sum_i sqrt(p_i / n) <= 0.05 over 64 cells at n = 4000; we allow 0.07.
    The draft's own law is far away (asserted > 0.2), so accepting drafts blindly fails."""
    vocab, n_calls, temperature = 8, 2000, 0.9
    cfg, params = _model("tiny-decoder", head_scale=60.0, vocab_size=vocab)
    dcfg, dparams = _model("tiny-decoder", seed=3, head_scale=60.0, vocab_size=vocab, num_layers=1)
    prompt = jnp.array([[3, 5, 7, 4]] * 2, jnp.int32)

    def exact_pairs(p, c):
        seqs = jnp.array([[a, b, x] for a in range(vocab) for b in range(vocab) for x in range(vocab)], jnp.int32)
        full = jnp.concatenate([jnp.broadcast_to(prompt[:1], (len(seqs), 4)), seqs], axis=1)
        lp = jax.nn.log_softmax(FWD(p, c, full).logits / temperature, axis=-1)
        idx = jnp.arange(len(seqs))
        logp = lp[idx, 3, seqs[:, 0]] + lp[idx, 4, seqs[:, 1]] + lp[idx, 5, seqs[:, 2]]
        return np.asarray(jnp.exp(logp).reshape(vocab, vocab, vocab).sum(axis=0))  # law of (x2, x3)

    def draw(**kw):
        fn = lambda k: zoo.generate(params, cfg, prompt, 3, key=k, temperature=temperature,
                                    stop_tokens=(), **kw)
        out = jax.jit(jax.vmap(fn))(jax.random.split(jax.random.key(11), n_calls))
        return np.asarray(out[:, :, 1:]).reshape(-1, 2)

    target = exact_pairs(params, cfg)
    assert abs(target.sum() - 1) < 1e-4
    spec = _pair_frequencies(draw(draft_params=dparams, draft_cfg=dcfg, num_speculative=2), vocab)
    plain = _pair_frequencies(draw(), vocab)
    tv = lambda a, b: 0.5 * float(np.abs(a - b).sum())
    assert tv(exact_pairs(dparams, dcfg), target) > 0.2
    assert tv(plain, target) < 0.07
    assert tv(spec, target) < 0.07, tv(spec, target)
    assert tv(spec, plain) < 0.1


# --- beam search ----------------------------------------------------------------------------
def test_beam_search_finds_at_least_the_greedy_score():
    """Without stop tokens and length penalty, the best beam's log-probability is at least
    greedy's (greedy's path is among those the first beam can keep)."""
    cfg, params = _model("tiny-decoder", head_scale=5.0)
    prompt = tokens(jax.random.key(12), 2, 5)

    def score(new):
        lp = jax.nn.log_softmax(_teacher_forced(params, cfg, prompt, new), axis=-1)
        return jnp.sum(jnp.take_along_axis(lp, new[..., None], -1)[..., 0], axis=1)

    greedy = zoo.generate(params, cfg, prompt, 8, stop_tokens=())
    beams = zoo.generate(params, cfg, prompt, 8, num_beams=4, stop_tokens=(), length_penalty=0.0)
    assert bool(jnp.all(score(beams) >= score(greedy) - 1e-4))


def _beam_reference(cumulative: list[np.ndarray], beams: int) -> tuple[int, ...]:
    """Beam search written out over exhaustive tables: cumulative[t] [V] * (t + 1) holds
    the log-probability of every length-(t + 1) continuation; keep the `beams` best
    extensions of the kept prefixes at each step, return the best full one."""
    kept = [()]
    for table in cumulative:
        candidates = [p + (x,) for p in kept for x in range(table.shape[-1])]
        kept = sorted(candidates, key=lambda c: -table[c])[:beams]
    return kept[0]


def test_beam_search_equals_beam_search_over_the_exhaustive_scores():
    """Vocabulary 8, 3 new tokens: all 512 continuations are scored by one full forward.
    4-beam search returns what beam search written over those scores returns, which here
    is the most probable continuation and not greedy's (so greedy output fails)."""
    vocab, new, beams = 8, 3, 4
    cfg, params = _model("tiny-decoder", seed=2, head_scale=3.0, vocab_size=vocab)
    prompt = jnp.array([[3, 5, 7, 4], [6, 2, 1, 5]], jnp.int32)
    seqs = jnp.array(list(itertools.product(range(vocab), repeat=new)), jnp.int32)  # [512, 3]
    got = zoo.generate(params, cfg, prompt, new, num_beams=beams, stop_tokens=(), length_penalty=0.0)
    greedy = zoo.generate(params, cfg, prompt, new, stop_tokens=())
    for row in range(2):
        full = jnp.concatenate([jnp.broadcast_to(prompt[row], (len(seqs), 4)), seqs], axis=1)
        lp = jax.nn.log_softmax(FWD(params, cfg, full).logits[:, 3:3 + new], axis=-1)
        steps = np.asarray(jnp.take_along_axis(lp, seqs[..., None], -1)[..., 0])  # [512, 3]
        cumulative = [np.cumsum(steps, axis=1)[:, t].reshape((vocab,) * new)[(Ellipsis,) + (0,) * (new - 1 - t)]
                      for t in range(new)]
        best = tuple(np.unravel_index(np.argmax(cumulative[-1]), cumulative[-1].shape))
        assert tuple(got[row].tolist()) == _beam_reference(cumulative, beams) == best
        assert tuple(greedy[row].tolist()) != best


# --- errors ---------------------------------------------------------------------------------
def test_bad_arguments_are_clear_errors():
    cfg, params = _model("tiny-decoder")
    prompt = tokens(KEY, 2, 5)
    key = jax.random.key(1)
    cases = [
        (dict(key=key, top_p=0.0), "top_p"),
        (dict(key=key, top_p=1.5), "top_p"),
        (dict(key=key, top_k=0), "top_k"),
        (dict(key=key, temperature=0.0), "temperature"),
        (dict(top_k=5), "needs key"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, key=key), "deterministic"),
        (dict(cache_len=8), "cache_len"),
        (dict(cache_dtype="int4"), "cache_dtype"),
        (dict(stop_tokens=(500,)), "stop_tokens"),
        (dict(draft_params=params), "both"),
        (dict(draft_params=params, draft_cfg=cfg.replace(vocab_size=64)), "vocabulary"),
        (dict(draft_params=params, draft_cfg=cfg, num_speculative=0), "num_speculative"),
        (dict(prompt_mask=jnp.zeros((2, 5), bool)), "no real token"),
        (dict(prompt_mask=jnp.ones((2, 4), bool)), "prompt_mask"),
        (dict(typical_p=0.9), "typical_p: sampling needs key"),
        (dict(min_p=0.1), "min_p: sampling needs key"),
        (dict(key=key, typical_p=0.0), "typical_p"),
        (dict(key=key, min_p=1.5), "min_p"),
        (dict(penalty_alpha=0.6), "penalty_alpha: contrastive search needs top_k"),
        (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha"),
        (dict(penalty_alpha=0.6, top_k=4, num_beams=2), "penalty_alpha"),
        (dict(penalty_alpha=0.6, top_k=500), "beyond the vocabulary"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(min_new_tokens=9), "min_new_tokens"),
        (dict(repetition_penalty=1.2, draft_params=params, draft_cfg=cfg), "speculative"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            zoo.generate(params, cfg, prompt, 8, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        zoo.generate(params, cfg, prompt, 0)
    learned = cfg.replace(positions="learned", max_len=16)
    with pytest.raises(ValueError, match="max_len=16"):
        zoo.generate(zoo.init(learned, KEY), learned, prompt, 20)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        zoo.generate(params, cfg, prompt.at[0, 0].set(999), 4)
    with pytest.raises(ValueError, match="zoo.encode"):
        ecfg = tiny("tiny-encoder")
        zoo.generate(zoo.init(ecfg, KEY), ecfg, prompt, 4)


# --- encode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-encdec"])
def test_encode_pools_real_tokens(name):
    cfg, params = _model(name)
    toks = tokens(jax.random.key(13), 2, 7)
    mask = jnp.arange(7)[None, :] < jnp.array([[7], [4]])
    if cfg.family == "encoder":
        hidden = FWD(params, cfg, toks, mask=mask).hidden
    else:
        hidden = FWD(params, cfg, toks, toks[:, :1], src_mask=mask).encoder_hidden
    mean = ENCODE(params, cfg, toks, mask)
    assert mean.shape == (2, cfg.d_model)
    np.testing.assert_allclose(mean[1], hidden[1, :4].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(ENCODE(params, cfg, toks, mask, pooling="cls"), hidden[:, 0], atol=1e-6)
    unit = ENCODE(params, cfg, toks, mask, normalize=True)
    np.testing.assert_allclose(jnp.linalg.norm(unit, axis=-1), 1.0, atol=1e-5)
    # Padding content does not matter.
    other = toks.at[1, 4:].set(5)
    np.testing.assert_allclose(ENCODE(params, cfg, other, mask), mean, atol=1e-5)


def test_encode_errors():
    cfg, params = _model("tiny-encoder")
    toks = tokens(KEY, 2, 5)
    with pytest.raises(ValueError, match="pooling"):
        zoo.encode(params, cfg, toks, pooling="max")
    dcfg, dparams = _model("tiny-decoder")
    with pytest.raises(ValueError, match="family"):
        zoo.encode(dparams, dcfg, toks)


# --- parity with Hugging Face transformers -----------------------------------------------------
HF_CASES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=64)),
    # window 5 < prompt + new tokens: the ring buffer is in play.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, intermediate_size=64,
                                                            sliding_window=5)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, intermediate_size=64,
                                                            num_local_experts=4, num_experts_per_tok=2)),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                          relative_attention_num_buckets=8,
                                                          relative_attention_max_distance=12)),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(d_model=32, encoder_layers=2, decoder_layers=2,
                                                                encoder_attention_heads=4, decoder_attention_heads=4,
                                                                encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                                max_position_embeddings=64)),
}
HF_NEW = 12


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (transformers model, zoo cfg, zoo params), built lazily."""
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers.logging.set_verbosity_error()
    load_hf = zoo.load_hf
    built = {}

    def get(name):
        if name not in built:
            config_cls, model_cls, kwargs = HF_CASES[name]
            torch.manual_seed(0)
            model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(vocab_size=128, **kwargs))
            with torch.no_grad():  # sharpen and perturb: no tensor at its trivial init
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            path = tmp_path_factory.mktemp(name)
            model.eval().save_pretrained(path)
            cfg, params = load_hf(path)
            built[name] = model, cfg, params
        return built[name]

    return get


def _hf_generate(model, cfg, prompt, mask, num_beams, eos, **settings):
    import torch
    import transformers

    config = transformers.GenerationConfig(
        do_sample=False, num_beams=num_beams, max_new_tokens=HF_NEW, eos_token_id=eos,
        pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id, decoder_start_token_id=cfg.decoder_start_id,
        length_penalty=1.0, early_stopping=False, **settings)
    model.generation_config.forced_eos_token_id = None  # BART's config forces EOS last
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             generation_config=config).numpy()
    return out[:, prompt.shape[1]:] if cfg.family == "decoder" else out[:, 1:]


def _until(row, stop):
    row = [int(t) for t in row]
    return row[:row.index(stop) + 1] if stop in row else row


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_matches_transformers_generate(hf_models, name, num_beams):
    """Greedy and 4-beam search token for token, with an EOS the models do emit: the token
    greedy decoding produces 4th (so beams finish at different lengths)."""
    model, cfg, params = hf_models(name)
    prompt = np.asarray(tokens(jax.random.key(14), 3, 7))
    mask = np.ones(prompt.shape, bool)
    if cfg.family == "decoder":
        mask[1, :3] = False  # a left-padded row
        prompt = np.where(mask, prompt, cfg.pad_id)
    free = zoo.generate(params, cfg, jnp.asarray(prompt), HF_NEW, prompt_mask=jnp.asarray(mask), stop_tokens=())
    eos = int(free[0, 3])
    ours = zoo.generate(params, cfg, jnp.asarray(prompt), HF_NEW, prompt_mask=jnp.asarray(mask),
                        num_beams=num_beams, stop_tokens=(eos,))
    theirs = _hf_generate(model, cfg, prompt, mask, num_beams, eos)
    for a, b in zip(np.asarray(ours), theirs):
        assert _until(a, eos) == _until(b, eos)


@pytest.mark.parametrize("name,num_beams", [("llama", 1), ("llama", 4),
                                            pytest.param("bart", 4, marks=pytest.mark.slow)])
def test_penalties_match_transformers_generate(hf_models, name, num_beams):
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens together, greedy and 4
    beams, token for token (llama: a left-padded row, whose padding transformers skips too;
    bart: the decoder start token counts as seen). The stop token is one greedy emits 2nd,
    so min_new_tokens=5 holds it back. On these weights each setting alone changes the
    output (checked when the test was written; not re-run, to keep the suite fast)."""
    model, cfg, params = hf_models(name)
    prompt = np.asarray(tokens(jax.random.key(14), 3, 7))
    mask = np.ones(prompt.shape, bool)
    if cfg.family == "decoder":
        mask[1, :3] = False
        prompt = np.where(mask, prompt, cfg.pad_id)
    settings = dict(repetition_penalty=1.1, no_repeat_ngram_size=2, min_new_tokens=5)
    gen = lambda eos, **kw: np.asarray(zoo.generate(params, cfg, jnp.asarray(prompt), HF_NEW,
                                                    prompt_mask=jnp.asarray(mask), num_beams=num_beams,
                                                    stop_tokens=eos, **kw))
    eos = int(gen(())[0, 1])
    ours = gen((eos,), **settings)
    theirs = _hf_generate(model, cfg, prompt, mask, num_beams, eos, **settings)
    for a, b in zip(ours, theirs):
        assert _until(a, eos) == _until(b, eos)


def test_a_model_without_pad_id_fills_stopped_rows_with_eos_or_the_stop_token():
    """As transformers' generate: no pad token -> eos after a stop; neither -> the stop token."""
    cfg, params = _model("tiny-decoder")
    prompt = tokens(jax.random.key(3), 2, 5)
    free = zoo.generate(params, cfg, prompt, 10, stop_tokens=()).tolist()
    stop = free[0][3]
    out = zoo.generate(params, cfg.replace(pad_id=None), prompt, 10, stop_tokens=(stop,)).tolist()
    end = free[0].index(stop) + 1
    assert out[0][:end] == free[0][:end] and out[0][end:] == [cfg.eos_id] * (10 - end)
    from zoo.generate import filler
    bare = cfg.replace(pad_id=None, eos_id=None)
    assert filler(bare, (stop, 5)) == stop and filler(bare, ()) == 0
