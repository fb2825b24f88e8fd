"""`python -m train finetune --task seq2seq` (train/seq2seq.py): a tiny BART built from a config
in a tmp dir with a word-level tokenizer.json, trained on a word-for-word "translation"
whose answer is known; BLEU and chrF by sacreBLEU on what `zoo.generate` writes, the best
state by BLEU, export for transformers, and the file formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from train import export, finetune
from train.seq2seq import bleu_chrf, encode_pairs, read_pairs
from train.tasks import DataError, load_encoder
from train_util import word_level_tokenizer

LEXICON = {"red": "rot", "green": "gruen", "blue": "blau", "cat": "katze", "dog": "hund", "one": "eins",
           "two": "zwei", "three": "drei"}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
SEQ = 10


def _write_parallel(src: Path, tgt: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = [[rng.choice(list(LEXICON)) for _ in range(rng.randint(2, 5))] for _ in range(n)]
    src.write_text("".join(" ".join(r) + "\n" for r in rows))
    tgt.write_text("".join(" ".join(LEXICON[w] for w in r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("bart")
    words = list(LEXICON) + list(LEXICON.values())
    tok = word_level_tokenizer(SPECIALS, words, "<s> $A </s>", [("<s>", 0), ("</s>", 2)])
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=len(SPECIALS) + len(words), d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None)
    transformers.BartForConditionalGeneration(cfg).save_pretrained(out)
    _write_parallel(out / "train.en", out / "train.de", 400, 0)
    _write_parallel(out / "dev.en", out / "dev.de", 32, 1)
    return out


def test_seq2seq_trains_scores_what_it_generates_and_exports(bart_dir, tmp_path):
    """30 steps on a data=2 mesh: the held-out loss falls, and the evaluation's BLEU and chrF
    are sacreBLEU's on the texts of zoo.generate: transformers' greedy generate from the
    exported step-30 checkpoint, decoded by its tokenizer, scores exactly the same."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    run_dir = tmp_path / "run"
    argv = ["--from", str(bart_dir), "--task", "seq2seq", "--data", str(bart_dir / "train.en"),
            str(bart_dir / "train.de"), "--eval-data", str(bart_dir / "dev.en"), str(bart_dir / "dev.de"),
            "--run-dir", str(run_dir), "--batch-size", "16", "--seq-len", str(SEQ), "--lr", "5e-3",
            "--steps", "30", "--eval-every", "30", "--mesh", "data=2"]
    assert finetune.main(argv) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_bleu" in r]
    assert [r["step"] for r in evals] == [30] and evals[-1]["eval_loss"] < 0.75 * rows[0]["loss"]
    best = json.loads((run_dir / "run.json").read_text())["best"]
    assert best["metric"] == "eval_bleu" and best["eval_bleu"] == max(r["eval_bleu"] for r in evals)

    out = tmp_path / "hf"
    assert export.export_main(["--run", str(run_dir), "--out", str(out), "--step", "30"]) == 0
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    dev = read_pairs([bart_dir / "dev.en", bart_dir / "dev.de"])
    src = encode_pairs(load_encoder(run_dir / "tokenizer"), dev, SEQ)
    with torch.no_grad():
        ids = model.generate(torch.tensor(src["tokens"]), attention_mask=torch.tensor(src["mask"]),
                             max_new_tokens=SEQ, do_sample=False, num_beams=1)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    assert bleu_chrf(texts, dev.targets) == {k: evals[-1][k] for k in ("eval_bleu", "eval_chrf")}


