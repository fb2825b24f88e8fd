"""Model FLOPs of one example, derived from the parameter spec: the counter behind the MFU
that `python -m train` prints and that `python -m bench` reports.

forward = matmuls + attention, 2 FLOPs per multiply-add:
- matmuls: every weight that multiplies activations (rank >= 2 without the `layers` axis)
  costs 2 x its size x the rows it is applied to. Rows: the source tokens for the encoder
  stack, the MLM transform and the decoder's cross-attention keys/values (they project the
  encoder's output); the target tokens for the rest of an encdec decoder and its vocabulary
  head; the tokens for a decoder or an encoder; one row per example for the BERT pooler.
  A feature encoder's convolutional stem (Whisper, `zoo.nn.stem`): each kernel [3, in, D]
  per output position, conv1 over every frame (2 x the source positions), conv2 (stride 2)
  over the source positions; inputs_len is then the encoder's positions (frames / 2).
  Tables that are gathered, not multiplied (axes starting with `vocab`, `types`, `length`,
  `buckets`: token, type and position embeddings, T5's relative bias), cost nothing, except
  a tied token table, which is also the vocabulary head. Biases and norms (rank 1) are left
  out, as in the "6N" rule.
- mixture of experts: the router runs on every token, each expert weight counts
  experts_per_token / num_experts of its size: the FLOPs of the experts a token is routed
  to (model FLOPs; zoo's sparse dispatch runs just those, `zoo.nn.moe`). Dense layers of an
  MoE model (`Config.dense_layers`) and shared experts count whole.
- attention, per layer: 4 x queries x keys x num_heads x head_dim (scores and values over
  the full T x T square, the masked half included, as PaLM's 12 L H Q T per token counts).
  The causal convention: a causal (decoder) layer counts the whole square too, not the half
  it needs, so its MFU compares with PaLM's and MaxText's; a kernel that skips the masked
  half does about half the attention FLOPs counted. Cross-attention (encoder-decoders)
  counts target queries x source keys per decoder layer;
  multi-head latent attention: 2 x queries x keys x num_heads x (qk_nope + qk_rope + v head
  dims), its projections (latent down and up, queries, output) counted as weights above.

train = 3 x forward (the backward costs two forwards), rematerialisation not counted.

heads=False counts the hidden states only: no vocabulary projection (tied or not), MLM
transform or BERT pooler, for programs that do not run them (encoding; fine-tuning a task
head, whose own [D, labels] matmul is left out as negligible).
"""

from __future__ import annotations

import jax

from zoo.config import Config
from zoo.model import spec
from zoo.nn.param import Param, size
from zoo.nn.stem import STRIDE

GATHERED = ("vocab", "types", "length", "buckets")  # first axis of a looked-up table


HEADS = ("head", "mlm", "pooler")  # top-level entries after the hidden states (heads=False skips)


def matmul_flops(cfg: Config, inputs_len: int, targets_len: int = 0, heads: bool = True) -> float:
    """Forward FLOPs of every weight matmul for one example (see the module docstring).

    inputs_len: tokens of a decoder/encoder row, or the source length of encdec;
    targets_len: the target length of encdec (ignored for the other families);
    heads: False counts the hidden states only (no vocabulary head, MLM transform, pooler)."""
    src, tgt = inputs_len, (targets_len if cfg.family == "encdec" else inputs_len)
    total = 0.0
    for path, p in jax.tree_util.tree_leaves_with_path(spec(cfg), is_leaf=lambda x: isinstance(x, Param)):
        names = tuple(k.key for k in path)
        # a per-head bias ([heads, head_dim]) has rank 2 but is added, not multiplied
        if (heads or names[0] not in HEADS) and not names[-1].endswith("bias"):
            total += 2.0 * _weights(p, cfg) * _rows(names, src, tgt) * _runs(names, cfg)
    if cfg.tie_embeddings and heads:
        total += 2.0 * cfg.vocab_size * cfg.embed_size * tgt
    return total


def _runs(names: tuple[str, ...], cfg: Config) -> float:
    """Layers that run each stored layer of a stack: depth / sets when layers share
    parameters (`Config.shared_layers`), else 1."""
    if not cfg.shared_layers or "layers" not in names:
        return 1.0
    depth = cfg.decoder_layers if names[0] == "decoder" else cfg.num_layers
    return depth / cfg.shared_layers


def _weights(p: Param, cfg: Config) -> float:
    """Multiply-adds one row makes with this tensor (0 for gathered tables, biases, norms)."""
    axes = [a for a in p.axes if a not in ("layers", "experts")]  # an expert's bias is a bias
    if len(axes) < 2 or axes[0] in GATHERED:
        return 0.0
    return float(size(p, (cfg.experts_per_token, cfg.num_experts) if cfg.moe else None))


def _rows(names: tuple[str, ...], src: int, tgt: int) -> int:
    """Rows one example applies the tensor at `names` to."""
    if names[0] == "pooler":
        return 1
    if names[:2] == ("encoder", "stem"):  # conv1 runs over all frames, conv2 (stride 2) over src
        return src * (STRIDE if names[2] == "conv1" else 1)
    if names[0] in ("encoder", "mlm"):
        return src
    if names[0] == "decoder" and "cross" in names and names[-1] in ("k", "v"):
        return src
    return tgt


def attention_flops(cfg: Config, inputs_len: int, targets_len: int = 0) -> float:
    """Forward FLOPs of attention scores and values for one example, every layer."""
    # 2 x queries x keys x heads x (score dims + value dims); MLA scores Hn + R dims per head
    # (zoo.nn.mla, expanded as training runs it) and sums Hv-dim values.
    dims = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_size) if cfg.mla else 2 * cfg.head_size
    square = lambda queries, keys: 2.0 * queries * keys * cfg.num_heads * dims
    if cfg.family == "encdec":
        encoder = cfg.num_layers * square(inputs_len, inputs_len)
        decoder = square(targets_len, targets_len) + square(targets_len, inputs_len)
        return encoder + cfg.decoder_layers * decoder
    return cfg.num_layers * square(inputs_len, inputs_len)


def forward_flops(cfg: Config, inputs_len: int, targets_len: int = 0, heads: bool = True) -> float:
    """Forward FLOPs of one example: matmuls + attention (heads: see `matmul_flops`)."""
    return matmul_flops(cfg, inputs_len, targets_len, heads) + attention_flops(cfg, inputs_len, targets_len)


def train_flops(cfg: Config, inputs_len: int, targets_len: int = 0, heads: bool = True) -> float:
    """Training FLOPs of one example (forward and backward): 3 x forward."""
    return 3.0 * forward_flops(cfg, inputs_len, targets_len, heads)
