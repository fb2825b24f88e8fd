"""Supervised fine-tuning data (`python -m train finetune --task sft`): JSONL conversations or
prompt/completion pairs -> token rows with a loss mask on what the model should write.

A line is either `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered with the
checkpoint's chat template (`chat_template` of tokenizer_config.json, a Jinja template, run
as transformers runs it: trimmed blocks, `bos_token`/`eos_token`, `add_generation_prompt`),
or `{"prompt": ..., "completion": ...}`: the prompt with the tokenizer's own special tokens
(a BOS where its post-processor adds one), then the completion and the end-of-sequence id.

The loss covers each assistant turn and what the template writes after it up to the next
turn (the end-of-turn token: the model learns to stop), and the completion with its EOS;
everything else (system, user turns, the generation prompt, the prompt) has weight 0. The
span of assistant turn i is the text between rendering the first i messages with the
generation prompt and rendering the first i + 1: a template for which these renderings are
not prefixes of the whole conversation is refused.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from train.tasks import DataError, TextEncoder, data_file, json_line


@dataclasses.dataclass(frozen=True)
class Dialogues:
    """Each line's conversation (a list of messages) or (prompt, completion) pair."""

    path: str
    items: list[Any]  # list[dict] messages, or a (prompt, completion) tuple
    lines: list[int]

    def __len__(self) -> int:
        return len(self.items)


def read_dialogues(path: str | Path) -> Dialogues:
    """The examples of an SFT JSONL file (see the module docstring)."""
    path = data_file(path)
    items, lines = [], []
    for n, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        obj = json_line(raw, path, n)
        items.append(_item(obj, f"{path} line {n}"))
        lines.append(n)
    if not items:
        raise DataError(f"{path}: the file has no examples")
    return Dialogues(str(path), items, lines)


def _item(obj: Any, where: str) -> Any:
    if isinstance(obj, dict) and "messages" in obj:
        messages = obj["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not ok:
            raise DataError(f"{where}: expected 'messages' as a list of {{\"role\": str, \"content\": str}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant message, so nothing to train on")
        return messages
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return (obj["prompt"], obj["completion"])
    got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"{where}: expected a JSON object with 'messages' or with 'prompt' and 'completion', got {got}")


# --- chat templates ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A checkpoint's chat template and the special tokens it names (tokenizer_config.json)."""

    template: str | None
    bos_token: str | None
    eos_token: str | None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as transformers' `apply_chat_template(tokenize=False)`."""
        if self.template is None:
            raise DataError("a 'messages' example needs the checkpoint's chat_template (tokenizer_config.json "
                            "has none); use 'prompt'/'completion' lines instead")
        return _compile(self.template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                              bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def chat_format(source: Path) -> ChatFormat:
    """The chat template and special tokens of a tokenizer directory (None where absent)."""
    f = source / "tokenizer_config.json" if source.is_dir() else None
    cfg = json.loads(f.read_text()) if f is not None and f.is_file() else {}
    template = cfg.get("chat_template")
    if template is None and source.is_dir() and (source / "chat_template.jinja").is_file():
        template = (source / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    token = lambda v: v.get("content") if isinstance(v, dict) else v
    return ChatFormat(template, token(cfg.get("bos_token")), token(cfg.get("eos_token")))


def _compile(template: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise DataError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# --- token rows --------------------------------------------------------------------------------

def encode_dialogues(enc: TextEncoder, fmt: ChatFormat, data: Dialogues, seq_len: int,
                     eos_id: int | None) -> dict[str, np.ndarray]:
    """{"tokens", "mask", "loss_mask"}: int32 / bool / bool [N, seq_len], padded right and cut
    at seq_len; loss_mask marks the tokens the model is trained to write."""
    n = len(data)
    out = {"tokens": np.full((n, seq_len), enc.pad_id, np.int32), "mask": np.zeros((n, seq_len), bool),
           "loss_mask": np.zeros((n, seq_len), bool)}
    for i, (item, line) in enumerate(zip(data.items, data.lines)):
        where = f"{data.path} line {line}"
        ids, train = (_conversation(enc, fmt, item, where) if isinstance(item, list)
                      else _completion(enc, item, eos_id, where))
        k = min(len(ids), seq_len)
        out["tokens"][i, :k], out["mask"][i, :k], out["loss_mask"][i, :k] = ids[:k], True, train[:k]
    return out


def _conversation(enc: TextEncoder, fmt: ChatFormat, messages: list[dict], where: str) -> tuple[list, list]:
    text = fmt.render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = fmt.render(messages[:i], add_generation_prompt=True), fmt.render(messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(f"{where}: the chat template does not render the conversation's turns as prefixes of "
                            f"the whole, so the assistant's tokens cannot be found")
        spans.append((len(before), len(upto)))
    ids, offsets = enc.encode_text(text)
    if offsets is None:
        raise DataError(f"{where}: 'messages' need a tokenizer.json tokenizer (character offsets find the "
                        f"assistant's tokens); this checkpoint's is SentencePiece: use 'prompt'/'completion'")
    train = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    return ids, train


def _completion(enc: TextEncoder, pair: tuple[str, str], eos_id: int | None, where: str) -> tuple[list, list]:
    if eos_id is None:
        raise DataError(f"{where}: a completion ends with the end-of-sequence token, and neither the model "
                        f"config nor the tokenizer names one")
    prompt_ids = enc.encode_text(pair[0], special_tokens=True)[0]
    if prompt_ids and prompt_ids[-1] == eos_id:  # a post-processor that closes the text: the completion continues it
        prompt_ids = prompt_ids[:-1]
    completion = enc.encode_text(pair[1])[0] + [eos_id]
    return prompt_ids + completion, [False] * len(prompt_ids) + [True] * len(completion)
