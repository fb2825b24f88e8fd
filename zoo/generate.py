"""`zoo.generate`: greedy, sampling, beam search and speculative decoding for the decoder and
encdec families, each a single `jax.jit` program around one `lax.while_loop`.

    tokens = zoo.generate(params, cfg, prompt, max_new_tokens=64)                    # greedy
    tokens = zoo.generate(params, cfg, prompt, 64, key=key, temperature=0.8, top_k=50,
                          top_p=0.95)                                                 # sampling
    tokens = zoo.generate(params, cfg, prompt, 64, num_beams=4)                       # beams
    tokens = zoo.generate(params, cfg, prompt, 64, draft_params=dp, draft_cfg=dc,
                          num_speculative=4)                                          # speculative
    tokens = zoo.generate(params, cfg, prompt, 64, penalty_alpha=0.6, top_k=4)        # contrastive
    tokens, lengths = zoo.generate(params, cfg, prompt, 64, return_lengths=True)      # + lengths

Every strategy but speculative takes the penalties of `zoo.logits` (repetition_penalty,
no_repeat_ngram_size, min_new_tokens); sampling also takes min_p and typical_p.

The prompt is int [B, T]; rows of different lengths come with prompt_mask (bool [B, T], True
on real tokens; any padding side). For encdec the prompt is the source (token ids, or float
features [B, num_mel_bins, frames] for a feature encoder: Whisper) and decoding starts from
cfg.decoder_start_id, or from a forced decoder_prompt [B, P] (Whisper's
<|startoftranscript|><|en|><|transcribe|><|notimestamps|>). The result is the new tokens only, int32 [B, max_new_tokens]; a
row that emits a stop token (default: cfg.eos_id) keeps it and is filled after it with
cfg.pad_id, or with cfg.eos_id when pad_id is None (as transformers does), else with the first
stop token (`filler`).
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zoo import logits as processors
from zoo import sampling, streaming
from zoo.beam_search import beam_search
from zoo.config import Config
from zoo.contrastive import contrastive
from zoo.decoding import Options, history, is_stop, new_cache, prefill, reach, step, unstacked
from zoo.nn.checks import TABLE_POSITIONS, check_mask, check_tokens
from zoo.nn.stem import check_features
from zoo.sampling import Sampler, choose
from zoo.speculative import speculative


def generate(params: dict, cfg: Config | None = None, prompt: jax.Array | None = None,
             max_new_tokens: int = 64, *,
             prompt_mask: jax.Array | None = None, key: jax.Array | None = None,
             temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             stop_tokens: Sequence[int] | None = None, draft_params: dict | None = None,
             draft_cfg: Config | None = None, num_speculative: int = 4,
             cache_len: int | None = None, cache_dtype: str | None = None,
             repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
             min_new_tokens: int | None = None, min_p: float | None = None,
             typical_p: float | None = None, penalty_alpha: float | None = None,
             sink_tokens: int | None = None, cache_window: int | None = None,
             return_lengths: bool = False,
             decoder_prompt: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """New tokens after each prompt: int32 [B, max_new_tokens].

    prompt: int [B, T] (encdec: the source; a feature encoder's float [B, num_mel_bins,
    frames], no prompt_mask); prompt_mask: bool [B, T], True on real tokens.
    decoder_prompt (encdec): int [B, P] or [P] (one for every row), the forced start of the
    decoder in place of cfg.decoder_start_id; the new tokens follow it and it is not returned.
    key: sample instead of taking the argmax, with temperature (default 1), top_k, top_p,
    min_p (keep tokens at least min_p times as probable as the best) and typical_p (locally
    typical sampling), applied in that order.
    repetition_penalty (> 0; 1: off), no_repeat_ngram_size (0: off), min_new_tokens (stop
    tokens banned before): `zoo.logits`, for greedy, sampling, beams and contrastive search.
    penalty_alpha with top_k (no key): contrastive search, scoring the top_k candidates by
    (1 - penalty_alpha) * p - penalty_alpha * (max cosine similarity to the earlier states).
    num_beams > 1: beam search (deterministic) scoring sum log p / length ** length_penalty.
    stop_tokens: ids that end a row (default: (cfg.eos_id,); () never stops early). A row
    that stopped is filled with `filler(cfg, stop_tokens)`: cfg.pad_id, else cfg.eos_id, else
    the first stop token.
    draft_params, draft_cfg: a draft model for speculative decoding, num_speculative tokens
    proposed per round (same vocabulary; greedy or sampled like the plain call).
    cache_len: slots of the KV cache (default: exactly what the call needs; a larger one
    costs memory, never correctness). cache_dtype="int8": quantized cache (per token and head
    scales), about half the memory of a bf16 cache.
    cache_window, sink_tokens: stream past the context (`zoo.streaming`, StreamingLLM): keep
    the first sink_tokens tokens and the cache_window most recent ones, positions assigned
    within the cache, so max_new_tokens is unbounded at constant memory (decoder models with
    rope, alibi, relative or no positions; not with speculative decoding or cache_len).
    return_lengths: also return how many tokens each row generated, int32 [B] (its stop
    token included): `tokens, lengths = generate(..., return_lengths=True)`.
    A `zoo.nnx.Model` may stand for (params, cfg), `generate(model, prompt, 64)`, and for
    (draft_params, draft_cfg) as draft_params.
    """
    params, cfg, prompt, max_new_tokens = _unwrap(params, cfg, prompt, max_new_tokens)
    if _is_module(draft_params):
        draft_params, draft_cfg = draft_params.params(), draft_cfg or draft_params.cfg
    if prompt is None:
        raise TypeError("prompt: missing; call generate(params, cfg, prompt, ...) or "
                        "generate(model, prompt, ...)")
    _check_model(cfg, "cfg")
    prompt = jnp.asarray(prompt) if isinstance(prompt, np.ndarray) else prompt
    if cfg.num_mel_bins is not None:
        check_features("prompt", prompt, cfg)
        if prompt_mask is not None:
            raise ValueError("prompt_mask: a feature encoder reads every frame; pass None")
    else:
        check_tokens("prompt", prompt, cfg.encoder_stack if cfg.family == "encdec" else cfg)
    check_mask("prompt_mask", prompt_mask, "prompt", prompt)
    start = _check_decoder_prompt(cfg, decoder_prompt, prompt.shape[0])
    _check_rows(prompt_mask)
    _check_positive_int("max_new_tokens", max_new_tokens)
    contrastive_k = _check_contrastive(penalty_alpha, top_k, key, num_beams, draft_params)
    if contrastive_k > cfg.vocab_size:
        raise ValueError(f"top_k: {top_k} candidates for contrastive search, beyond the vocabulary "
                         f"({cfg.vocab_size})")
    sampler = _sampler(key, temperature, None if contrastive_k else top_k, top_p, min_p, typical_p)
    stops = _stop_tokens(cfg, stop_tokens)
    penalties = processors.check(repetition_penalty, no_repeat_ngram_size, min_new_tokens, max_new_tokens)
    _check_positive_int("num_beams", num_beams)
    speculate = _check_draft(cfg, draft_params, draft_cfg, num_speculative, num_beams)
    sinks, window = _check_streaming(cfg, sink_tokens, cache_window, speculate, cache_len)
    if speculate and penalties.active:
        raise ValueError("repetition_penalty, no_repeat_ngram_size, min_new_tokens: not available "
                         "with speculative decoding (draft_params)")
    if num_beams > 1 and not sampler.greedy:
        raise ValueError("num_beams > 1 is deterministic beam search: drop key/temperature/top_k/top_p")
    if not isinstance(length_penalty, (int, float)):
        raise ValueError(f"length_penalty: expected a number, got {length_penalty!r}")
    if cache_dtype not in (None, "int8"):
        raise ValueError(f"cache_dtype: expected None (compute dtype) or 'int8', got {cache_dtype!r}")
    opts = Options(max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=stops,
                   pad_id=filler(cfg, stops), cache_len=cache_len, quantize=cache_dtype == "int8",
                   num_beams=num_beams, length_penalty=float(length_penalty),
                   num_speculative=num_speculative if speculate else 0, penalties=penalties,
                   contrastive_k=contrastive_k, penalty_alpha=float(penalty_alpha or 0.0),
                   sink_tokens=sinks, cache_window=window)
    _check_length(cfg, prompt.shape[1], opts, draft_cfg if speculate else None,
                  1 if start is None else start.shape[1])
    if key is None:
        key = jax.random.key(0)  # unused by greedy and beams; keeps one program signature
    tokens = _run(params, prompt, prompt_mask, key, draft_params if speculate else None, start,
                  cfg=cfg, draft_cfg=draft_cfg if speculate else None, opts=opts)
    return (tokens, generated_lengths(tokens, stops)) if return_lengths else tokens


def generated_lengths(tokens: jax.Array, stop_tokens: Sequence[int]) -> jax.Array:
    """tokens [B, N] as generate returns them -> int32 [B]: the tokens each row generated,
    up to and including its first stop token (N for a row that never stopped)."""
    stops = is_stop(tokens, tuple(stop_tokens))
    first = jnp.argmax(stops, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(stops, axis=1), first + 1, tokens.shape[1]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "draft_cfg", "opts"))
def _run(params: dict, prompt: jax.Array, prompt_mask: jax.Array | None, key: jax.Array,
         draft_params: dict | None, start: jax.Array | None, *, cfg: Config, draft_cfg: Config | None,
         opts: Options) -> jax.Array:
    if cfg.num_mel_bins is None:  # token ids; a feature encoder's prompt stays float
        prompt = prompt.astype(jnp.int32)
    params = unstacked(params)
    if draft_params is not None:
        draft_params = unstacked(draft_params)
    if opts.num_beams > 1:
        return beam_search(params, cfg, prompt, prompt_mask, opts, start)
    if draft_cfg is not None:
        return speculative(params, cfg, draft_params, draft_cfg, prompt, prompt_mask, key, opts, start)
    if opts.contrastive_k:
        return contrastive(params, cfg, prompt, prompt_mask, opts, start)
    return _sample(params, cfg, prompt, prompt_mask, key, opts, start)


def _sample(params: dict, cfg: Config, prompt: jax.Array, prompt_mask: jax.Array | None,
            key: jax.Array, opts: Options, start: jax.Array | None = None) -> jax.Array:
    """Greedy or sampled decoding: one token per loop step (start: an encdec decoder prompt)."""
    batch, n, s = prompt.shape[0], opts.max_new_tokens, opts.sampler
    start_len = 1 if start is None else start.shape[1]
    cache = new_cache(cfg, batch, opts.cache_len or reach(cfg, prompt.shape[1], opts, start_len), opts)
    logits, cache = prefill(params, cfg, prompt, prompt_mask, cache, start)
    seen = history(cfg, prompt, prompt_mask, start)
    out = jnp.full((batch, n), opts.pad_id, jnp.int32)
    key, first_key = jax.random.split(key)
    first = choose(processors.apply(logits, seen, out, 0, opts.penalties, opts.stop_tokens), s, first_key)
    out = out.at[:, 0].set(first)

    def cond(carry: tuple) -> jax.Array:
        i, _, done = carry[:3]
        return (i < n) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, out, done, cache, key = carry
        key, step_key = jax.random.split(key)
        logits, cache = step(params, cfg, jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache)
        logits = processors.apply(logits[:, 0], seen, out, i, opts.penalties, opts.stop_tokens)
        token = jnp.where(done, opts.pad_id, choose(logits, s, step_key))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, out, done | is_stop(token, opts.stop_tokens), cache, key

    start = (jnp.ones((), jnp.int32), out, is_stop(first, opts.stop_tokens), cache, key)
    return jax.lax.while_loop(cond, body, start)[1]


def _is_module(x: object) -> bool:
    """A zoo.nnx.Model (only importable once flax.nnx is: a user who built one has it)."""
    front = sys.modules.get("zoo.nnx")
    return front is not None and isinstance(x, front.Model)


def _unwrap(params: object, cfg: object, prompt: object, max_new_tokens: object) -> tuple:
    """(params, cfg, prompt, max_new_tokens) of generate(model, prompt, max_new_tokens):
    the model's arguments sit one place to the left of generate(params, cfg, prompt, ...)."""
    if not _is_module(params):
        return params, cfg, prompt, max_new_tokens
    if isinstance(cfg, Config):
        raise TypeError("cfg: a zoo.nnx.Model carries its cfg; call generate(model, prompt, ...)")
    if cfg is None:  # generate(model, prompt=...)
        return params.params(), params.cfg, prompt, max_new_tokens
    if prompt is not None:  # generate(model, prompt, n): n landed in the prompt's place
        max_new_tokens = prompt
    return params.params(), params.cfg, cfg, max_new_tokens


