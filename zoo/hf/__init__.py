"""Hugging Face checkpoints in and out: `load_hf` and `save_hf`.

    cfg, params = zoo.load_hf("path/to/hf_dir")      # config.json + *.safetensors, no network
    zoo.save_hf(cfg, params, "out_dir")               # transformers' from_pretrained loads it

Supported `model_type`s: bert, roberta, albert, distilbert, modernbert, gpt2, llama, mistral, mixtral, t5, bart, gemma2,
gemma3_text, qwen2, qwen3, phi3, deepseek_v2, deepseek_v3, gpt_oss, whisper. Each has a key map (data, in
zoo/hf/{bert,albert,distilbert,modernbert,gpt2,llama,t5,bart,gemma,qwen,phi3,deepseek,gpt_oss,whisper}.py) applied by one loop in zoo/hf/keymap.py.
A config that zoo cannot reproduce exactly is a ValueError naming the field; `save_hf` proves
each export by reading the written config back and comparing it to the Config it was given.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import Config
from zoo.hf.albert import ALBERT
from zoo.hf.bart import BART
from zoo.hf.bert import BERT, ROBERTA
from zoo.hf.common import ModelType, Unsupported, layer_pattern
from zoo.hf.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from zoo.hf.distilbert import DISTILBERT
from zoo.hf.files import SAFETENSORS, SAFETENSORS_INDEX, open_weights, write_safetensors
from zoo.hf.gemma import GEMMA2, GEMMA3_TEXT
from zoo.hf.gpt2 import GPT2
from zoo.hf.gpt_oss import GPT_OSS
from zoo.hf import heads as _heads
from zoo.hf.keymap import flatten, hf_keys, read_params, unflatten, write_params
from zoo.hf.llama import LLAMA, MISTRAL, MIXTRAL
from zoo.hf.modernbert import MODERNBERT
from zoo.hf.phi3 import PHI3
from zoo.hf.qwen import QWEN2, QWEN3
from zoo.hf.qwen3_moe import QWEN3_MOE
from zoo.hf.t5 import T5
from zoo.hf.whisper import WHISPER

# Order matters to save_hf: the first type that reproduces a Config is the one written.
MODEL_TYPES: dict[str, ModelType] = {
    m.name: m for m in (BERT, ROBERTA, ALBERT, DISTILBERT,
                        MODERNBERT, GPT2, LLAMA, MISTRAL, MIXTRAL, T5, BART, GEMMA2, GEMMA3_TEXT,
                        QWEN2, QWEN3, QWEN3_MOE, PHI3, DEEPSEEK_V2, DEEPSEEK_V3, GPT_OSS, WHISPER)}

__all__ = ["MODEL_TYPES", "Unsupported", "load_hf", "save_hf"]


def _model_type(d: dict) -> ModelType:
    name = d.get("model_type")
    if name not in MODEL_TYPES:
        raise Unsupported(f"load_hf: model_type {name!r} is not supported; supported: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[name]


def _shapes(cfg: Config) -> dict[str, tuple]:
    from zoo.model import spec

    return {path: p.shape for path, p in flatten(spec(cfg)).items()}


_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float32"}


def load_hf(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[Config, dict[str, Any]]:
    """Reads a Hugging Face model directory: config.json and its weights.

    Weights: model.safetensors, sharded *.safetensors with model.safetensors.index.json, or
    (only when torch is installed) pytorch_model.bin, unpickled with weights_only=True.
    dtype: the dtype the parameters are held in ("float32", "bfloat16", "float16"): it sets
    `cfg.param_dtype`, not the compute dtype `cfg.dtype`, which stays "float32"; default: the
    checkpoint's stored dtype. For bf16 compute too: `cfg = cfg.replace(dtype="bfloat16")`.
    Returns (Config, params) with params a nested dict of jax.Array, layers stacked.
    Raises ValueError for an unsupported model_type, a config field zoo cannot reproduce, a
    missing or misshapen weight, or a stored weight zoo has no place for.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load_hf: no config.json in {str(directory)!r}")
    d = json.loads(config_file.read_text())
    model_type = _model_type(d)
    with open_weights(directory) as weights:
        weights.set_prefix(model_type.prefix)
        task = _heads.find(d, model_type, weights, str(directory))
        if task is not None:  # a *For... class: the body, read without an LM head
            weights.set_prefix(model_type.prefix, stored_as=task.base)
            d = _heads.body_config(d, model_type, weights)
        cfg = model_type.read_config(d, weights)
        stored = dtype or _DTYPE_NAMES.get(weights.float_dtype().name, "float32")
        if stored not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"load_hf: dtype (the parameter dtype) must be float32, bfloat16 or "
                             f"float16, got {dtype!r}")
        cfg = cfg.replace(param_dtype=stored)

        def get(key: str) -> np.ndarray:
            if not weights.has(key):
                raise ValueError(f"load_hf: the checkpoint lacks weight {key!r}, which this "
                                 f"{model_type.name} config needs")
            return weights.get(key)

        buffers, used = read_params(get, model_type.rules, cfg, _shapes(cfg), jnp.dtype(stored))
        used |= _check_fixed(model_type, cfg, get)
        _check_all_used(model_type, cfg, weights, used | _heads.stored_keys(task, weights))
    # One leaf at a time, so host memory never holds two copies of the model.
    params = {}
    for leaf in list(buffers):
        params[leaf] = jax.device_put(buffers.pop(leaf))
    return cfg, unflatten(params)


