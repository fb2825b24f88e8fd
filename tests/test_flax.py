"""zoo.nnx / zoo.linen: the Flax front doors run the same pure functions as the functional API.

Parity here is bitwise (the modules call zoo.<family>.forward on the same arrays); training
through nnx.Optimizer + nnx.jit and a Linen TrainState follows train.step's losses.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import train
import zoo
from train.optim import decay_mask, make_optimizer, schedule
from train.step import state_from_params
from zoo.sharding import DEFAULT_RULES, make_mesh


def _args(cfg: zoo.Config, tokens: jax.Array, mask: jax.Array) -> tuple[tuple, dict]:
    """The family's own forward arguments."""
    if cfg.family == "encdec":
        return (tokens, tokens), {"src_mask": mask, "tgt_mask": mask}
    return (tokens,), {"mask": mask}


def _batch(cfg: zoo.Config, seed: int, b: int = 4, t: int = 8) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)  # counting rows from random starts: learnable
    toks = 3 + (rng.integers(0, cfg.vocab_size - 3, (b, 1)) + np.arange(t + 1)) % (cfg.vocab_size - 3)
    toks = toks.astype(np.int32)
    toks[0, -3:] = cfg.pad_id  # one padded row
    inputs, targets = toks[:, :-1], toks[:, 1:]
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets),
            "weights": jnp.asarray((targets != cfg.pad_id).astype(np.float32))}


def _same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder", "tiny-encdec"])
def test_nnx_and_linen_models_are_the_functional_model(name):
    cfg = zoo.preset(name)
    params = zoo.init(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 6)), jnp.int32)
    mask = jnp.arange(6)[None, :] < jnp.array([[6], [4]])
    args, kwargs = _args(cfg, tokens, mask)
    want = zoo.forward(params, cfg, *args, **kwargs)

    model = zoo.nnx.Model(cfg, rngs=nnx.Rngs(0))
    assert _same(model.params(), params)  # Rngs(0) draws zoo.init(cfg, key 0)'s values
    assert _same(model(*args, **kwargs), want)
    wrapped = zoo.nnx.Model.from_params(cfg, params)
    assert all(x is y for x, y in zip(jax.tree.leaves(wrapped.params()), jax.tree.leaves(params)))
    assert nnx.to_pure_dict(nnx.state(wrapped, nnx.Param)) == params  # the zoo tree's paths
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(wrapped, nnx.Param)))
    assert jax.tree.map(tuple, specs) == zoo.axes(cfg)

    lin = zoo.linen.Model(cfg)
    variables = lin.init(jax.random.key(0), *args, **kwargs)
    assert jax.tree.map(jnp.shape, nn.unbox(variables)["params"]) == jax.tree.map(jnp.shape, params)
    lin_specs = nn.get_partition_spec(variables)["params"]
    assert jax.tree.map(tuple, lin_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) \
        == zoo.axes(cfg)
    assert _same(lin.apply({"params": params}, *args, **kwargs), want)
    assert _same(lin.apply(variables, *args, **kwargs),
                 zoo.forward(nn.unbox(variables)["params"], cfg, *args, **kwargs))