# --- argument checks (static, before tracing) ----------------------------------------------
def _check_model(cfg: Config, name: str) -> None:
    if not isinstance(cfg, Config):
        raise TypeError(f"{name}: expected a zoo.Config, got {type(cfg).__name__}")
    if cfg.family == "encoder":
        raise ValueError(f"{name}: the encoder family does not generate text; "
                         "use zoo.encode for embeddings")
    if cfg.family == "encdec" and cfg.decoder_start_id is None:
        raise ValueError(f"{name}.decoder_start_id: encdec generation needs a decoder start token")


def _check_decoder_prompt(cfg: Config, decoder_prompt: jax.Array | None, batch: int) -> jax.Array | None:
    """decoder_prompt int [B, P] or [P] -> int32 [B, P] (None stays None)."""
    if decoder_prompt is None:
        return None
    if cfg.family != "encdec":
        raise ValueError("decoder_prompt: only encdec models have a separate decoder; a decoder's "
                         "forced start is the prompt itself")
    start = jnp.asarray(decoder_prompt)
    if start.ndim == 1:
        start = jnp.broadcast_to(start, (batch, start.shape[0]))
    if start.ndim != 2 or start.shape[0] != batch:
        raise ValueError(f"decoder_prompt: expected int [batch={batch}, P] or [P], got shape "
                         f"{tuple(np.shape(decoder_prompt))}")
    check_tokens("decoder_prompt", start, cfg)
    return start.astype(jnp.int32)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _check_rows(mask: jax.Array | None) -> None:
    if mask is not None and not isinstance(mask, jax.core.Tracer):
        empty = np.flatnonzero(~np.asarray(mask).any(axis=1))
        if empty.size:
            raise ValueError(f"prompt_mask: row {int(empty[0])} has no real token")


