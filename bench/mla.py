"""Multi-head latent attention: the decode cache's bytes per token, latent against expanded.

    python -m bench.mla [--preset deepseek-v2-lite] [--length 4096] [--dtype bfloat16] [--json out.json]

latent: `zoo.nn.cache.nbytes` of the cache `zoo.init_cache` builds for one row of `--length`
tokens (`zoo.nn.cache.LatentKV`: kv_lora_rank + qk_rope_head_dim numbers per token and
layer), divided by the length; computed from shapes, nothing is allocated. expanded: what a
cache of the heads' keys and values would hold instead, the form a decoder that re-expands
nothing would keep (keys [num_heads, qk_nope + qk_rope], values [num_heads, v_head_dim] per
token and layer), in the same dtype.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

import jax

import zoo
from bench import __main__ as bench_cli
from bench import hardware

COLUMNS = ("preset", "dtype", "layers", "latent_numbers", "expanded_numbers", "latent_bytes_per_token",
           "expanded_bytes_per_token", "ratio")


def cache_row(preset: str, length: int, dtype: str) -> dict[str, Any]:
    """One row: per-token cache bytes of `preset` (all layers), latent and expanded."""
    cfg = zoo.preset(preset, dtype=dtype)
    if not cfg.mla:
        raise ValueError(f"--preset: {preset!r} has no multi-head latent attention (Config.kv_lora_rank)")
    cache = jax.eval_shape(lambda: zoo.init_cache(cfg, 1, length))
    latent = zoo.nn.cache.nbytes(cache) // length  # every slot is one token
    itemsize = jax.numpy.dtype(dtype).itemsize
    expanded_numbers = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_size)
    expanded = expanded_numbers * itemsize * cfg.num_layers
    return {"preset": preset, "dtype": dtype, "length": length, "layers": cfg.num_layers,
            "latent_numbers": cfg.kv_lora_rank + cfg.qk_rope_head_dim, "expanded_numbers": expanded_numbers,
            "latent_bytes_per_token": latent, "expanded_bytes_per_token": expanded, "ratio": expanded / latent,
            "device": hardware.device_description(), "date": datetime.date.today().isoformat(),
            "jax": jax.__version__}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.mla", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="deepseek-v2-lite", help="presets with MLA (comma-separated)")
    p.add_argument("--length", type=int, default=4096, help="tokens the cache reaches")
    p.add_argument("--dtype", default="bfloat16", help="the cache's dtype")
    p.add_argument("--json", default=None, help="write the rows here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rows = [cache_row(name, args.length, args.dtype) for name in args.preset.split(",")]
    print(bench_cli.table(rows, COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
