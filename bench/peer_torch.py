"""The transformers + PyTorch peer (`--vs hf`): the same architecture and shapes as zoo's
row, timed the same way (median after warm-up): on the CPU threads the machine has, or on
the GPU when JAX runs on one (bf16 through autocast over fp32 master weights, as zoo's
mixed precision; SDPA attention; fused AdamW)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import zoo


def _median(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    import torch
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def _is_llama(cfg: zoo.Config) -> bool:
    return cfg.family == "decoder" and cfg.positions == "rope" and cfg.norm == "rmsnorm"


def hf_config(cfg: zoo.Config, max_len: int):
    """The transformers config of the bench's zoo shapes (GPT-2, BERT or T5 layout)."""
    import transformers as tf
    if _is_llama(cfg):
        return tf.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                              intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
                              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
                              head_dim=cfg.head_size, max_position_embeddings=max_len,
                              rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                              tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0,
                              eos_token_id=1, pad_token_id=0)
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
    import jax
    import torch
    import transformers as tf

    device = torch.device("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    max_len = max(1024, args.seq_len + args.new_tokens + 1)
    config = hf_config(cfg, max_len)
    library = f"transformers {tf.__version__}, torch {torch.__version__}, {device.type}"
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    weights = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.param_dtype]
    decoder_cls = tf.LlamaForCausalLM if _is_llama(cfg) else tf.GPT2LMHeadModel

    def build(cls):
        with torch.device(device):  # initialised where it runs: a 1B model in seconds on a GPU
            return cls(config).to(weights)

    out: dict[str, Any] = {"library": library}
    if bench == "encode":
        model = build(tf.BertModel).eval()
        ids = torch.randint(3, cfg.vocab_size, (args.batch_size, args.seq_len), device=device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            seconds = _median(lambda: model(input_ids=ids, attention_mask=mask), args.iters)
        out.update(tokens_per_s=args.batch_size * args.seq_len / seconds, step_s=seconds)
    elif bench == "decode":
        model = build(decoder_cls if cfg.family == "decoder" else tf.T5ForConditionalGeneration).eval()
        ids = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), device=device)
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
        with torch.inference_mode():
            seconds = _median(lambda: model.generate(ids, **kw), args.iters, warmup=1)
        out.update(tokens_per_s=args.new_tokens / seconds, step_s=seconds / args.new_tokens)
    else:
        model = build({"decoder": decoder_cls, "encoder": tf.BertForMaskedLM,
                       "encdec": tf.T5ForConditionalGeneration}[cfg.family]).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                fused=device.type == "cuda")
        ids = torch.randint(3, cfg.vocab_size, (args.batch_size, args.seq_len), device=device)
        kw = {"input_ids": ids, "labels": ids}
        if cfg.family == "encdec":
            kw["decoder_input_ids"] = ids
        mixed = compute != weights

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=compute, enabled=mixed):
                loss = model(**kw).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        seconds = _median(step, args.iters)
        out.update(tokens_per_s=args.batch_size * args.seq_len / seconds, step_s=seconds)
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def release() -> None:
    """Hands the GPU memory PyTorch cached back to the driver, once the peer's objects are
    gone, so that JAX can allocate its pool after it."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