def _sampler(key: jax.Array | None, temperature: float | None, top_k: int | None,
             top_p: float | None, min_p: float | None, typical_p: float | None) -> Sampler:
    if key is None:
        given = [n for n, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                ("min_p", min_p), ("typical_p", typical_p)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: sampling needs key=jax.random.key(...); "
                             "without a key generate is greedy")
        return Sampler()
    temperature = 1.0 if temperature is None else temperature
    sampling.check(temperature, top_k, top_p, min_p, typical_p)
    return Sampler(False, float(temperature), int(top_k or 0), float(1.0 if top_p is None else top_p),
                   float(min_p or 0.0), float(1.0 if typical_p is None else typical_p))


def _check_contrastive(penalty_alpha: float | None, top_k: int | None, key: jax.Array | None,
                       num_beams: int, draft_params: dict | None) -> int:
    """The candidates of contrastive search (0: penalty_alpha not given)."""
    if penalty_alpha is None:
        return 0
    if not (isinstance(penalty_alpha, (int, float)) and 0.0 <= penalty_alpha <= 1.0):
        raise ValueError(f"penalty_alpha: expected a number in [0, 1], got {penalty_alpha!r}")
    if top_k is None:
        raise ValueError("penalty_alpha: contrastive search needs top_k (the candidates per step)")
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k: expected an int >= 1 (or None), got {top_k!r}")
    if key is not None or num_beams > 1 or draft_params is not None:
        raise ValueError("penalty_alpha: contrastive search is deterministic and single-beam; "
                         "drop key, num_beams and draft_params")
    return top_k


