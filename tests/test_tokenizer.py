"""zoo.tokenizer: SentencePiece models shipped with checkpoints, in-process training, and T5
sentinels (appended after the vocabulary, <extra_id_0> highest)."""

import importlib
import json
import os
import re
import shutil
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it

import zoo  # noqa: E402

SPM = Path(os.environ["ZOO_DATA_DIR"]) / "spm"  # set by conftest: ../shared/data beside the repo
UNIGRAM, BPE = SPM / "botchan_en_unigram_1000.model", SPM / "botchan_en_bpe_1000.model"
CORPUS = SPM / "botchan.txt"
TEXTS = ["The cat walks home.", "I have never been so surprised in my life!", "Botchan, my friend.", ""]



@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [line for line in CORPUS.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("path", [UNIGRAM, BPE])
def test_load_model_file(path):
    tok = zoo.tokenizer.load(path)
    assert tok.base_size == tok.vocab_size == 1000 and tok.extra_ids == 0
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, None)
    ids = tok.encode(TEXTS)
    assert all(0 <= i < 1000 for row in ids for i in row)
    assert [tok.decode(row) for row in ids] == TEXTS
    assert tok.encode(TEXTS[0], add_bos=True, add_eos=True) == [1, *ids[0], 2]


def _t5_dir(tmp_path: Path, **tokenizer_config) -> Path:
    shutil.copy(UNIGRAM, tmp_path / "spiece.model")
    if tokenizer_config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tmp_path


def test_sentinels_follow_the_vocabulary(tmp_path):
    tok = zoo.tokenizer.load(_t5_dir(tmp_path, extra_ids=10))
    assert (tok.base_size, tok.extra_ids, tok.vocab_size) == (1000, 10, 1010)
    assert tok.sentinel(0) == 1009 and tok.sentinel(9) == 1000
    assert tok.is_sentinel(1000) and not tok.is_sentinel(999)
    ids = tok.encode("The cat <extra_id_0> walks <extra_id_3>home.")
    assert ids.count(1009) == 1 and ids.count(1006) == 1
    assert tok.decode(ids) == "The cat <extra_id_0> walks <extra_id_3> home."
    assert tok.piece(1009) == "<extra_id_0>"
    # Beyond this tokenizer's sentinels the marker is plain text.
    assert all(i < 1000 for i in tok.encode("<extra_id_10>"))
    with pytest.raises(ValueError, match=r"sentinel: n must be in \[0, 10\)"):
        tok.sentinel(10)
    with pytest.raises(ValueError, match=r"decode: id 1010 is outside the vocabulary \[0, 1010\)"):
        tok.decode([5, 1010])


def test_extra_ids_from_special_tokens(tmp_path):
    specials = [f"<extra_id_{i}>" for i in range(4)] + ["<sep>"]
    assert zoo.tokenizer.load(_t5_dir(tmp_path, additional_special_tokens=specials)).extra_ids == 4
    assert zoo.tokenizer.load(tmp_path, extra_ids=2).extra_ids == 2  # explicit wins


def test_matches_transformers_t5_tokenizer(tmp_path):
    transformers = importlib.import_module("transformers")
    directory = _t5_dir(tmp_path)
    hf = transformers.T5Tokenizer.from_pretrained(directory, extra_ids=10)
    tok = zoo.tokenizer.load(directory, extra_ids=10)
    for text in [*TEXTS[:3], "The cat <extra_id_0> walks <extra_id_1> home <extra_id_9>."]:
        ids = tok.encode(text, add_eos=True)
        assert ids == hf(text).input_ids
        # The one deliberate difference: zoo writes a space before a sentinel, transformers not.
        assert tok.decode(ids[:-1]) == hf.decode(ids[:-1]).replace("<extra_id", " <extra_id")


def test_decode_keeps_the_spaces_around_sentinels(tmp_path):
    tok = zoo.tokenizer.load(_t5_dir(tmp_path), extra_ids=10)
    for text in ["The <extra_id_0> walks", "The cat <extra_id_0> walks <extra_id_1> home",
                 "<extra_id_0> the cat <extra_id_1><extra_id_2> home"]:
        assert tok.decode(tok.encode(text)) == text


def test_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SentencePiece model"):
        zoo.tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.tokenizer.load(tmp_path / "nope.model")


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_train_in_process(corpus, model_type, tmp_path):
    tok = zoo.tokenizer.train(corpus, vocab_size=300, model_type=model_type, extra_ids=5)
    assert (tok.base_size, tok.vocab_size) == (300, 305)
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, None)
    assert tok.sentinel(0) == 304
    line = corpus[10]
    assert tok.decode(tok.encode(line)) == line
    # Deterministic, and the bytes reload to the same tokenizer.
    again = zoo.tokenizer.train(corpus, vocab_size=300, model_type=model_type, extra_ids=5)
    assert again.to_bytes() == tok.to_bytes()
    tok.save(tmp_path / "t.model")
    assert zoo.tokenizer.load(tmp_path / "t.model", extra_ids=5).encode(line) == tok.encode(line)


def test_train_options_and_errors(corpus):
    tok = zoo.tokenizer.train(corpus[:500], vocab_size=200, bos_id=3)
    assert tok.bos_id == 3 and tok.encode("hi", add_bos=True)[0] == 3
    with pytest.raises(ValueError, match="model_type must be"):
        zoo.tokenizer.train(corpus, vocab_size=200, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 4"):
        zoo.tokenizer.train(corpus, vocab_size=2)


def _largest_stdlib_files(n: int) -> list[str]:
    """Whole documents far longer than SentencePiece's default max_sentence_length (4192 bytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: (-p.stat().st_size, p.name))[:n]
    return [f.read_text(encoding="utf-8") for f in files]


def test_train_on_whole_documents_drops_nothing():
    docs = _largest_stdlib_files(2)
    assert min(len(d.encode()) for d in docs) > 4192
    # Without byte fallback, a character of a skipped document would encode as unk.
    tok = zoo.tokenizer.train(["short text"] + docs, vocab_size=1000, model_type="bpe")
    assert tok.unk_id not in [i for doc in docs for i in tok.encode(doc)]


def test_train_refuses_a_vocabulary_the_corpus_cannot_fill():
    tiny = ["hello world, the cat sat on the mat"] * 3
    with pytest.raises(ValueError, match=r"vocab_size 8000 is more than this corpus \(3 lines\) "
                                         r"allows; the largest it allows is (\d+)") as e:
        zoo.tokenizer.train(tiny, vocab_size=8000)
    largest = int(re.search(r"allows is (\d+)", str(e.value)).group(1))
    assert zoo.tokenizer.train(tiny, vocab_size=largest).base_size == largest
    with pytest.raises(ValueError, match="raise it or lower character_coverage"):
        zoo.tokenizer.train(["abcdefghijklmnopqrstuvwxyz"], vocab_size=10)
    with pytest.raises(ValueError, match="no text to train on"):
        zoo.tokenizer.train(["", "  \n"], vocab_size=100)