def _check_fixed(model_type: ModelType, cfg: Config, get: Any) -> set[str]:
    """The stored tensors zoo computes from the config (`ModelType.fixed`) must hold the
    computed values, up to the stored dtype's rounding; returns their keys."""
    fixed = model_type.fixed(cfg) if model_type.fixed else {}
    for key, want in fixed.items():
        got = get(key)
        # torch computes the table in fp32 (angles up to the table length in radians), then
        # the checkpoint may round it to fp16/bf16: allow that, never a different table.
        tol = max(1e-3, 2 * float(jnp.finfo(got.dtype).eps))
        if got.shape != want.shape or not np.allclose(np.asarray(got, np.float32), want, atol=tol, rtol=0):
            raise Unsupported(f"load_hf: {model_type.name} weight {key!r} differs from the table zoo "
                              f"computes for it (shape {tuple(got.shape)}, expected {want.shape}); "
                              "zoo does not load a modified table")
    return set(fixed)


def _check_all_used(model_type: ModelType, cfg: Config, weights: Any, used: set[str]) -> None:
    """Stored weights that no rule read are an error: dropping them would change the model."""
    consumed = {weights.resolve(k) for k in used}
    if cfg.tie_embeddings:  # a stored copy of the tied head
        consumed |= {weights.resolve(r.hf) for r in model_type.rules if r.zoo == ("head/kernel",)}
    extra = sorted(k for k in weights.keys() - consumed
                   if not any(re.search(p, k) for p in model_type.ignore))
    if extra:
        shown = ", ".join(repr(k) for k in extra[:5])
        shown += f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise Unsupported(f"load_hf: {model_type.name} checkpoint has weights zoo has no place for: {shown}")


# --- export ---------------------------------------------------------------------------------------
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}


def _canonical(c: Config) -> Config:
    """The same model with every field that cannot change its numbers reset to a default, so
    configs compare by what they compute."""
    # Numerics and kernels: how a model is computed, not which model it is.
    keep_defaults = [name for name in ("dtype", "param_dtype", "attention", "matmul", "layout",
                                       "initializer", "scan_layers", "moe_dispatch",
                                       "grouped_matmul", "expert_parallel")
                     if name in _DEFAULTS]
    keep_defaults += _unused_rope_fields(c)
    if c.positions != "relative":
        keep_defaults += ["relative_buckets", "relative_max_distance"]
    if c.positions != "learned":
        keep_defaults += ["position_offset"]
    if not c.tie_embeddings:
        keep_defaults += ["logit_scale"]
    if not c.moe:
        keep_defaults += ["experts_per_token"]
    changes: dict[str, Any] = {name: _DEFAULTS[name] for name in keep_defaults}
    if c.family != "encdec":
        changes["decoder_start_id"] = None
    if c.d_model % c.num_heads == 0 and c.head_size == c.d_model // c.num_heads:
        changes["head_dim"] = None
    if c.kv_heads == c.num_heads:
        changes["num_kv_heads"] = None
    if c.family == "encdec" and c.decoder_layers == c.num_layers:
        changes["num_decoder_layers"] = None
    if c.attn_scale is not None and c.attn_scale == c.head_size ** -0.5:
        changes["attn_scale"] = None
    if c.attn_out_bias == c.attn_bias:
        changes["attn_out_bias"] = None
    if c.attn_key_bias == c.attn_bias:
        changes["attn_key_bias"] = None
    if c.family == "encdec" and c.encoder_positions == c.positions:
        changes["encoder_positions"] = None
    if c.family == "encdec" and c.encoder_max_len == c.max_len:
        changes["encoder_max_len"] = None
    if c.shared_layers == c.num_layers == c.decoder_layers:  # one set per layer: no sharing
        changes["shared_layers"] = 0
    # Layers compute by their kinds, however the pattern spells them; a window without
    # local layers is never used.
    kinds = [c.layer_kind(i) for i in range(c.num_layers)]
    changes["layer_pattern"] = layer_pattern(kinds)
    if "local" not in kinds:
        changes["sliding_window"] = None
    return c.replace(**changes)


def _unused_rope_fields(c: Config) -> list[str]:
    """The RoPE fields that c's scaling does not read (zoo.nn.positions)."""
    if c.positions != "rope":
        return [name for name in _DEFAULTS if name.startswith("rope_")]
    kind, out = c.rope_scaling, []
    if kind in (None, "longrope"):  # longrope's stretch is max_len / rope_original_max_len
        out += ["rope_scaling_factor"]
    if kind not in ("llama3", "yarn", "longrope"):
        out += ["rope_original_max_len"]
    if kind != "llama3":
        out += ["rope_low_freq_factor", "rope_high_freq_factor"]
    if kind != "yarn":
        out += ["rope_beta_fast", "rope_beta_slow", "rope_truncate", "rope_mscale", "rope_mscale_all_dim"]
    elif c.rope_attention_factor is not None:
        out += ["rope_mscale", "rope_mscale_all_dim"]
    if kind not in ("yarn", "longrope"):
        out += ["rope_attention_factor"]
    if kind != "longrope":
        out += ["rope_short_factor", "rope_long_factor"]
    return out


