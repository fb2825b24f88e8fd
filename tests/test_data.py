"""The data pipeline (train/data.py) and the tokenizer adapter (train/tokens.py)."""

import numpy as np
import pytest

import zoo
from conftest import tiny
from train import data as D
from train.tokens import load_tokenizer, train_tokenizer
from train_util import SHAKESPEARE, shakespeare_texts, small_tokenizer


def _stream(lengths, start=100):
    """Documents of the given lengths with distinct ids (doc i holds start + 1000 i + k)."""
    docs = [np.arange(n, dtype=np.int32) + start + 1000 * i for i, n in enumerate(lengths)]
    return D.Stream(np.concatenate(docs), np.concatenate([[0], np.cumsum(lengths)[:-1]]))


def test_default_corpus_is_the_sorted_standard_library():
    files = D.stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_resolve_files_takes_files_globs_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta")
    assert D.resolve_files([str(tmp_path)]) == [tmp_path / "a.txt", tmp_path / "sub" / "b.txt"]
    assert D.resolve_files([str(tmp_path / "**" / "*.txt")]) == D.resolve_files([str(tmp_path)])
    assert D.resolve_files([str(SHAKESPEARE)]) == [SHAKESPEARE]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        D.resolve_files([str(tmp_path / "missing*.txt")])


def test_rows_carry_segments_and_restarting_positions():
    stream = _stream([5, 3, 9, 4])
    rows = D.rows_of(stream, np.arange(3), 7)
    np.testing.assert_array_equal(rows["tokens"].reshape(-1), stream.tokens[:21])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 1, 2, 2], [1, 2, 2, 2, 2, 2, 2],
                                                        [1, 1, 1, 2, 2, 2, 2]])
    # A document cut by a row boundary restarts at position 0 in the next row.
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3, 4, 0, 1], [0, 0, 1, 2, 3, 4, 5],
                                                      [0, 1, 2, 0, 1, 2, 3]])


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-encoder"])
def test_packed_documents_never_attend_to_each_other(name):
    """Changing one document of a packed row leaves the outputs of the others unchanged."""
    import jax

    cfg = tiny(name)
    params = zoo.init(cfg, jax.random.key(0))
    rows = D.rows_of(_stream([6, 10, 8], start=3), np.arange(1), 24)
    seg, pos = rows["segment_ids"], rows["positions"]
    toks = rows["tokens"] % 100 + 3
    other = toks.copy()
    other[seg == 2] = (other[seg == 2] * 7) % 100 + 3

    @jax.jit
    def logits(t):
        return zoo.forward(params, cfg, t, mask=seg > 0, segment_ids=seg, positions=pos).logits

    a, b = np.asarray(logits(toks)), np.asarray(logits(other))
    keep = seg[0] != 2
    np.testing.assert_allclose(a[0, keep], b[0, keep], atol=1e-6)
    assert not np.allclose(a[0, ~keep], b[0, ~keep])


def test_pipeline_is_deterministic_and_resumable():
    stream = _stream([37] * 40)
    p1 = D.Pipeline(stream, 16, batch_size=8, seed=3)
    first = [p1.next_batch()["tokens"] for _ in range(30)]  # crosses an epoch
    assert p1.epoch >= 1
    p2 = D.Pipeline(stream, 16, batch_size=8, seed=3)
    for _ in range(11):
        p2.next_batch()
    p3 = D.Pipeline(stream, 16, batch_size=8, seed=3)
    p3.set_position(p2.position)
    for i in range(11, 30):
        np.testing.assert_array_equal(p3.next_batch()["tokens"], first[i])
    other = D.Pipeline(stream, 16, batch_size=8, seed=4).next_batch()["tokens"]
    assert not np.array_equal(other, first[0])


def test_pipeline_held_out_rows_are_never_trained_on():
    stream = _stream([37] * 200)
    p = D.Pipeline(stream, 16, batch_size=8, seed=0)
    assert len(p.eval_rows) > 0 and not set(p.eval_rows) & set(p.train_rows)
    held = {tuple(r) for b in p.eval_batches(2) for r in b["tokens"]}
    for _ in range(p.epoch_steps):
        assert not {tuple(r) for r in p.next_batch()["tokens"]} & held


def test_pipeline_shards_the_global_batch_by_process():
    stream = _stream([37] * 200)
    whole = D.Pipeline(stream, 16, batch_size=8, seed=1)
    parts = [D.Pipeline(stream, 16, batch_size=8, seed=1, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        glob = whole.next_batch()["tokens"]
        local = [p.next_batch()["tokens"] for p in parts]
        assert local[0].shape == (4, 16)
        np.testing.assert_array_equal(np.concatenate(local), glob)


def test_pipeline_errors():
    with pytest.raises(ValueError, match="fewer than one batch"):
        D.Pipeline(_stream([20] * 3), 16, batch_size=8)
    with pytest.raises(ValueError, match="multiple of the process count"):
        D.Pipeline(_stream([37] * 200), 16, batch_size=3, process_count=2)
    with pytest.raises(ValueError, match="outside this corpus"):
        D.Pipeline(_stream([37] * 200), 16, batch_size=8).set_position({"epoch": 0, "index": 10**6})


def test_tokenize_appends_eos_and_caches(tmp_path):
    tok = small_tokenizer()
    texts = list(shakespeare_texts()[:3])
    s = D.tokenize(texts, tok, tmp_path)
    ends = np.append(s.doc_starts[1:], len(s.tokens)) - 1
    assert np.all(s.tokens[ends] == tok.vocab.eos_id)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1
    again = D.tokenize(texts, tok, tmp_path)
    np.testing.assert_array_equal(again.tokens, s.tokens)
    assert again.fingerprint == s.fingerprint


def test_trained_tokenizer_specials_and_round_trip(tmp_path):
    tok = small_tokenizer()
    v = tok.vocab
    assert (v.pad_id, v.eos_id, v.mask_id) == (0, 1, 3) and not v.sentinel_ids
    text = "First Citizen:\n    Before we proceed any further, hear me speak.\n"
    assert tok.decode(tok.encode([text])[0]) == text
    tok.save(tmp_path / "t.model")
    assert load_tokenizer(tmp_path / "t.model").vocab == v


def test_encdec_tokenizer_has_t5_sentinels_at_the_top():
    tok = small_tokenizer(sentinels=100)
    v = tok.vocab
    assert v.sentinel_ids == tuple(range(v.size - 1, v.size - 101, -1))
    assert tok.decode([v.sentinel_ids[0], v.sentinel_ids[1]]) == "<extra_id_0><extra_id_1>"
    assert max(max(ids) for ids in tok.encode(shakespeare_texts()[:2])) < v.size - 100


def test_loaded_model_without_pad_or_mask_gets_them_appended():
    tok = load_tokenizer(SHAKESPEARE.parent / "spm" / "botchan_en_unigram_1000.model", num_sentinels=10)
    v = tok.vocab
    assert v.size == 1000 + 10 + len(tok.extra) and "<mask>" in tok.extra
    assert v.mask_id >= 1010 and v.sentinel_ids[0] == 1009


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "none.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=200)


def test_a_corpus_without_text_is_one_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match=r"data: the corpus has no text \(2 file\(s\), all empty") as e:
        D.read_texts(D.resolve_files([str(tmp_path)]))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no text to train on"):  # the tokenizer on its own
        train_tokenizer(["", " \n"], vocab_size=400)
