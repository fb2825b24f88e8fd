"""The transformers + PyTorch peer (`--vs hf`), run by `bench.peers` in a fresh process of
its own (`python -m bench.peer_torch JOB`; it imports neither JAX nor zoo, so no thread pool
or backend is shared with zoo's run): the architecture transformers has for zoo's config
(`zoo.hf`, the class `save_hf` would write), the same shapes, timed the same way (median
after warm-up). On the CPU threads the machine has, or on the GPU when there is one (bf16
through autocast over fp32 master weights, as zoo's mixed precision; SDPA attention).

Two variants (`job["compiled"]`):
- compiled, the main row: training through `torch.compile(model)` with fused AdamW (where
  the device has it); decoding with transformers' static cache and its compiled forward
  (`cache_implementation="static"`); encoding through `torch.compile(model)`. Compile time
  is spent in the warm-up calls, as zoo's is in its compile, and reported as first_call_s.
- eager: the model as built, AdamW fused on CUDA only, decoding with the dynamic cache.

Before timing, the worker counts the model's parameters and stops if the count is not
`job["expect_params"]` (zoo's); the driver then refuses the row."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

def _times(fn: Callable[[], Any], iters: int, warmup: int, sync: Callable[[], None]) -> tuple[float, float]:
    """(median seconds of `iters` calls after `warmup`, seconds of the first warm-up call)."""
    first = None
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        sync()
        first = first if first is not None else time.perf_counter() - start
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return statistics.median(out), first or 0.0


def build(job: dict[str, Any], device: Any) -> Any:
    """The transformers model of the job's bench and family, as zoo counts it: an untied head
    where zoo's config is untied (transformers 5 always ties T5's), no pooler when encoding."""
    import torch
    import transformers as tf

    config = tf.AutoConfig.for_model(**job["hf_config"])
    auto = {"encode": tf.AutoModel, "decode": None, "train": None}[job["bench"]] or {
        "decoder": tf.AutoModelForCausalLM, "encdec": tf.AutoModelForSeq2SeqLM,
        "encoder": tf.AutoModelForMaskedLM}[job["family"]]
    with torch.device(device):  # initialised where it runs: a 1B model in seconds on a GPU
        model = auto.from_config(config).to(getattr(torch, job["param_dtype"]))
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if job["hf_config"].get("tie_word_embeddings") is False and head is not None and head.weight is table.weight:
        head.weight = torch.nn.Parameter(table.weight.detach().clone())
    if job["bench"] == "encode" and getattr(model, "pooler", None) is not None:
        model.pooler = None  # zoo encodes hidden states only (BertModel skips a None pooler)
    return model


def param_count(model: Any) -> int:
    """Parameters, shared ones once; BART's final_logits_bias is a buffer in transformers and
    a parameter in zoo, so it counts."""
    n = sum(p.numel() for p in model.parameters())
    return n + sum(b.numel() for name, b in model.named_buffers() if name.endswith("final_logits_bias"))


def adamw(model: Any, fused: bool) -> Any:
    import torch
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=fused)


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One timed row of the job (see the module docstring); keys: tokens_per_s, step_s,
    first_call_s, params, architecture, compiled, library, device (and generated_tokens,
    optimizer, peak_bytes where they apply); or, when the parameter count differs, the
    count alone with refused=True."""
    import torch
    import transformers as tf

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    compiled = job["compiled"]
    model = build(job, device)
    out: dict[str, Any] = {"library": f"transformers {tf.__version__}, torch {torch.__version__}, {device.type}",
                           "device": device.type, "architecture": type(model).__name__,
                           "params": param_count(model), "compiled": compiled}
    if out["params"] != job["expect_params"]:
        return {**out, "refused": True}
    vocab, b, t = job["hf_config"]["vocab_size"], job["batch_size"], job["seq_len"]
    warmup = 3 if compiled else 2  # compiled: the first call compiles, the second may specialise
    if job["bench"] == "encode":
        model.eval()
        fwd = torch.compile(model) if compiled else model
        ids = torch.randint(3, vocab, (b, t), device=device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            seconds, first = _times(lambda: fwd(input_ids=ids, attention_mask=mask), job["iters"], warmup, sync)
        out.update(tokens_per_s=b * t / seconds, step_s=seconds)
    elif job["bench"] == "decode":
        model.eval()
        n = job["new_tokens"]
        ids = torch.randint(3, vocab, (1, job["prompt_len"]), device=device)
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                  pad_token_id=job["hf_config"].get("pad_token_id") or 0)
        if compiled:  # transformers compiles the step's forward for a static cache (on a CPU when asked)
            config = tf.CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
            config._compile_all_devices = device.type != "cuda"
            kw.update(cache_implementation="static", compile_config=config)
        made = {}

        def generate() -> None:
            made["ids"] = model.generate(ids, **kw)

        with torch.inference_mode():
            seconds, first = _times(generate, job["iters"], warmup - 1, sync)
        start = ids.shape[1] if job["family"] == "decoder" else 1  # encdec: after the start token
        out.update(tokens_per_s=n / seconds, step_s=seconds / n, generated_tokens=made["ids"].shape[1] - start)
    else:
        model.train()
        fused = device.type == "cuda" or compiled  # the compiled row: fused wherever torch has it
        opt = adamw(model, fused)
        out["optimizer"] = f"AdamW ({'fused' if fused else 'default'})"
        fwd = torch.compile(model) if compiled else model
        ids = torch.randint(3, vocab, (b, t), device=device)
        kw = {"input_ids": ids, "labels": ids}
        if job["family"] == "encdec":
            kw["decoder_input_ids"] = ids
        compute = getattr(torch, job["dtype"])
        mixed = job["dtype"] != job["param_dtype"]

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=compute, enabled=mixed):
                loss = fwd(**kw).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        seconds, first = _times(step, job["iters"], warmup, sync)
        out.update(tokens_per_s=b * t / seconds, step_s=seconds)
    out["first_call_s"] = first
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main(argv: list[str]) -> int:
    """`python -m bench.peer_torch JOB_JSON`: prints the row as the last line of stdout."""
    job = json.loads(argv[0])
    try:
        row = run(job)
    except RuntimeError as e:  # torch.OutOfMemoryError on a GPU: reported, zoo's row kept
        if "out of memory" not in str(e).lower():
            raise
        row = {"tokens_per_s": None, "compiled": job["compiled"], "error": f"out of memory: {str(e).splitlines()[0]}"}
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