class _KeysOnly:
    """Stands in for a checkpoint when only the presence of keys matters."""

    def __init__(self, keys: set[str]):
        self._keys = keys

    def has(self, key: str) -> bool:
        return key in self._keys

    def get(self, key: str) -> np.ndarray:
        raise Unsupported(f"save_hf: cannot decide from keys alone whether {key!r} is tied")


def _export_config(model_type: ModelType, cfg: Config) -> dict:
    """The HF config for `cfg`, after proving it reads back as the same model."""
    if cfg.family != model_type.family:
        raise Unsupported(f"save_hf: {model_type.name} is a {model_type.family} model, "
                          f"cfg.family={cfg.family!r}")
    try:
        keys = hf_keys(model_type.rules, cfg, _shapes(cfg))
    except ValueError as e:  # the config has leaves this type's key map does not know
        raise Unsupported(f"save_hf: {model_type.name}: {e}") from None
    hf = {"model_type": model_type.name, **model_type.write_config(cfg)}
    back = model_type.read_config(hf, _KeysOnly(keys))
    want, got = _canonical(cfg).to_dict(), _canonical(back).to_dict()
    diffs = [f"Config.{k}={want[k]!r} (would load as {got[k]!r})" for k in want if want[k] != got[k]]
    if diffs:
        raise Unsupported(f"save_hf: a {model_type.name} checkpoint cannot hold " + "; ".join(diffs))
    return hf


def _choose(cfg: Config, name: str | None) -> tuple[ModelType, dict]:
    if name is not None:
        if name not in MODEL_TYPES:
            raise Unsupported(f"save_hf: model_type {name!r} is not supported; "
                              f"supported: {sorted(MODEL_TYPES)}")
        return MODEL_TYPES[name], _export_config(MODEL_TYPES[name], cfg)
    reasons = []
    for model_type in MODEL_TYPES.values():
        if model_type.family != cfg.family:
            continue
        try:
            return model_type, _export_config(model_type, cfg)
        except Unsupported as e:
            reasons.append(str(e))
    raise Unsupported("save_hf: no Hugging Face model type reproduces this Config:\n  " + "\n  ".join(reasons))


def _check_params(cfg: Config, flat: dict[str, np.ndarray]) -> None:
    shapes = _shapes(cfg)
    missing, extra = sorted(set(shapes) - set(flat)), sorted(set(flat) - set(shapes))
    if missing or extra:
        raise ValueError(f"save_hf: params do not match cfg: missing {missing}, unexpected {extra}")
    for path, shape in shapes.items():
        if tuple(flat[path].shape) != shape:
            raise ValueError(f"save_hf: params[{path!r}] has shape {tuple(flat[path].shape)}, "
                             f"cfg implies {shape}")


def _remove_old_weights(directory: Path) -> None:
    """Weights of an earlier export in the same directory would shadow or mix with the new."""
    for f in directory.iterdir():
        shard = re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f.name)
        if shard or f.name in (SAFETENSORS, SAFETENSORS_INDEX):
            f.unlink()


def save_hf(cfg: Config, params: dict[str, Any], path: str | os.PathLike, *,
            model_type: str | None = None, max_shard_size: int = 2 * 1024 ** 3, head: Any = None) -> str:
    """Writes a directory that transformers' AutoModelFor*.from_pretrained loads with the same
    logits: config.json and model.safetensors (or shards of at most max_shard_size bytes with
    model.safetensors.index.json).

    model_type: the Hugging Face type to write; default: the first supported type that
    reproduces `cfg` exactly. Raises ValueError when none does. Returns the model_type written.
    head: a `zoo.heads.Head`: the directory is then its type's *For... class (e.g.
    BertForSequenceClassification) with the head's labels and problem type.
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"save_hf: cfg must be a zoo.Config, got {type(cfg).__name__}")
    chosen, hf = _choose(cfg, model_type)
    flat = {p: np.asarray(jax.device_get(a)) for p, a in flatten(params).items()}
    _check_params(cfg, flat)
    tensors = write_params(flat, chosen.rules, cfg)
    if chosen.fixed:
        tensors = itertools.chain(tensors, ((k, v.astype(flat["embed/tokens"].dtype))
                                            for k, v in chosen.fixed(cfg).items()))
    if head is not None:  # checked before anything is written
        tensors = _heads.write(head, cfg, chosen, hf, tensors)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(directory)
    write_safetensors(tensors, directory, max_shard_size)
    hf["dtype"] = str(flat["embed/tokens"].dtype)  # what the tensors are stored in
    (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return chosen.name