def test_pairs_read_from_parallel_files_tsv_and_jsonl(bart_dir, tmp_path):
    (tmp_path / "p.tsv").write_text("source\ttarget\nred cat\trot katze\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"source": "red cat", "target": "rot katze"}) + "\n")
    (tmp_path / "a.en").write_text("red cat\n")
    (tmp_path / "a.de").write_text("rot katze\n")
    for paths in ([tmp_path / "p.tsv"], [tmp_path / "p.jsonl"], [tmp_path / "a.en", tmp_path / "a.de"]):
        p = read_pairs(paths)
        assert (p.sources, p.targets) == (["red cat"], ["rot katze"])
    rows = encode_pairs(load_encoder(bart_dir), p, 6)
    assert list(rows["tokens"][0]) == [0, 4, 7, 2, 1, 1] and list(rows["target"][0]) == [0, 12, 15, 2, 1, 1]


def test_bleu_and_chrf_are_sacrebleus():
    m = bleu_chrf(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert m == pytest.approx({"eval_bleu": 100.0, "eval_chrf": 100.0})
    assert bleu_chrf(["a b"], ["c d"])["eval_bleu"] == 0.0


@pytest.mark.parametrize("files, message", [
    ({"a.en": "red\nblue\n", "a.de": "rot\n"}, "a.en has 2 lines and .*a.de 1: expected parallel files"),
    ({"a.en": "red\n\n", "a.de": "rot\nblau\n"}, "a.en line 2: empty, while the other file's line 2 is not"),
    ({"p.tsv": "red\trot\tx\n"}, "p.tsv line 1: expected 2 tab-separated columns"),
])
def test_bad_pairs_name_the_file_and_line(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_pairs([tmp_path / n for n in files])


def test_seq2seq_on_a_decoder_is_refused_before_writing(tmp_path, capsys):
    (tmp_path / "p.tsv").write_text("a\tb\n")
    vocab = tmp_path / "tok"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b"]) + "\n")
    run_dir = tmp_path / "run"
    argv = ["--model", "tiny-decoder", "--tokenizer", str(vocab), "--task", "seq2seq", "--data",
            str(tmp_path / "p.tsv"), "--run-dir", str(run_dir), "--mesh", "data=1", "--seq-len", "8"]
    assert finetune.main(argv) == 2
    assert "--task seq2seq trains encoder-decoders (source -> target); this is an decoder model" in \
        capsys.readouterr().err
    assert not run_dir.exists()


def test_label_smoothing_is_for_the_vocabulary_not_for_task_heads():
    base = ["--tokenizer", "x", "--data", "d", "--label-smoothing", "0.1"]
    assert finetune.resolve(["--model", "tiny-encdec", "--task", "seq2seq", *base]).hparams.label_smoothing == 0.1
    with pytest.raises(ValueError, match="--label-smoothing: smooths the vocabulary cross entropy .* --task "
                                         "classify trains a head"):
        finetune.resolve(["--model", "tiny-encoder", "--task", "classify", *base])


def test_the_multi30k_bench_runs_a_command_finetune_accepts(tmp_path):
    """bench.multi30k's `python -m train finetune` arguments resolve as meant: its KEY=VALUE
    pairs reach the model and optimizer, the whole test set is the eval data."""
    from bench import multi30k

    a = multi30k.parser().parse_args(["--evals", "4"])
    fc = finetune.resolve(multi30k.finetune_argv(a, tmp_path / "spm.model", tmp_path / "run", 720))
    assert (fc.task, fc.model, fc.hparams.total_steps, fc.eval_interval) == ("seq2seq", "t5-small", 720, 180)
    assert fc.hparams.label_smoothing == a.smoothing and fc.hparams.b2 == a.b2 and fc.overrides["d_model"] == 256
    assert fc.overrides["attn_scale"] == (256 // 4) ** -0.5  # scaled logits: T5's 1.0 trains poorly under AdamW
    assert [Path(f).name for f in fc.eval_data] == ["test_2016_flickr.en", "test_2016_flickr.de"]
    # a run resumed with more steps restarts its clock: its rows follow the ones before
    rows = [{"step": 25, "time_s": 50.0}, {"step": 50, "time_s": 100.0}, {"step": 75, "time_s": 30.0},
            {"step": 100, "time_s": 80.0}]
    assert [r["time_s"] for r in multi30k.one_clock(rows)] == [50.0, 100.0, 180.0, 230.0]


def test_a_sentencepiece_file_of_any_name_is_kept_so_the_run_dir_loads_it(tmp_path):
    """--model PRESET --tokenizer my.model: the run's tokenizer/ (and so --from RUN_DIR and
    export) finds the model under a name load_encoder reads, whatever the file was called."""
    import os
    import shutil

    src = tmp_path / "my_spm.model"
    shutil.copyfile(Path(os.environ["ZOO_DATA_DIR"]) / "spm" / "botchan_en_unigram_1000.model", src)
    enc = load_encoder(src)
    enc.save(tmp_path / "tokenizer")
    again = load_encoder(tmp_path / "tokenizer")
    assert again.vocab_size == enc.vocab_size and again.encode_text("I am a cat.")[0] == enc.encode_text("I am a cat.")[0]
