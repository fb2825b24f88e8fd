"""zoo's side of the benchmarks: the training step, batch-1 decoding and encoder inference,
each returning one result row (a dict)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from bench import flops, timing
from zoo.decoding import unstacked
from zoo.nn.param import Param
from train.optim import Hparams
from train.step import batch_shardings, create_state, jit_step


def synthetic_batch(cfg: zoo.Config, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token rows shaped like the training pipeline's output for the family:
    one document per row (segment id 1), every position trained."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    ones = np.ones((batch, seq_len), np.int32)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
    out = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": ones.astype(np.float32)}
    if cfg.family == "encdec":
        out["decoder_inputs"] = toks[:, :-1].copy()
    else:
        out.update(segment_ids=ones, positions=pos)
    return out


def train_runner(cfg: zoo.Config, batch: int, seq_len: int, remat: str = "none",
                 loss_chunk: int = 0) -> tuple[Callable[[], Any], Any, float]:
    """(one step: advances the state and returns the loss, the compiled step, compile
    seconds) of `train.step` on one device: AdamW, jitted with shardings, donated state."""
    mesh = zoo.sharding.make_mesh({"data": 1}, jax.devices()[:1])
    hp = Hparams(total_steps=1000, warmup_steps=10, remat=remat, loss_chunk=loss_chunk)
    state = create_state(cfg, hp, 0, mesh)
    host = synthetic_batch(cfg, batch, seq_len)
    bsh = batch_shardings(host, mesh)
    data = jax.device_put(host, bsh)
    ssh = jax.tree.map(lambda x: x.sharding, state)
    with zoo.sharding.use(mesh):
        compiled, compile_s = timing.compile_seconds(jit_step(ssh, bsh, mesh), state, data)
    holder = {"state": state}

    def one() -> Any:
        holder["state"], metrics = compiled(holder["state"], data)
        return metrics["loss"]

    return one, compiled, compile_s


def train_row(cfg: zoo.Config, batch: int, seq_len: int, peak: float, iters: int = 5,
              remat: str = "none", loss_chunk: int = 0) -> dict[str, Any]:
    """Median step time of `train.step` (`train_runner`)."""
    one, compiled, compile_s = train_runner(cfg, batch, seq_len, remat, loss_chunk)
    seconds = timing.median_time(one, iters=iters, warmup=2)
    tokens = batch * seq_len
    achieved = flops.train_flops_per_token(cfg, seq_len) * tokens / seconds
    return {"bench": "train", "family": cfg.family, "dtype": cfg.dtype, "batch": batch,
            "seq_len": seq_len, "params": zoo.param_count(cfg), "step_s": seconds,
            "tokens_per_s": tokens / seconds, "tflops": achieved / 1e12, "mfu": achieved / peak,
            "compile_s": compile_s, "peak_bytes": timing.memory_bytes(compiled),
            "program_bytes": timing.program_bytes(compiled), "remat": remat, "loss_chunk": loss_chunk}


@dataclasses.dataclass
class DecodeRunner:
    """A compiled `zoo.generate` call and what its row reports (`decode_runner`)."""
    cfg: zoo.Config
    run: Callable[[], Any]
    stacked: dict
    params: dict
    prompt: jax.Array
    batch: int
    prompt_len: int
    new_tokens: int
    compile_s: float


def decode_runner(cfg: zoo.Config, prompt_len: int, new_tokens: int, batch: int = 1,
                  transform: Callable[[dict], dict] | None = None) -> DecodeRunner:
    """Greedy decoding of `batch` random prompts through `zoo.generate`, compiled (the first
    call). The parameters are unstacked once, as a server would (`zoo.decoding.unstacked`).
    No stop tokens: every call makes all new_tokens (the peers set min_new_tokens),
    whatever the weights. transform: e.g. zoo.quantize, on the tree init gives."""
    stacked = zoo.init(cfg, jax.random.key(0))
    if transform is not None:
        stacked = transform(stacked)
    params = timing.block(unstacked(stacked))
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    run = lambda: zoo.generate(params, cfg, prompt, max_new_tokens=new_tokens, stop_tokens=())
    compile_start = timing.time.perf_counter()
    timing.block(run())
    compile_s = timing.time.perf_counter() - compile_start
    return DecodeRunner(cfg, run, stacked, params, prompt, batch, prompt_len, new_tokens, compile_s)


def decode_result(runner: DecodeRunner, seconds: float, bandwidth: float) -> dict[str, Any]:
    """The row of a runner whose call took `seconds`. tokens_per_s counts every row's
    tokens, row_tokens_per_s one row's. Bound: each step reads the weights it uses once for
    the whole batch and each row's KV cache (`step_read_bytes`), so batch * bandwidth /
    those bytes; param_bytes is the whole tree."""
    cfg, batch, new_tokens = runner.cfg, runner.batch, runner.new_tokens
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.params))
    weight_bytes, kv_bytes = step_read_bytes(cfg, runner.stacked, runner.prompt_len, new_tokens)
    bound = batch * bandwidth / (weight_bytes + batch * kv_bytes)
    total = batch * new_tokens / seconds
    return {"bench": "decode", "family": cfg.family, "dtype": cfg.param_dtype, "batch": batch,
            "prompt_len": runner.prompt_len, "new_tokens": new_tokens, "step_s": seconds / new_tokens,
            "tokens_per_s": total, "row_tokens_per_s": new_tokens / seconds, "bound_tokens_per_s": bound,
            "of_bound": total / bound, "mfu": None, "compile_s": runner.compile_s,
            "param_bytes": param_bytes, "weight_read_bytes": weight_bytes, "kv_read_bytes": kv_bytes}


def decode_row(cfg: zoo.Config, prompt_len: int, new_tokens: int, bandwidth: float,
               iters: int = 5, batch: int = 1,
               transform: Callable[[dict], dict] | None = None) -> dict[str, Any]:
    """`decode_runner`'s call timed (median of `iters`) -> `decode_result`'s row; the
    batch-1 row also reports the rate when each call unstacks a stacked tree itself."""
    runner = decode_runner(cfg, prompt_len, new_tokens, batch, transform)
    seconds = timing.median_time(runner.run, iters=iters, warmup=1)
    stacked_rate = None
    if batch == 1:
        run_stacked = lambda: zoo.generate(runner.stacked, cfg, runner.prompt, max_new_tokens=new_tokens, stop_tokens=())
        stacked_rate = new_tokens / timing.median_time(run_stacked, iters=iters, warmup=1)
    return {**decode_result(runner, seconds, bandwidth), "stacked_tokens_per_s": stacked_rate}


ONE_ROW = ("vocab", "types", "length")  # tables a token gathers one row of (a tied token table excepted)


def step_read_bytes(cfg: zoo.Config, params: dict, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(weight bytes one decoding step reads for the whole batch, KV-cache bytes it reads per
    row). params: the tree `zoo.init` gives (zoo.quantize's too). Weights: every tensor the
    step multiplies by, the norms and biases, one row of each gathered table (an untied token
    embedding, learned positions, token types; a tied token table is the head, read whole);
    not an encoder-decoder's encoder or cross-attention key/value projections, which run once
    on the prompt. KV: the self-attention cache at the mean context, prompt_len + new_tokens
    / 2 (`zoo.nn.cache.nbytes`; local layers capped at their window), plus for encdec the
    cross-attention keys and values of the prompt."""
    tables = {tuple(k.key for k in path): p for path, p in
              jax.tree_util.tree_leaves_with_path(zoo.model.spec(cfg), is_leaf=lambda x: isinstance(x, Param))}
    weights = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        if names[0] in ("mlm", "pooler") or (cfg.family == "encdec" and (
                names[0] == "encoder" or ("cross" in names and names[-1] in ("k", "v")))):
            continue
        weights += leaf.nbytes * _share_read(tables.get(names), names, cfg)
    cache = lambda n: zoo.nn.cache.nbytes(jax.eval_shape(lambda: zoo.init_cache(cfg, 1, n)))
    kv = cache(prompt_len + new_tokens // 2)
    if cfg.family == "encdec":  # cross keys/values: a cache of the prompt's length, every decoder layer
        kv += cache(prompt_len)
    return int(weights), kv


def _share_read(p: Param | None, names: tuple[str, ...], cfg: zoo.Config) -> float:
    """The share of the tensor at `names` (its spec `p`) one step reads: 1 / rows of a
    gathered table, else 1."""
    axes = [a for a in (p.axes if p else ()) if a != "layers"]
    tied_head = names == ("embed", "tokens") and cfg.tie_embeddings
    if len(axes) < 2 or axes[0] not in ONE_ROW or tied_head:
        return 1.0
    return 1.0 / p.shape[p.axes.index(axes[0])]


def encode_inputs(cfg: zoo.Config, batch: int, seq_len: int, padding: float = 0.0, packed: bool = False,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Encoder inputs of `batch` documents of random lengths averaging (1 - padding) * seq_len
    exactly (pairs of lengths mean +- d): one per row, right-padded (tokens, mask: [batch,
    seq_len]); or packed: the same documents first-fit into as few rows of seq_len as hold
    them, with segment_ids and positions restarting per document, so no row spends work on
    the padding the first layout carries."""
    rng = np.random.default_rng(seed)
    mean = round((1.0 - padding) * seq_len)
    d = rng.integers(0, min(mean - 1, seq_len - mean) + 1, batch // 2)
    lengths = rng.permutation(np.concatenate([mean + d, mean - d, [mean] * (batch % 2)])).astype(int)
    docs = [rng.integers(3, cfg.vocab_size, n).astype(np.int32) for n in lengths]
    bins: list[list[np.ndarray]] = []
    for doc in (sorted(docs, key=len, reverse=True) if packed else docs):
        fits = [b for b in bins if packed and sum(map(len, b)) + len(doc) <= seq_len]
        if fits:
            fits[0].append(doc)
        else:
            bins.append([doc])
    out = {k: np.zeros((len(bins), seq_len), np.int32) for k in ("tokens", "segment_ids", "positions")}
    for r, row in enumerate(bins):
        start = 0
        for s, doc in enumerate(row):
            out["tokens"][r, start:start + len(doc)] = doc
            out["segment_ids"][r, start:start + len(doc)] = s + 1
            out["positions"][r, start:start + len(doc)] = np.arange(len(doc))
            start += len(doc)
    out["mask"] = out["segment_ids"] > 0
    if not packed:
        del out["segment_ids"], out["positions"]
    return out


def encode_runner(cfg: zoo.Config, batch: int, seq_len: int, padding: float = 0.0,
                  packed: bool = False) -> tuple[Callable[[], Any], Any, float, dict[str, np.ndarray]]:
    """(one call: hidden states [rows, seq_len, D] of jitted `zoo.encoder.forward` on
    `encode_inputs`, the compiled program, compile seconds, the inputs)."""
    params = zoo.init(cfg, jax.random.key(0))
    inputs = encode_inputs(cfg, batch, seq_len, padding, packed)
    args = {k: jnp.asarray(v) for k, v in inputs.items()}
    f = jax.jit(lambda p, a: zoo.encoder.forward(p, cfg, a["tokens"], mask=a["mask"],
                                                 segment_ids=a.get("segment_ids"),
                                                 positions=a.get("positions")).hidden)
    compiled, compile_s = timing.compile_seconds(f, params, args)
    return (lambda: compiled(params, args)), compiled, compile_s, inputs


def encode_row(cfg: zoo.Config, batch: int, seq_len: int, peak: float, iters: int = 5,
               padding: float = 0.0, packed: bool = False) -> dict[str, Any]:
    """Encoder inference: the hidden states of jitted `zoo.encoder.forward` (no MLM head).
    tokens_per_s and mfu count real tokens only (`encode_inputs`: padding, packed)."""
    one, compiled, compile_s, inputs = encode_runner(cfg, batch, seq_len, padding, packed)
    seconds = timing.median_time(one, iters=iters, warmup=2)
    tokens = int(inputs["mask"].sum())
    # hidden states only: no vocabulary projection, MLM transform or pooler
    achieved = flops.forward_flops_per_token(cfg, seq_len, heads=False) * tokens / seconds
    return {"bench": "encode", "family": cfg.family, "dtype": cfg.dtype, "batch": batch,
            "seq_len": seq_len, "padding": padding, "layout": "packed" if packed else "padded",
            "rows": len(inputs["mask"]), "step_s": seconds, "tokens_per_s": tokens / seconds,
            "mfu": achieved / peak, "compile_s": compile_s, "peak_bytes": timing.memory_bytes(compiled)}
