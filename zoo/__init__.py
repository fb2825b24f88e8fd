"""zoo: encoder, decoder and encoder-decoder transformers as pure functions of pytrees."""

from zoo import audio, decoder, encdec, encoder, flops, heads, nn, presets, sharding, tokenizer
from zoo.config import Config, ConfigError
from zoo.encoder import encode
from zoo.generate import generate
from zoo.hf import load_hf, save_hf
from zoo.model import Inputs, apply, axes, forward, init, param_count, spec
from zoo.nn.cache import Cache, init as init_cache
from zoo.nn.output import Output
from zoo.nn.quant import quantize
from zoo.presets import preset

__all__ = ["Cache", "Config", "ConfigError", "Inputs", "Output", "apply", "audio", "axes", "decoder", "encdec",
           "encode", "encoder", "flops", "forward", "generate", "heads", "init", "init_cache", "load_hf", "nn",
           "param_count", "preset", "presets", "quantize", "save_hf", "sharding", "spec", "tokenizer", "nnx", "linen"]


def __getattr__(name: str):
    """`zoo.nnx` and `zoo.linen` (the Flax front doors) import on first use: `import zoo`
    does not pay for flax.nnx."""
    if name in ("nnx", "linen"):
        import importlib

        return importlib.import_module(f"zoo.{name}")
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