def filler(cfg: Config, stop_tokens: tuple[int, ...]) -> int:
    """The id written after a row's stop token: cfg.pad_id; a model without one (pad_id=None)
    gets cfg.eos_id, as transformers' generate does, else the first stop token. With no stop
    tokens no row stops, and the 0 returned is never written."""
    for candidate in (cfg.pad_id, cfg.eos_id, *stop_tokens):
        if candidate is not None:
            return candidate
    return 0


def _stop_tokens(cfg: Config, stop_tokens: Sequence[int] | None) -> tuple[int, ...]:
    if stop_tokens is None:
        return () if cfg.eos_id is None else (cfg.eos_id,)
    stops = tuple(int(t) for t in stop_tokens)
    bad = [t for t in stops if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"stop_tokens: id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    return stops


def _check_draft(cfg: Config, draft_params: dict | None, draft_cfg: Config | None,
                 num_speculative: int, num_beams: int) -> bool:
    if draft_params is None and draft_cfg is None:
        return False
    if draft_params is None or draft_cfg is None:
        raise ValueError("draft_params and draft_cfg: speculative decoding needs both")
    _check_model(draft_cfg, "draft_cfg")
    if draft_cfg.family != cfg.family or draft_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"draft_cfg: expected the target's family and vocabulary "
                         f"({cfg.family}, {cfg.vocab_size}), got ({draft_cfg.family}, "
                         f"{draft_cfg.vocab_size})")
    _check_positive_int("num_speculative", num_speculative)
    if num_beams > 1:
        raise ValueError("num_beams > 1 does not combine with speculative decoding (draft_params)")
    return True


