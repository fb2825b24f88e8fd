"""Multi-head latent attention (MLA, DeepSeek-V2/V3): the self-attention part of a layer
whose config sets `kv_lora_rank`.

Each token is compressed to one latent c [C] (`kv_lora_rank`, RMS-normed) and one rotated
key k_rope [R] (`qk_rope_head_dim`) shared by every head; `kv_b` [C, N, Hn + Hv] expands the
latent into the heads' no-position keys [Hn] (`qk_nope_head_dim`) and values [Hv]
(`v_head_dim`). Queries come from x directly or through a normed bottleneck (`q_lora_rank`)
and split into Hn dims scored against the expanded keys and R rotated dims scored against
k_rope:

    score[n, t, s] = (q_nope[t, n] . k_nope[s, n] + q_rope[t, n] . k_rope[s]) * scale

Two forms compute the same attention:

- expanded (`attend_expanded`: training, a forward without cache): K and V of every head
  from the latent, as the published models are written;
- absorbed (`attend_absorbed`: decoding over the cache): the key up-projection is folded
  into the query (q_nope W_k -> [N, C]) and the value up-projection applied after the
  weighted sum of latents, so the cache holds only c and k_rope, C + R numbers per token and
  layer (`zoo.nn.cache.LatentKV`), and no step re-expands the cached tokens.

The score scale is (Hn + R)**-0.5 times DeepSeek's YaRN correction mscale(factor,
mscale_all_dim)**2 (`mla_scale`); the rotated dims carry the rope tables' attention factor
like any RoPE (`zoo.nn.positions`). Scores and softmax run in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.config import Config
from zoo.nn.blockwise import blockwise_attend
from zoo.nn.cache import LatentKV, Plan, update_latent
from zoo.nn.linear import matmul
from zoo.nn.masks import MaskParts
from zoo.nn.norms import apply_norm, norm_spec
from zoo.nn.param import Spec, init_std, param
from zoo.nn.positions import apply_rope, yarn_mscale
from zoo.nn.quant import dequantize, tie
from zoo.sharding import constrain

_MASKED = -1e30  # as zoo.nn.attention: finite, so fully masked rows stay NaN-free


def mla_spec(cfg: Config) -> Spec:
    """q (or q_a, q_a_norm, q_b), kv_a [D, C + R], kv_a_norm [C], kv_b [C, N, Hn + Hv], o [N, Hv, D]."""
    d, n, c, r = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    qk, v = cfg.qk_nope_head_dim + r, cfg.v_size
    spec: Spec = {}
    if cfg.q_lora_rank:
        rq = cfg.q_lora_rank
        spec["q_a"] = param((d, rq), ("embed", None), std=init_std(cfg, "q", d))
        spec["q_a_norm"] = norm_spec(cfg, rq)
        spec["q_b"] = param((rq, n, qk), (None, "heads", "head_dim"), std=init_std(cfg, "q", rq))
    else:
        spec["q"] = param((d, n, qk), ("embed", "heads", "head_dim"), std=init_std(cfg, "q", d))
    spec["kv_a"] = param((d, c + r), ("embed", None), std=init_std(cfg, "kv", d))
    spec["kv_a_norm"] = norm_spec(cfg, c)
    spec["kv_b"] = param((c, n, cfg.qk_nope_head_dim + v), (None, "heads", "head_dim"),
                         std=init_std(cfg, "kv", c))
    spec["o"] = param((n, v, d), ("heads", "head_dim", "embed"), std=init_std(cfg, "out", n * v))
    return spec


def mla_scale(cfg: Config) -> float:
    """The score scale: attn_scale, else (Hn + R)**-0.5, times mscale(factor, mscale_all_dim)**2
    under YaRN with mscale_all_dim (DeepSeek's correction, as transformers' DeepseekV2/V3)."""
    scale = cfg.attn_scale if cfg.attn_scale is not None else (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_scaling_factor, cfg.rope_mscale_all_dim) ** 2
    return scale


def _queries(p: dict, x: jax.Array, rope, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> q_nope [B, T, N, Hn], q_rope [B, T, N, R] (rotated)."""
    if cfg.q_lora_rank:
        q = matmul(apply_norm(p["q_a_norm"], matmul(x, p["q_a"], mode=cfg.matmul), cfg), p["q_b"], mode=cfg.matmul)
    else:
        q = matmul(x, p["q"], mode=cfg.matmul)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
    return q_nope, _rotate(q_rope, rope, cfg)


def _rotate(x: jax.Array, rope, cfg: Config) -> jax.Array:
    """RoPE on x [B, T, N, R]. rope_interleave: the checkpoint pairs dims (0, 1), (2, 3), ..;
    they are gathered into halves first (evens, odds), the layout apply_rope rotates. Queries
    and keys both come out in that layout, so their dot products are the interleaved ones."""
    if cfg.rope_interleave:
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    return apply_rope(x, rope)


