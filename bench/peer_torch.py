"""The transformers + PyTorch peer (`--vs hf`): the same architecture and shapes as zoo's
row, on the CPU threads the machine has, timed the same way (median after warm-up)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import zoo


def _median(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def hf_config(cfg: zoo.Config, max_len: int):
    """The transformers config of the bench's zoo shapes (GPT-2, BERT or T5 layout)."""
    import transformers as tf
    if cfg.family == "decoder":
        return tf.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
                             n_head=cfg.num_heads, n_inner=cfg.d_ff, n_positions=max_len,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if cfg.family == "encoder":
        return tf.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                             intermediate_size=cfg.d_ff, max_position_embeddings=max_len,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_size,
                       d_ff=cfg.d_ff, num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers,
                       num_heads=cfg.num_heads, dropout_rate=0.0, feed_forward_proj="relu",
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def run(bench: str, cfg: zoo.Config, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers as tf

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    max_len = max(1024, args.seq_len + args.new_tokens + 1)
    config = hf_config(cfg, max_len)
    if bench == "encode":
        model = tf.BertModel(config).eval()
        ids = torch.randint(3, cfg.vocab_size, (args.batch_size, args.seq_len))
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            seconds = _median(lambda: model(input_ids=ids, attention_mask=mask), args.iters)
        return {"tokens_per_s": args.batch_size * args.seq_len / seconds, "step_s": seconds,
                "library": f"transformers {tf.__version__}, torch {torch.__version__}"}
    if bench == "decode":
        model = tf.GPT2LMHeadModel(config).eval() if cfg.family == "decoder" else \
            tf.T5ForConditionalGeneration(config).eval()
        ids = torch.randint(3, cfg.vocab_size, (1, args.prompt_len))
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
        with torch.inference_mode():
            seconds = _median(lambda: model.generate(ids, **kw), args.iters, warmup=1)
        return {"tokens_per_s": args.new_tokens / seconds, "step_s": seconds / args.new_tokens,
                "library": f"transformers {tf.__version__}, torch {torch.__version__}"}
    model = {"decoder": tf.GPT2LMHeadModel, "encoder": tf.BertForMaskedLM,
             "encdec": tf.T5ForConditionalGeneration}[cfg.family](config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    ids = torch.randint(3, cfg.vocab_size, (args.batch_size, args.seq_len))
    kw = {"input_ids": ids, "labels": ids}
    if cfg.family == "encdec":
        kw["decoder_input_ids"] = ids

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(**kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    seconds = _median(step, args.iters)
    return {"tokens_per_s": args.batch_size * args.seq_len / seconds, "step_s": seconds,
            "library": f"transformers {tf.__version__}, torch {torch.__version__}"}
