"""Key maps: how a Hugging Face tensor becomes a zoo leaf and back, and the one loop that
applies a map in either direction.

A key map is data: a list of `Rule`s, each naming a Hugging Face key (with `{i}` for the layer
and `{e}` for the expert index), the zoo leaf or leaves it fills ("/"-separated paths into the
params tree) and the `Transform` between the two layouts. zoo stacks layers (and experts) on
leading axes, so a rule with `{i}` fills one row of a stacked leaf per layer.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from zoo.config import Config


class Transform(NamedTuple):
    """Between one Hugging Face tensor and one zoo leaf (one layer's slice of it).

    to_zoo(hf, zoo_shape) -> zoo array; to_hf(zoo) -> hf array; hf_shape(zoo_shape) -> shape.
    fuse_axis: the axis of the HF tensor along which a fused tensor stacks its parts (the
    output axis: 0 for torch Linear's [out, in], -1 for GPT-2's Conv1D [in, out]).
    interleave: the parts of a fused tensor alternate along fuse_axis (part j at indices
    j, j + n, ...) instead of following each other.
    """

    to_zoo: Callable[[np.ndarray, tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]
    fuse_axis: int = -1
    interleave: bool = False


def _prod(shape: tuple) -> int:
    return math.prod(shape)


TRANSFORMS: dict[str, Transform] = {
    # Same layout on both sides (embeddings, norms, position tables, relative-bias tables).
    "copy": Transform(lambda w, s: w, lambda z: z, lambda s: tuple(s)),
    # A flat HF vector split into zoo axes, e.g. a q bias [N*H] <-> [N, H].
    "flat": Transform(lambda w, s: w.reshape(s), lambda z: z.reshape(-1), lambda s: (_prod(s),)),
    # A [1, V] buffer (BART's final_logits_bias) <-> [V].
    "row": Transform(lambda w, s: w.reshape(s), lambda z: z.reshape(1, -1), lambda s: (1, _prod(s))),
    # torch Linear weights are [out, in]; zoo kernels are [in, *out], e.g. q [D, N, H].
    "linear": Transform(lambda w, s: w.T.reshape(s), lambda z: z.reshape(z.shape[0], -1).T,
                        lambda s: (_prod(s[1:]), s[0]), fuse_axis=0),
    # ... or [*in, out] when the input side is split, e.g. the attention output o [N, H, D].
    "linear_out": Transform(lambda w, s: w.T.reshape(s), lambda z: z.reshape(-1, z.shape[-1]).T,
                            lambda s: (s[-1], _prod(s[:-1])), fuse_axis=0),
    # GPT-2's Conv1D stores [in, out] already.
    "conv": Transform(lambda w, s: w.reshape(s), lambda z: z.reshape(z.shape[0], -1),
                      lambda s: (s[0], _prod(s[1:]))),
    "conv_out": Transform(lambda w, s: w.reshape(s), lambda z: z.reshape(-1, z.shape[-1]),
                          lambda s: (_prod(s[:-1]), s[-1])),
    # torch Conv1d [out, in, width] <-> zoo [width, in, out] (Whisper's stem, zoo.nn.stem).
    "conv1d": Transform(lambda w, s: w.transpose(2, 1, 0), lambda z: z.transpose(2, 1, 0),
                        lambda s: tuple(s[::-1])),
    # Same layout, parts alternating on the last axis: gpt-oss's expert gate_up_proj
    # [E, D, 2F] (and its bias [E, 2F]) holds the gate in even and the up projection in odd columns.
    "interleaved": Transform(lambda w, s: w.reshape(s), lambda z: z, lambda s: tuple(s), interleave=True),
}


class Rule(NamedTuple):
    """One Hugging Face key <-> one or more zoo leaves.

    Several zoo paths mean the HF tensor is their concatenation along its output axis
    (`Transform.fuse_axis`): GPT-2's c_attn and Phi-3's qkv_proj hold q, k and v, Phi-3's
    gate_up_proj the gate and up projections. `when` restricts the rule to configs it applies to (T5's
    `wi` vs `wi_0`/`wi_1`); rules whose zoo leaves a config lacks are skipped anyway.
    layer_offset: the Hugging Face index `{i}` of the stack's row 0 (a stack that starts
    after a layer of another layout, e.g. ModernBERT's first layer).
    """

    hf: str
    zoo: tuple[str, ...]
    kind: str = "copy"
    when: Callable[[Config], bool] | None = None
    layer_offset: int = 0


def rule(hf: str, zoo: str | tuple[str, ...], kind: str = "copy",
         when: Callable[[Config], bool] | None = None, layer_offset: int = 0) -> Rule:
    if kind not in TRANSFORMS:
        raise ValueError(f"rule {hf!r}: unknown transform {kind!r}")
    return Rule(hf, (zoo,) if isinstance(zoo, str) else tuple(zoo), kind, when, layer_offset)


# --- tree helpers -----------------------------------------------------------------------------
def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


# --- applying a map ---------------------------------------------------------------------------
def _lead_axes(rule_: Rule, path: str) -> int:
    """How many leading axes of the zoo leaf the rule's placeholders index: layers, experts."""
    n = int("{i}" in rule_.hf) + int("{e}" in rule_.hf)
    if n and "/layers/" not in f"/{path}/":
        raise ValueError(f"rule {rule_.hf!r}: placeholders need a stacked zoo leaf, got {path!r}")
    return n


def _slots(rule_: Rule, shape: tuple, lead: int) -> Iterator[tuple[tuple[int, ...], str]]:
    """(index into the zoo leaf, concrete HF key) for every layer/expert the rule covers."""
    if lead == 0:
        yield (), rule_.hf
    elif lead == 1:
        for i in range(shape[0]):
            yield (i,), rule_.hf.format(i=i + rule_.layer_offset)
    else:
        for i in range(shape[0]):
            for e in range(shape[1]):
                yield (i, e), rule_.hf.format(i=i + rule_.layer_offset, e=e)


def _segmented(rules: list[Rule], shapes: dict[str, tuple]) -> list[Rule]:
    """The rules with per-layer zoo leaves (`.../layers/...`) copied once per segment of a
    segmented stack (`.../layers/{start}/...`, zoo.nn.transformer.segments), each copy
    offset to the segment's first Hugging Face layer; a map written for one stacked tree
    then reads any mix of dense and MoE layers."""
    starts = sorted({int(m.group(1)) for p in shapes if (m := re.search(r"/layers/(\d+)/", f"/{p}"))})
    if not starts:
        return rules
    out = []
    for r in rules:
        if not any("/layers/" in f"/{p}" for p in r.zoo):
            out.append(r)
            continue
        out += [r._replace(zoo=tuple(re.sub(r"(^|/)layers/", rf"\1layers/{s}/", p, count=1) for p in r.zoo),
                           layer_offset=r.layer_offset + s) for s in starts]
    return out


def active_rules(rules: list[Rule], cfg: Config, shapes: dict[str, tuple]) -> list[Rule]:
    """The rules that apply to this config; every zoo leaf must be covered exactly once."""
    active = [r for r in _segmented(rules, shapes)
              if (r.when is None or r.when(cfg)) and all(p in shapes for p in r.zoo)]
    covered: dict[str, str] = {}
    for r in active:
        for p in r.zoo:
            if p in covered:
                raise ValueError(f"key map: zoo leaf {p!r} filled by both {covered[p]!r} and {r.hf!r}")
            covered[p] = r.hf
    missing = sorted(set(shapes) - set(covered))
    if missing:
        raise ValueError(f"key map: no Hugging Face key fills zoo leaves {missing}")
    return active


def _split(w: np.ndarray, transform: Transform, shapes: list[tuple]) -> list[np.ndarray]:
    axis = transform.fuse_axis
    sizes = [transform.hf_shape(s)[axis] for s in shapes]
    if transform.interleave and len(shapes) > 1:
        n = len(shapes)
        parts = [np.take(w, np.arange(j, w.shape[axis], n), axis=axis) for j in range(n)]
    else:
        parts = np.split(w, np.cumsum(sizes)[:-1], axis=axis) if len(shapes) > 1 else [w]
    return [transform.to_zoo(p, s) for p, s in zip(parts, shapes)]


def _join(parts: list[np.ndarray], transform: Transform) -> np.ndarray:
    """The HF tensor of a rule's parts (already in HF layout): the inverse of `_split`."""
    if len(parts) == 1:
        return parts[0]
    if not transform.interleave:
        return np.concatenate(parts, axis=transform.fuse_axis)
    axis = transform.fuse_axis % parts[0].ndim
    shape = list(parts[0].shape)
    shape[axis] *= len(parts)
    return np.stack(parts, axis=axis + 1).reshape(shape)


def _expected_hf_shape(transform: Transform, shapes: list[tuple]) -> tuple:
    hf = [list(transform.hf_shape(s)) for s in shapes]
    fused = hf[0]
    fused[transform.fuse_axis] = sum(h[transform.fuse_axis] for h in hf)
    return tuple(fused)


def read_params(get: Callable[[str], np.ndarray], rules: list[Rule], cfg: Config,
                shapes: dict[str, tuple], dtype: Any) -> tuple[dict[str, np.ndarray], set[str]]:
    """Fills one numpy buffer per zoo leaf from Hugging Face tensors, one tensor at a time.

    get(key) returns one HF tensor (read lazily); shapes: zoo path -> full leaf shape.
    Returns ({zoo path: array}, the HF keys read). Buffers are allocated once in `dtype` and
    filled in place, so peak host memory is the model plus one tensor.
    """
    buffers = {p: np.empty(s, dtype) for p, s in shapes.items()}
    used: set[str] = set()
    for r in active_rules(rules, cfg, shapes):
        transform = TRANSFORMS[r.kind]
        lead = _lead_axes(r, r.zoo[0])
        slot_shapes = [shapes[p][lead:] for p in r.zoo]
        expected = _expected_hf_shape(transform, slot_shapes)
        for index, key in _slots(r, shapes[r.zoo[0]], lead):
            w = get(key)
            if tuple(w.shape) != expected:
                raise ValueError(f"weight {key!r} has shape {tuple(w.shape)}, but the config implies "
                                 f"{expected} (for zoo leaf {'+'.join(r.zoo)})")
            for path, part in zip(r.zoo, _split(w, transform, slot_shapes)):
                buffers[path][index] = part
            used.add(key)
    return buffers, used


def write_params(flat: dict[str, np.ndarray], rules: list[Rule],
                 cfg: Config) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of `read_params`: yields (HF key, tensor) one at a time from zoo leaves."""
    shapes = {p: tuple(a.shape) for p, a in flat.items()}
    for r in active_rules(rules, cfg, shapes):
        transform = TRANSFORMS[r.kind]
        lead = _lead_axes(r, r.zoo[0])
        for index, key in _slots(r, shapes[r.zoo[0]], lead):
            parts = [transform.to_hf(flat[p][index]) for p in r.zoo]
            fused = _join(parts, transform)
            yield key, np.ascontiguousarray(fused)


def hf_keys(rules: list[Rule], cfg: Config, shapes: dict[str, tuple]) -> set[str]:
    """Every HF key the map produces for this config (without touching any data)."""
    keys = set()
    for r in active_rules(rules, cfg, shapes):
        lead = _lead_axes(r, r.zoo[0])
        keys.update(key for _, key in _slots(r, shapes[r.zoo[0]], lead))
    return keys
