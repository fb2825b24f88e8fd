"""Weight-only quantization for inference: int8 per output channel, int4 group-wise.

`quantize(params, cfg, bits, group_size)` replaces each dense projection (attention q/k/v/o,
MLA q/q_a/q_b/kv_a/kv_b/o, MLP and shared-expert wi/wg/wo, every dense `kernel`, the untied
output head), the routed experts' wi/wg/wo ([E, D, F] / [E, F, D]: quantized per expert,
the experts axis a lead dim like `layers`) and the token embedding table by a
`QuantizedWeight` at the same place in the tree. `zoo.nn.linear.matmul` /
`matmul_transposed` and `take_rows` (the embedding lookup) dequantize inside the product
(on a CPU, `zoo.kernels.cpu`'s kernel: `kernel_matmul`);
`zoo.nn.moe`'s grouped matmul dequantizes the expert matrices it reads and MLA's absorbed
decoding path dequantizes `kv_b` where it reads it (`dequantize`), so every family's
`forward`, `zoo.generate` and `zoo.encode` take the quantized tree unchanged. For inference
only: `q` is int8, which `jax.grad` refuses as an input. Left in their dtype: routers,
expert and other biases, position/type tables and norms.

Layout: `q` holds a weight [*lead, *in, *out] (lead: the stack's `layers` axis and the
routed `experts` axis, where present) as
[*lead, *out, *in], the contracted dims innermost, so a batch-1 product reads each output
row contiguously (the CPU kernel's rows, and the form in which XLA fuses the int8 -> float
conversion into a matrix-vector product instead of writing the float weight out: `matvec`). An embedding
table [V, E] is already [out, in] and keeps its order. int4 packs two output rows per byte
(row 2m in the low nibble, 2m + 1 in the high one), so a row pair is read once.
`scale` [*lead, *out, groups]: per output channel (groups = 1) or per `group_size` run of
the flattened input dims.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from zoo.kernels import cpu as cpu_kernel

# Leaf name -> number of leading (contracted) dims, for the weights `matmul` reads.
MATMUL_WEIGHTS = {"q": 1, "k": 1, "v": 1, "o": 2, "wi": 1, "wg": 1, "wo": 1, "kernel": 1,
                  "q_a": 1, "q_b": 1, "kv_a": 1, "kv_b": 1}
LEAD_AXES = ("layers", "experts")  # leading logical axes a weight is quantized per entry of
# Default inputs per scale: None is one scale per output channel. int4's 128 (GPTQ's and
# AWQ's usual choice) where it divides the input dim, else the largest power of two that
# does (`default_group`); at 64 the CPU kernel's per-group work costs int4 ~1/4 of its speed.
DEFAULT_GROUP = {8: None, 4: 128}


def default_group(bits: int, n_in: int) -> int | None:
    """The inputs per scale `quantize` uses without a group_size, for an input dim n_in."""
    if DEFAULT_GROUP[bits] is None:
        return None
    return math.gcd(DEFAULT_GROUP[bits], n_in)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight standing where the float array was (a pytree: `q` and `scale` are
    its leaves, so scan slices them and shardings place them).

    q: int8 [*lead, *out, *in] (int4: the last out dim halved, two values per byte);
    scale: float [*lead, *out, groups]; core: the original shape without lead dims;
    n_in: contracted dims; out_first: the original is [out, in] (an embedding table) rather
    than [in, out]; dtype: the original dtype."""

    q: jax.Array
    scale: jax.Array
    bits: int
    n_in: int
    core: tuple[int, ...]
    out_first: bool
    dtype: str

    @property
    def lead(self) -> tuple[int, ...]:
        return tuple(self.q.shape[:self.q.ndim - len(self.core)])

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.lead, *self.core)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.core[-self.n_in:] if self.out_first else self.core[:self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.core[:-self.n_in] if self.out_first else self.core[self.n_in:]

    @property
    def group_size(self) -> int:
        return math.prod(self.in_shape) // self.scale.shape[-1]

    def reshape(self, *shape: int) -> "QuantizedWeight":
        """The original layout reshaped, contracted dims unchanged (fusing q, k, v)."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        lead, n = self.lead, len(self.lead)
        keep = shape[n:n + self.n_in] if not self.out_first else shape[len(shape) - self.n_in:]
        out = shape[n + self.n_in:] if not self.out_first else shape[n:len(shape) - self.n_in]
        if shape[:n] != lead or keep != self.in_shape or math.prod(out) != math.prod(self.out_shape):
            raise ValueError(f"QuantizedWeight.reshape: only the output dims can change; "
                             f"{self.shape} -> {shape}")
        return dataclasses.replace(self, q=self.q.reshape(*lead, *_packed(out, self.bits), *self.in_shape),
                                   scale=self.scale.reshape(*lead, *out, self.scale.shape[-1]),
                                   core=tuple(shape[n:]))

    def axes(self, logical: Sequence[str | None]) -> tuple[tuple, tuple]:
        """(q's, scale's) logical axis names from the original weight's: q's permuted as q
        is; scale's group axis named like the first contracted dim (None per channel)."""
        n = len(self.lead)
        lead, core = tuple(logical[:n]), tuple(logical[n:])
        ins = core[-self.n_in:] if self.out_first else core[:self.n_in]
        outs = core[:-self.n_in] if self.out_first else core[self.n_in:]
        group = ins[0] if self.scale.shape[-1] > 1 else None
        return (*lead, *outs, *ins), (*lead, *outs, group)


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["q", "scale"],
                                 meta_fields=["bits", "n_in", "core", "out_first", "dtype"])


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def _packed(out: Sequence[int], bits: int) -> tuple[int, ...]:
    return (*out[:-1], out[-1] // 2) if bits == 4 else tuple(out)


# --- quantize -----------------------------------------------------------------------------
def quantize(params: dict, cfg: Any, bits: int = 8, group_size: int | None = None) -> dict:
    """params (the layout `zoo.init` gives) with each dense projection, each routed
    expert's matrices and the token embedding table as a `QuantizedWeight`: bits 8 (one
    scale per output channel, or per group_size inputs when given) or 4 (group_size inputs
    per scale; default 128, or the largest power of two dividing the input dim when 128
    does not).
    Symmetric absmax rounding. ValueError for other bits, or a group_size that does not
    divide a quantized weight's input dim."""
    if bits not in (4, 8):
        raise ValueError(f"quantize: bits must be 4 or 8, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"quantize: group_size must be a positive int, got {group_size!r}")
    from zoo.model import axes as model_axes

    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)

    def one(path: tuple, logical: tuple, w: jax.Array) -> Any:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        name = keys[-1]
        n_lead = 0
        while n_lead < len(logical) and logical[n_lead] in LEAD_AXES:
            n_lead += 1
        core = tuple(logical[n_lead:])
        if len(core) < 2:
            return w
        if name == "tokens" and keys[-2:-1] == ["embed"]:
            return quantize_weight(w, bits, group_size, 1, True, n_lead, _name(path))
        if name in MATMUL_WEIGHTS:
            return quantize_weight(w, bits, group_size, MATMUL_WEIGHTS[name], False,
                                   n_lead, _name(path))
        return w

    return jax.tree_util.tree_map_with_path(one, model_axes(cfg), params, is_leaf=is_axes)


def _name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def quantize_weight(w: jax.Array, bits: int, group_size: int | None, n_in: int, out_first: bool,
                    n_lead: int = 0, name: str = "weight") -> QuantizedWeight:
    """One weight [*lead, *in, *out] ([*lead, out, in] when out_first) -> QuantizedWeight;
    group_size None: `default_group`."""
    core = tuple(w.shape[n_lead:])
    ins = core[len(core) - n_in:] if out_first else core[:n_in]
    outs = core[:len(core) - n_in] if out_first else core[n_in:]
    k = math.prod(ins)
    group = group_size or default_group(bits, k) or k
    if k % group:
        raise ValueError(f"quantize: group_size {group} does not divide the input dim {k} of {name}")
    if bits == 4 and outs[-1] % 2:
        raise ValueError(f"quantize: int4 packs output rows in pairs; {name} has an odd "
                         f"output dim {outs[-1]}")
    lead_idx = list(range(n_lead))
    core_idx = [n_lead + i for i in range(len(core))]
    perm = lead_idx + (core_idx if out_first else core_idx[n_in:] + core_idx[:n_in])
    wt = jnp.transpose(w, perm).astype(jnp.float32)
    wg = wt.reshape(*wt.shape[:n_lead], *outs, k // group, group)
    qmax = 127.0 if bits == 8 else 7.0
    scale = jnp.max(jnp.abs(wg), axis=-1) / qmax
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(wg / scale[..., None]), -qmax, qmax).astype(jnp.int8)
    q = q.reshape(wt.shape)
    if bits == 4:
        axis = n_lead + len(outs) - 1
        even = jax.lax.slice_in_dim(q, 0, None, 2, axis)
        odd = jax.lax.slice_in_dim(q, 1, None, 2, axis)
        q = (even & 0x0F) | (odd << 4)
    return QuantizedWeight(q=q, scale=scale, bits=bits, n_in=n_in, core=core,
                           out_first=out_first, dtype=jnp.dtype(w.dtype).name)


# --- dequantize ---------------------------------------------------------------------------
def rows(w: QuantizedWeight) -> jax.Array:
    """int8 [N, K] of an unstacked weight: outputs flattened, inputs flattened, int4
    nibbles sign-extended (elementwise, so it fuses into the consumer)."""
    if w.lead:
        raise ValueError(f"QuantizedWeight: a stacked weight {w.shape} reached a matmul")
    k = math.prod(w.in_shape)
    q = w.q.reshape(-1, k)
    if w.bits == 8:
        return q
    m = q.shape[0]
    pair = jnp.broadcast_to(q[:, None, :], (m, 2, k))
    odd = jax.lax.broadcasted_iota(jnp.int32, (m, 2, k), 1) == 1
    return jnp.where(odd, pair >> 4, (pair << 4) >> 4).reshape(2 * m, k)


def dequantized(w: QuantizedWeight, dtype: Any, per_channel: bool = True) -> jax.Array:
    """[N, K] in dtype (the [out, in] layout); per_channel False leaves a per-channel scale
    (groups = 1) for the caller to apply to the product's output."""
    q = rows(w)
    n, k = q.shape
    groups = w.scale.shape[-1]
    scale = w.scale.reshape(n, groups).astype(dtype)
    if groups == 1:
        return q.astype(dtype) * scale if per_channel else q.astype(dtype)
    return (q.astype(dtype).reshape(n, groups, k // groups) * scale[:, :, None]).reshape(n, k)


def dequantize(w: Any, dtype: Any = None) -> Any:
    """The float array a QuantizedWeight stands for, in its original shape, in dtype (default
    its original dtype); arrays pass through (cast to dtype when given). For checks and
    exports, and where a weight is read outside `zoo.nn.linear.matmul` (MLA's absorbed
    kv_b, MoE experts)."""
    if not is_quantized(w):
        return w if dtype is None else w.astype(dtype)
    if w.lead:
        return jax.vmap(lambda v: dequantize(v, dtype))(w)
    full = dequantized(w, jnp.float32)
    out = full.reshape(*w.out_shape, *w.in_shape)
    if not w.out_first:
        n_out = len(w.out_shape)
        out = jnp.transpose(out, [*range(n_out, out.ndim), *range(n_out)])
    return out.astype(w.dtype if dtype is None else dtype)  # (a np.dtype is falsy: no `or`)


def shard_view(w: Any) -> Any:
    """w with its shape (`core`) read back from q's: inside a shard_map a QuantizedWeight's
    leaves are the device's blocks while `core` still names the whole weight. Arrays pass
    through."""
    if not is_quantized(w):
        return w
    n = len(w.core)
    dims = w.q.shape[w.q.ndim - n:]
    outs, ins = dims[:n - w.n_in], dims[n - w.n_in:]
    if w.bits == 4:
        outs = (*outs[:-1], 2 * outs[-1])
    return dataclasses.replace(w, core=(*outs, *ins) if w.out_first else (*ins, *outs))


def tie(x: jax.Array, w: Any) -> tuple[jax.Array, Any]:
    """(x, w) with a quantized w's q tied to x by an optimization barrier, so the
    dequantization that follows depends on x: inside a decoding loop XLA would otherwise
    hoist the loop-invariant conversion out of the loop and keep a float copy of the weight
    (the memory quantizing saved). Arrays pass through."""
    if not is_quantized(w):
        return x, w
    x, q = jax.lax.optimization_barrier((x, w.q))
    return x, dataclasses.replace(w, q=q)


def kernel_matmul(x: jax.Array, w: QuantizedWeight, xla: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """x [M, K] times the [N, K] weight -> [M, N] in float32 by `zoo.kernels.cpu`'s kernel
    when this program runs on a CPU (each weight byte read once, widened in registers,
    rows split over the cores), else by `xla(x)`. Call where `zoo.kernels.cpu.available()`."""
    if w.lead:
        raise ValueError(f"QuantizedWeight: a stacked weight {w.shape} reached a matmul")
    k = math.prod(w.in_shape)
    q, scale = w.q.reshape(-1, k), w.scale.reshape(-1, w.scale.shape[-1])
    return jax.lax.platform_dependent(
        x, cpu=lambda x: cpu_kernel.qmatvec(x, q, scale, w.bits),
        default=lambda x: xla(x).astype(jnp.float32))


def matvec(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [1, K] times the [N, K] weight -> [1, N] in float32, in XLA alone: a product with
    the converted weight whose contracted dim is innermost, the form XLA's CPU backend
    fuses into one loop that reads int8 (a per-channel scale multiplies the output); a GPU
    fuses it likewise. The barrier ties q to x: inside a decoding loop XLA would otherwise
    hoist the loop-invariant conversion out of the loop and read a float copy of the
    weight every step."""
    x, w = tie(x, w)
    per_channel = w.scale.shape[-1] == 1
    wf = dequantized(w, jnp.float32, per_channel=not per_channel)
    # `@ wf.T` (not a dot_general over wf's dim 1) is the form that gets the fused loop;
    # the second barrier keeps a following bias add from claiming the product instead.
    y = jax.lax.optimization_barrier(x.astype(jnp.float32) @ wf.T)
    return y * w.scale.reshape(1, -1).astype(jnp.float32) if per_channel else y


def take_rows(table: Any, ids: jax.Array) -> jax.Array:
    """table [V, E] rows at ids [...] -> [..., E] (mode clip); a quantized table
    dequantizes only the gathered rows (float32)."""
    if not is_quantized(table):
        return jnp.take(table, ids, axis=0, mode="clip")
    e = table.core[-1]
    ids = jnp.clip(ids, 0, table.core[0] - 1)
    if table.bits == 8:
        q = jnp.take(table.q, ids, axis=0)
    else:
        packed = jnp.take(table.q, ids // 2, axis=0)
        q = jnp.where((ids % 2 == 1)[..., None], packed >> 4, (packed << 4) >> 4)
    scale = jnp.take(table.scale, ids, axis=0)
    groups = scale.shape[-1]
    x = q.astype(jnp.float32).reshape(*ids.shape, groups, e // groups) * scale[..., None]
    return x.reshape(*ids.shape, e)


def concatenate(ws: Sequence[Any], axis: int) -> Any:
    """jnp.concatenate, and for QuantizedWeights along an output axis of the original
    layout (fusing q, k, v or gate and input matrices for decoding)."""
    if not any(is_quantized(w) for w in ws):
        return jnp.concatenate(ws, axis=axis)
    first = ws[0]
    if not all(is_quantized(w) and w.bits == first.bits and w.in_shape == first.in_shape
               and w.lead == first.lead and w.out_first == first.out_first for w in ws):
        raise ValueError("quantize: concatenate needs weights quantized alike")
    n, ndim = len(first.lead), first.ndim
    axis = axis % ndim
    outs = range(n + first.n_in, ndim) if not first.out_first else range(n, ndim - first.n_in)
    if axis not in outs:
        raise ValueError(f"quantize: concatenate along axis {axis}, which is not an output axis")
    at = n + (axis - outs[0])  # the same axis in q's [*lead, *out, *in] order
    if first.scale.shape[-1] != 1 and any(w.scale.shape[-1] != first.scale.shape[-1] for w in ws):
        raise ValueError("quantize: concatenate needs the same groups")
    core = list(first.core)
    core[axis - n] = sum(w.shape[axis] for w in ws)
    return dataclasses.replace(first, q=jnp.concatenate([w.q for w in ws], axis=at),
                               scale=jnp.concatenate([w.scale for w in ws], axis=at),
                               core=tuple(core))
