"""`python -m train finetune --task sft` (train/chat.py): a tiny Llama built from a config in a
tmp dir with a word-level tokenizer.json and a chat template; conversations rendered as
transformers renders them, the loss only on what the assistant writes, a short run whose
best state is the lowest eval loss, exported for AutoModelForCausalLM."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from train import export, finetune
from train.chat import chat_format, encode_dialogues, read_dialogues
from train.tasks import DataError, load_encoder
from train_util import word_level_tokenizer

WORDS = ["red", "green", "blue", "one", "two", "three", "cat", "dog", "say", "what", "is", "it"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
SEQ = 24


def _chat(rng: random.Random) -> dict:
    """The user names three words; the assistant repeats the last one twice."""
    said = [rng.choice(WORDS[:8]) for _ in range(3)]
    return {"messages": [{"role": "system", "content": "say it"}, {"role": "user", "content": " ".join(said)},
                         {"role": "assistant", "content": f"{said[-1]} {said[-1]}"}]}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("llama")
    tok = word_level_tokenizer(SPECIALS, WORDS, "<s> $A", [("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    rng = random.Random(0)
    for name, n in (("train.jsonl", 320), ("dev.jsonl", 32)):
        (out / name).write_text("".join(json.dumps(_chat(rng)) + "\n" for _ in range(n)))
    return out


def test_conversations_render_as_transformers_and_only_the_assistant_is_trained(llama_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(llama_dir)
    data = read_dialogues(llama_dir / "dev.jsonl")
    enc = load_encoder(llama_dir)
    rows = encode_dialogues(enc, chat_format(llama_dir), data, 40, eos_id=2)
    for i in range(3):
        want = hf.apply_chat_template(data.items[i], tokenize=True, return_dict=False)
        got = rows["tokens"][i][rows["mask"][i]]
        assert list(got) == list(want)
        trained = hf.convert_ids_to_tokens(got[rows["loss_mask"][i][rows["mask"][i]]].tolist())
        assert trained == [*data.items[i][2]["content"].split(), "<|end|>"]
    # prompt/completion: the prompt with the tokenizer's BOS, the completion and EOS trained
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "what is it", "completion": "red dog"}) + "\n")
    rows = encode_dialogues(enc, chat_format(llama_dir), read_dialogues(tmp_path / "pc.jsonl"), 8, eos_id=2)
    assert hf.convert_ids_to_tokens(rows["tokens"][0][:7].tolist()) == ["<s>", "what", "is", "it", "red", "dog", "</s>"]
    assert list(rows["loss_mask"][0]) == [False] * 4 + [True] * 3 + [False]


def test_the_sft_objective_weighs_only_the_next_tokens_to_write():
    from train.objectives import sft

    rows = {"tokens": np.array([[1, 5, 6, 7, 8, 0]]), "mask": np.array([[1, 1, 1, 1, 1, 0]], bool),
            "loss_mask": np.array([[0, 0, 0, 1, 1, 0]], bool), "weights": np.array([1.0])}
    batch = sft(None, rows)
    np.testing.assert_array_equal(batch["targets"], [[5, 6, 7, 8, 0, 0]])
    np.testing.assert_array_equal(batch["weights"], [[0, 0, 1, 1, 0, 0]])  # positions that predict 7 and 8


def test_sft_learns_keeps_the_lowest_eval_loss_and_exports(llama_dir, tmp_path):
    """30 steps on a data=2,tensor=2 mesh: the held-out loss over the assistant's tokens falls
    (well below uniform guessing: the end-of-turn token and the repeated word are learnt)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    argv = ["--from", str(llama_dir), "--task", "sft", "--data", str(llama_dir / "train.jsonl"), "--eval-data",
            str(llama_dir / "dev.jsonl"), "--run-dir", str(run_dir), "--batch-size", "16", "--seq-len", str(SEQ),
            "--lr", "1e-2", "--steps", "30", "--eval-every", "15", "--mesh", "data=2,tensor=2"]
    assert finetune.main(argv) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    uniform = np.log(len(SPECIALS) + len(WORDS))
    assert evals[-1]["eval_loss"] < min(evals[0]["eval_loss"], 0.6 * uniform), evals
    best = json.loads((run_dir / "run.json").read_text())["best"]
    assert best["metric"] == "eval_loss" and best["eval_loss"] == min(r["eval_loss"] for r in evals)

    out = tmp_path / "hf"
    assert export.export_main(["--run", str(run_dir), "--out", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.array([[1, 6, 9, 10, 11, 7]])
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    state = export.restore_run(run_dir)
    import zoo

    got = np.asarray(zoo.decoder.forward(state.params, state.cfg, ids).logits)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "user", "content": "red"}]}, "line 1: the conversation has no assistant message"),
    ({"text": "red"}, "line 1: expected a JSON object with 'messages' or with 'prompt' and 'completion'"),
    ({"messages": [{"role": "user"}]}, "line 1: expected 'messages' as a list of"),
])
def test_bad_sft_lines_name_the_line(tmp_path, line, message):
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        read_dialogues(tmp_path / "d.jsonl")


def test_sft_on_an_encoder_is_refused_before_writing(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    vocab = tmp_path / "tok"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b"]) + "\n")
    run_dir = tmp_path / "run"
    argv = ["--model", "tiny-encoder", "--tokenizer", str(vocab), "--task", "sft", "--data", str(tmp_path / "d.jsonl"),
            "--run-dir", str(run_dir), "--mesh", "data=1", "--seq-len", "16"]
    assert finetune.main(argv) == 2
    assert "--task sft trains decoders" in capsys.readouterr().err
    assert not run_dir.exists()