def _check_streaming(cfg: Config, sink_tokens: int | None, cache_window: int | None,
                     speculate: bool, cache_len: int | None) -> tuple[int, int | None]:
    sinks, window = streaming.check(cfg, sink_tokens, cache_window)
    if window is not None and speculate:
        raise ValueError("cache_window: streaming feeds one token per step; it does not combine "
                         "with speculative decoding (draft_params)")
    if window is not None and cache_len is not None:
        raise ValueError(f"cache_len={cache_len}: a streaming cache holds sink_tokens + cache_window "
                         "slots; drop cache_len")
    return sinks, window


def _check_length(cfg: Config, prompt_len: int, opts: Options, draft_cfg: Config | None,
                  start_len: int = 1) -> None:
    """The cache and the position table must reach every token the call feeds (start_len:
    an encdec decoder prompt's)."""
    needed = reach(cfg, prompt_len, opts, start_len)
    if opts.cache_len is not None:
        _check_positive_int("cache_len", opts.cache_len)
        if opts.cache_len < needed:
            raise ValueError(f"cache_len: {opts.cache_len} slots cannot hold this call, which feeds "
                             f"{needed} tokens (prompt + max_new_tokens - 1"
                             f"{' + num_speculative' if opts.num_speculative else ''}); "
                             f"raise cache_len or lower max_new_tokens")
    for name, c in (("cfg", cfg), ("draft_cfg", draft_cfg)):
        if c is not None and c.positions in TABLE_POSITIONS and needed > c.max_len:
            fed = f"prompt length {prompt_len}" if cfg.family == "decoder" else f"decoder prompt length {start_len}"
            raise ValueError(f"max_new_tokens: {fed} + {opts.max_new_tokens} new "
                             f"tokens needs {needed} positions, beyond {name}.max_len={c.max_len}")