def latent(p: dict, x: jax.Array, rope, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> the cached part of each token: c [B, T, C] (normed), k_rope [B, T, R] (rotated)."""
    c, k_rope = jnp.split(matmul(x, p["kv_a"], mode=cfg.matmul), [cfg.kv_lora_rank], axis=-1)
    return apply_norm(p["kv_a_norm"], c, cfg), _rotate(k_rope[:, :, None], rope, cfg)[:, :, 0]


def _probs(scores: jax.Array, mask: jax.Array, scale: float, dtype: jnp.dtype) -> jax.Array:
    """scores [B, N, T, S] fp32, mask [B, T, S] -> softmax over S in dtype."""
    scores = jnp.where(mask[:, None], scores * scale, _MASKED)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def attend_expanded(q_nope: jax.Array, q_rope: jax.Array, c: jax.Array, k_rope: jax.Array,
                    kv_b: jax.Array, mask: jax.Array, scale: float, mode: str = "xla") -> jax.Array:
    """Keys and values of every head from the latents: q_nope [B, T, N, Hn], q_rope
    [B, T, N, R], c [B, S, C], k_rope [B, S, R], kv_b [C, N, Hn + Hv], mask [B, T, S]
    -> [B, T, N, Hv]."""
    hn = q_nope.shape[-1]
    k_nope, v = jnp.split(matmul(c, kv_b, mode=mode), [hn], axis=-1)  # [B, S, N, *]
    scores = (jnp.einsum("btnh,bsnh->bnts", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope, preferred_element_type=jnp.float32))
    return jnp.einsum("bnts,bsnv->btnv", _probs(scores, mask, scale, v.dtype), v)


def attend_absorbed(q_nope: jax.Array, q_rope: jax.Array, c: jax.Array, k_rope: jax.Array,
                    kv_b: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """The same attention read from the latents alone (shapes as `attend_expanded`): queries
    move into the latent space (q_nope W_k: [B, T, N, C]), the softmax weights sum latents
    ([B, T, N, C]), and W_v lifts the sum to each head's values."""
    hn = q_nope.shape[-1]
    c, kv_b = tie(c, kv_b)  # a QuantizedWeight (zoo.quantize): dequantized in each step
    w = dequantize(kv_b, c.dtype)
    w_k, w_v = w[..., :hn], w[..., hn:]
    q_lat = jnp.einsum("btnh,cnh->btnc", q_nope, w_k)
    scores = (jnp.einsum("btnc,bsc->bnts", q_lat, c, preferred_element_type=jnp.float32)
              + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope, preferred_element_type=jnp.float32))
    out_lat = jnp.einsum("bnts,bsc->btnc", _probs(scores, mask, scale, c.dtype), c)
    return jnp.einsum("btnc,cnv->btnv", out_lat, w_v)


def _project_out(p: dict, out: jax.Array, cfg: Config) -> jax.Array:
    """[B, T, N, Hv] -> [B, T, D] through o (one [N*Hv, D] matmul)."""
    return matmul(constrain(out, ("batch", "length", "heads", "head_dim")), p["o"], n_in=2, mode=cfg.matmul)


def apply_mla(p: dict, x: jax.Array, ctx, cfg: Config) -> jax.Array:
    """Self-attention x [B, T, D] -> [B, T, D] in the expanded form (ctx: zoo.nn.attention.Context;
    its mask as MaskParts: the blockwise path, `attend_blockwise`)."""
    q_nope, q_rope = _queries(p, x, ctx.rope, cfg)
    c, k_rope = latent(p, x, ctx.rope, cfg)
    if isinstance(ctx.mask, MaskParts):
        out = attend_blockwise(q_nope, q_rope, c, k_rope, p["kv_b"], ctx.mask, mla_scale(cfg), cfg)
    else:
        out = attend_expanded(q_nope, q_rope, c, k_rope, p["kv_b"], ctx.mask, mla_scale(cfg), cfg.matmul)
    return _project_out(p, out, cfg)


def attend_blockwise(q_nope: jax.Array, q_rope: jax.Array, c: jax.Array, k_rope: jax.Array,
                     kv_b: jax.Array, parts: MaskParts, scale: float, cfg: Config) -> jax.Array:
    """The expanded form in memory linear in the length (`Config.attention="blockwise"`):
    each head's key [Hn + R] (k_rope shared) and value [Hv] from the latents, attended by
    `zoo.nn.blockwise` (shapes as `attend_expanded`) -> [B, T, N, Hv]."""
    hn = q_nope.shape[-1]
    k_nope, v = jnp.split(matmul(c, kv_b, mode=cfg.matmul), [hn], axis=-1)  # [B, S, N, *]
    k_rope = jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1]))
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1)
    return blockwise_attend(q, k, v, parts, None, scale, block=cfg.attention_block)


def apply_cached_mla(p: dict, x: jax.Array, ctx, cfg: Config, layer: LatentKV,
                     plan: Plan) -> tuple[jax.Array, LatentKV]:
    """A chunk x [B, T, D] over a layer's latent cache (ctx.mask [B, T, R slots], or
    [B, T, R + T] for a concat plan), in the absorbed form. Returns (y [B, T, D], the layer
    cache with the chunk's latents stored)."""
    q_nope, q_rope = _queries(p, x, ctx.rope, cfg)
    c, k_rope, layer = update_latent(layer, *latent(p, x, ctx.rope, cfg), plan)
    out = attend_absorbed(q_nope, q_rope, c, k_rope, p["kv_b"], ctx.mask, mla_scale(cfg))
    return _project_out(p, out, cfg), layer
