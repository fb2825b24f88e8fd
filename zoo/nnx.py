"""`zoo.nnx.Model`: any zoo model as a Flax NNX module, over the same pure functions.

    model = zoo.nnx.Model(cfg, rngs=nnx.Rngs(0))       # = zoo.init(cfg, jax.random.key(0))
    model = zoo.nnx.Model.from_params(cfg, params)     # wraps a tree (e.g. load_hf), no copy
    out = model(tokens, mask=mask)                     # zoo.<family>.forward, its arguments
    params = model.params()                            # the plain zoo tree, no copy
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

The module holds the zoo tree as `nnx.Param`s under the tree's own top-level names
(`model.embed`, `model.decoder`, ...), so `nnx.state(model, nnx.Param)` has the zoo tree's
paths. Every call reads the arrays back out and runs the family's functional forward: the
math lives once, in zoo/{encoder,decoder,encdec}.py. Each Param carries its logical axis
names (`zoo.axes`) as `out_sharding` metadata, so `nnx.get_partition_spec` under Flax's
logical-axis rules (`flax.linen.logical_axis_rules(zoo.sharding.DEFAULT_RULES)`) shards it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zoo import encdec, model as zmodel
from zoo.config import Config
from zoo.nn.cache import Cache, init as init_cache
from zoo.nn.output import Output


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def check_params(cfg: Config, params: Any, where: str) -> None:
    """Raises ValueError naming the first path where `params` differs from `cfg`'s tree
    (a missing or extra entry, or another shape), with both shapes. `where`: the caller's
    name for the message."""
    if not isinstance(cfg, Config):
        raise TypeError(f"{where}: cfg must be a zoo.Config, got {type(cfg).__name__}")
    expected = jax.eval_shape(lambda: zmodel.init(cfg, jax.random.key(0)))
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    if not isinstance(params, dict):
        raise TypeError(f"{where}: params must be a nested dict of arrays, got {type(params).__name__}")
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path in sorted(set(want) | set(got), key=jax.tree_util.keystr):
        name = f"params{jax.tree_util.keystr(path)}"
        if path not in got:
            raise ValueError(f"{where}: {name} is missing (expected shape {want[path].shape} for "
                             f"{cfg.family} cfg)")
        if path not in want:
            raise ValueError(f"{where}: {name} (shape {jnp.shape(got[path])}) is not in the {cfg.family} "
                             f"cfg's tree")
        if tuple(jnp.shape(got[path])) != want[path].shape:
            raise ValueError(f"{where}: {name} has shape {tuple(jnp.shape(got[path]))}, cfg expects "
                             f"{want[path].shape}")


def first_key(stream: nnx.RngStream) -> jax.Array:
    """The stream's next key, its first draw being the seed key itself, so that
    `Model(cfg, rngs=nnx.Rngs(s))` has exactly `zoo.init(cfg, jax.random.key(s))`'s values;
    later draws are the stream's usual fold_in(key, count) and never repeat it."""
    base, count = stream.key[...], stream.count[...]
    stream()  # advance the count: the next consumer of the stream gets another key
    data = jnp.where(count == 0, jax.random.key_data(base),
                     jax.random.key_data(jax.random.fold_in(base, count)))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(base))


class Model(nnx.Module):
    """A zoo model (any family) as an NNX module; see the module docstring.

    cfg: the model's Config (static). rngs: draws the initial parameters (`rngs.params`);
    params: an existing zoo tree to wrap instead (`from_params`)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs | None = None, params: dict | None = None):
        if (rngs is None) == (params is None):
            raise ValueError("zoo.nnx.Model: pass exactly one of rngs= (fresh init) and params= "
                             "(use Model.from_params)")
        if params is None:
            if not isinstance(cfg, Config):
                raise TypeError(f"zoo.nnx.Model: cfg must be a zoo.Config, got {type(cfg).__name__}")
            params = zmodel.init(cfg, first_key(rngs.params))
        else:
            check_params(cfg, params, "zoo.nnx.Model.from_params")
        self.cfg = cfg
        self._names = tuple(params)  # the tree's top-level names, in order (static)
        axes = zmodel.axes(cfg)
        for name in self._names:
            # eager_sharding=False: wrapping never moves or copies the arrays.
            boxed = jax.tree.map(lambda x, a: nnx.Param(x, out_sharding=a, eager_sharding=False),
                                 params[name], axes[name], is_leaf=_is_axes)
            setattr(self, name, nnx.data(boxed))

    @classmethod
    def from_params(cls, cfg: Config, params: dict) -> Model:
        """Wraps an existing zoo tree (zoo.init, load_hf, a checkpoint) without copying it.
        A tree that does not match cfg is a ValueError naming the first differing path and
        its shapes."""
        return cls(cfg, params=params)

    def params(self) -> dict[str, Any]:
        """The plain zoo tree of the current values (the same arrays, not copies)."""
        return {name: jax.tree.map(lambda v: v.get_value(), getattr(self, name),
                                   is_leaf=lambda v: isinstance(v, nnx.Variable))
                for name in self._names}

    def __call__(self, *args: Any, **kwargs: Any) -> Output:
        """`zoo.<family>.forward(params, cfg, *args, **kwargs)` -> Output: tokens [B, T] and
        mask=, positions=, cache=, ... for encoders and decoders; src [B, S], tgt [B, T],
        src_mask=, tgt_mask= for encdec."""
        return zmodel.forward(self.params(), self.cfg, *args, **kwargs)

    def apply(self, inputs: zmodel.Inputs, **kwargs: Any) -> Output:
        """`zoo.apply` on a `zoo.Inputs` record (any family); kwargs: key, remat, cache."""
        return zmodel.apply(self.params(), self.cfg, inputs, **kwargs)

    def encode(self, src: jax.Array, src_mask: jax.Array | None = None, **kwargs: Any
               ) -> tuple[jax.Array, jax.Array]:
        """Encoder-decoders: src [B, S] -> (memory [B, S, D], MoE loss); `zoo.encdec.encode`."""
        self._need_encdec("encode")
        return encdec.encode(self.params(), self.cfg, src, src_mask, **kwargs)

    def decode(self, memory: jax.Array | None, tgt: jax.Array, **kwargs: Any) -> Output:
        """Encoder-decoders: tgt [B, T] over memory [B, S, D] (or a primed cache=) ->
        Output; `zoo.encdec.decode`, its keyword arguments."""
        self._need_encdec("decode")
        return encdec.decode(self.params(), self.cfg, memory, tgt, **kwargs)

    def prime_cache(self, cache: Cache, src: jax.Array, src_mask: jax.Array | None = None
                    ) -> tuple[Cache, jax.Array]:
        """Encoder-decoders: runs the encoder once into `cache` -> (cache, memory [B, S, D])."""
        self._need_encdec("prime_cache")
        return encdec.prime_cache(self.params(), self.cfg, cache, src, src_mask)

    def init_cache(self, batch: int, length: int, **kwargs: Any) -> Cache:
        """An empty decoding cache for `batch` rows and `length` tokens (`zoo.init_cache`),
        which `model(tokens, cache=cache)` (decoders) or `decode` (encdec) continue."""
        if self.cfg.family == "encoder":
            raise ValueError("zoo.nnx.Model.init_cache: an encoder model has no cache")
        return init_cache(self.cfg, batch, length, **kwargs)

    def _need_encdec(self, method: str) -> None:
        if self.cfg.family != "encdec":
            raise ValueError(f"zoo.nnx.Model.{method}: only encoder-decoders have it; this model's "
                             f"cfg.family is {self.cfg.family!r} (call the model itself)")
