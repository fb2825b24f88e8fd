"""`zoo.linen.Model`: any zoo model as a Flax Linen module, over the same pure functions.

    lin = zoo.linen.Model(cfg)
    variables = lin.init(jax.random.key(0), tokens)    # {"params": the zoo tree, boxed}
    out = lin.apply(variables, tokens, mask=mask)       # zoo.<family>.forward, its arguments
    memory, _ = lin.apply(variables, src, method="encode")   # encdec; also "decode"

Each top-level entry of the zoo tree ("embed", "decoder", ...) is one Linen param whose
leaves are `nn.LogicallyPartitioned` boxes carrying the logical axis names of `zoo.axes`, so
`nn.get_partition_spec(variables)` and `nn.logical_to_mesh_sharding(..., rules)` shard it,
and `nn.unbox(variables)["params"]` is exactly the plain zoo tree. The values come from
`zoo.init` with one key Linen derives from init's key; for the functional API's exact
values, pass `{"params": zoo.init(cfg, key)}` to `apply` (plain trees need no boxes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from zoo import encdec, model as zmodel
from zoo.config import Config
from zoo.nn import param as P
from zoo.nn.output import Output
from zoo.nnx import check_params


class Model(nn.Module):
    """A zoo model (any family) as a Linen module; see the module docstring."""

    cfg: Config

    def setup(self) -> None:
        if not isinstance(self.cfg, Config):
            raise TypeError(f"zoo.linen.Model: cfg must be a zoo.Config, got {type(self.cfg).__name__}")
        spec = zmodel.spec(self.cfg)
        # One key for the whole tree, so it is zoo.init(cfg, key)'s (per-tensor keys come
        # from each tensor's path, not from Linen's per-param rng).
        key = self.make_rng("params") if self.is_initializing() else None
        if key is None:  # apply: name the first differing leaf (Linen names only the entry)
            check_params(self.cfg, nn.unbox(self.variables.get("params", {})), "zoo.linen.Model.apply")
        dtype = jax.numpy.dtype(self.cfg.param_dtype)

        def init_fn(name: str):
            def fn(rng: jax.Array) -> Any:
                values = P.materialize({name: spec[name]}, rng if key is None else key, dtype)[name]
                return jax.tree.map(lambda x, p: nn.LogicallyPartitioned(x, p.axes), values, spec[name],
                                    is_leaf=lambda p: isinstance(p, P.Param))
            return fn

        self.tree = {name: self.param(name, init_fn(name)) for name in spec}

    def params(self) -> dict[str, Any]:
        """The plain zoo tree this module reads."""
        return dict(self.tree)

    def __call__(self, *args: Any, **kwargs: Any) -> Output:
        """`zoo.<family>.forward(params, cfg, *args, **kwargs)` -> Output."""
        return zmodel.forward(self.params(), self.cfg, *args, **kwargs)

    def encode(self, src: jax.Array, src_mask: jax.Array | None = None, **kwargs: Any
               ) -> tuple[jax.Array, jax.Array]:
        """Encoder-decoders: src [B, S] -> (memory [B, S, D], MoE loss); `zoo.encdec.encode`."""
        self._need_encdec("encode")
        return encdec.encode(self.params(), self.cfg, src, src_mask, **kwargs)

    def decode(self, memory: jax.Array | None, tgt: jax.Array, **kwargs: Any) -> Output:
        """Encoder-decoders: tgt [B, T] over memory [B, S, D] -> Output; `zoo.encdec.decode`."""
        self._need_encdec("decode")
        return encdec.decode(self.params(), self.cfg, memory, tgt, **kwargs)

    def _need_encdec(self, method: str) -> None:
        if self.cfg.family != "encdec":
            raise ValueError(f"zoo.linen.Model.{method}: only encoder-decoders have it; this model's "
                             f"cfg.family is {self.cfg.family!r} (call the model itself)")