def test_bad_input_gets_the_functional_errors_and_names_the_tree_path():
    cfg = zoo.preset("tiny-decoder")
    params = zoo.init(cfg, jax.random.key(0))
    bad = {**params, "embed": {**params["embed"], "tokens": params["embed"]["tokens"][:5]}}
    with pytest.raises(ValueError, match=r"params\['embed'\]\['tokens'\] has shape \(5, 32\), cfg expects \(128, 32\)"):
        zoo.nnx.Model.from_params(cfg, bad)
    with pytest.raises(ValueError, match=r"params\['head'\]\['kernel'\] is missing \(expected shape \(32, 128\)"):
        zoo.nnx.Model.from_params(cfg, {k: v for k, v in params.items() if k != "head"})
    with pytest.raises(ValueError, match=r"params\['pooler'\].* is not in the decoder"):
        zoo.nnx.Model.from_params(cfg, {**params, "pooler": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"apply: params\['embed'\]\['tokens'\] has shape \(5, 32\)"):
        zoo.linen.Model(cfg).apply({"params": bad}, jnp.ones((1, 4), jnp.int32))
    model = zoo.nnx.Model.from_params(cfg, params)
    tokens = jnp.ones((2, 4), jnp.int32)
    for call in (lambda f: f(tokens, tokens), lambda f: f(tokens, src_mask=tokens > 0),
                 lambda f: f(tokens.astype(jnp.float32))):
        with pytest.raises(Exception) as functional:  # an encdec call on a decoder, float tokens
            call(lambda *a, **k: zoo.decoder.forward(params, cfg, *a, **k))
        with pytest.raises(type(functional.value), match=re.escape(str(functional.value))):
            call(model)
    with pytest.raises(ValueError, match=re.escape("a decoder model does not read Inputs field(s) ['source']")):
        model.apply(zoo.Inputs(tokens, source=tokens))  # zoo.apply's check
    with pytest.raises(ValueError, match="only encoder-decoders"):
        model.encode(tokens)


def test_encdec_encode_decode_caches_and_generate_take_the_module():
    cfg = zoo.preset("tiny-encdec")
    model = zoo.nnx.Model(cfg, rngs=nnx.Rngs(1))
    params = model.params()
    src, tgt = jnp.ones((2, 5), jnp.int32) * 7, jnp.ones((2, 3), jnp.int32) * 9
    memory, _ = model.encode(src)
    assert _same(memory, zoo.encdec.encode(params, cfg, src)[0])
    assert _same(model.decode(memory, tgt), zoo.encdec.decode(params, cfg, memory, tgt))
    assert _same(zoo.linen.Model(cfg).apply({"params": params}, src, method="encode")[0], memory)
    cache, _ = model.prime_cache(model.init_cache(2, 8), src)
    assert _same(model.decode(None, tgt, cache=cache).logits,
                 zoo.encdec.decode(params, cfg, None, tgt, cache=cache).logits)

    dcfg = zoo.preset("tiny-decoder")
    dec = zoo.nnx.Model(dcfg, rngs=nnx.Rngs(0))
    out = dec(tgt, cache=dec.init_cache(2, 8))
    assert _same(out, zoo.decoder.forward(dec.params(), dcfg, tgt, cache=zoo.init_cache(dcfg, 2, 8)))
    want = zoo.generate(dec.params(), dcfg, tgt, 3)
    assert _same(zoo.generate(dec, tgt, 3), want) and _same(zoo.generate(dec, prompt=tgt, max_new_tokens=3), want)


def test_nnx_optimizer_trains_a_classifier_composed_around_the_model():
    cfg = zoo.preset("tiny-encoder")

    class Classifier(nnx.Module):
        def __init__(self, cfg: zoo.Config, rngs: nnx.Rngs):
            self.body = zoo.nnx.Model(cfg, rngs=rngs)
            self.out = nnx.Linear(cfg.d_model, 2, rngs=rngs)

        def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
            return self.out(zoo.encoder.pool(self.body(tokens, mask=mask).hidden, mask))

    clf = Classifier(cfg, nnx.Rngs(0))
    assert _same(clf.body.params(), zoo.init(cfg, jax.random.key(0)))
    opt = nnx.Optimizer(clf, optax.adamw(1e-2), wrt=nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (4, 6)), jnp.int32)
    mask, labels = tokens > 0, jnp.array([0, 1, 0, 1])

    @nnx.jit
    def step(clf: Classifier, opt: nnx.Optimizer) -> jax.Array:
        def loss_fn(clf: Classifier) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(clf(tokens, mask), labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(clf)
        opt.update(clf, grads)
        return loss

    before, head = clf.body.params(), clf.out.kernel[...]
    losses = [float(step(clf, opt)) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert not jnp.array_equal(clf.body.params()["embed"]["tokens"], before["embed"]["tokens"])
    assert not jnp.array_equal(clf.out.kernel[...], head)  # the body and the head both train


def _losses_train_step(cfg: zoo.Config, hp: train.Hparams, batches: list) -> list[float]:
    state = state_from_params(cfg, hp, zoo.init(cfg, jax.random.key(0)),
                              jax.random.key_data(jax.random.key(1)))
    out = []
    for batch in batches:
        state, metrics = train.step(state, batch)
        out.append(float(metrics["loss"]))
    return out


def _ce(logits: jax.Array, batch: dict) -> jax.Array:
    """A Flax user's weighted cross entropy (optax), what train.step reports as loss."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    return jnp.sum(ce * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


def _nnx_tx(cfg: zoo.Config, hp: train.Hparams) -> optax.GradientTransformation:
    """train's optimizer (make_optimizer) with its weight-decay mask as a function of the
    tree: nnx.Optimizer hands optax an nnx.State, which make_optimizer's dict mask does not
    match (the State flattens to the same leaves in the same order)."""
    mask = jax.tree.leaves(decay_mask(cfg))
    return optax.chain(optax.clip_by_global_norm(hp.clip_norm), optax.adamw(
        schedule(hp), b1=hp.b1, b2=hp.b2, eps=hp.eps, weight_decay=hp.weight_decay,
        mask=lambda tree: jax.tree.unflatten(jax.tree.structure(tree), mask)))


def _losses_nnx(cfg: zoo.Config, hp: train.Hparams, batches: list) -> list[float]:
    model = zoo.nnx.Model(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, _nnx_tx(cfg, hp), wrt=nnx.Param)

    @nnx.jit
    def step(model: zoo.nnx.Model, opt: nnx.Optimizer, batch: dict) -> jax.Array:
        loss_fn = lambda m: _ce(m(batch["inputs"], mask=batch["inputs"] != cfg.pad_id).logits, batch)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt, b)) for b in batches]


def _losses_linen(cfg: zoo.Config, hp: train.Hparams, batches: list) -> list[float]:
    lin = zoo.linen.Model(cfg)
    state = train_state.TrainState.create(apply_fn=lin.apply, params=zoo.init(cfg, jax.random.key(0)),
                                          tx=make_optimizer(cfg, hp))

    @jax.jit
    def step(state: train_state.TrainState, batch: dict) -> tuple:
        def loss_fn(p: dict) -> jax.Array:
            out = state.apply_fn({"params": p}, batch["inputs"], mask=batch["inputs"] != cfg.pad_id)
            return _ce(out.logits, batch)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    out = []
    for batch in batches:
        state, loss = step(state, batch)
        out.append(float(loss))
    return out


def _check_training(steps: int) -> None:
    cfg = zoo.preset("tiny-decoder")
    hp = train.Hparams(learning_rate=1e-2, warmup_steps=2, total_steps=steps)
    batches = [_batch(cfg, i) for i in range(steps)]
    want = _losses_train_step(cfg, hp, batches)
    assert want[-1] < want[0]
    np.testing.assert_allclose(_losses_nnx(cfg, hp, batches), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_losses_linen(cfg, hp, batches), want, rtol=0, atol=1e-6)


def test_nnx_optimizer_and_linen_train_state_follow_train_step():
    _check_training(3)


@pytest.mark.slow
def test_fifty_steps_through_nnx_and_linen_follow_train_step():
    _check_training(50)


def test_an_nnx_model_sharded_by_flax_logical_rules_over_8_devices():
    cfg = zoo.preset("tiny-decoder")
    model = zoo.nnx.Model(cfg, rngs=nnx.Rngs(0))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with nn.logical_axis_rules(DEFAULT_RULES):
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
    nnx.update(model, jax.device_put(nnx.state(model, nnx.Param), shardings))
    q = model.params()["decoder"]["layers"]["attn"]
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(q))
    batch = _batch(cfg, 0, b=8)
    loss_of = lambda p: _ce(zoo.decoder.forward(p, cfg, batch["inputs"]).logits, batch)
    want = jax.jit(loss_of)(zoo.init(cfg, jax.random.key(0)))

    @nnx.jit
    def sharded_loss(model: zoo.nnx.Model) -> jax.Array:
        return _ce(model(batch["inputs"]).logits, batch)

    with jax.set_mesh(mesh):
        got = sharded_loss(model)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
