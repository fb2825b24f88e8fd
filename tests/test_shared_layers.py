"""Cross-layer parameter sharing (`Config.shared_layers`) and factorised embeddings
(`Config.embed_dim`) in the stack, for any family: a model whose layers share n parameter
sets computes what the unshared model with each set copied into its block of layers
computes, in every way the stack runs (scanned, unrolled, decoding from a cache); its
gradient is the sum over the copies; its trace does not grow with depth, and its backward
pass keeps one copy of each set, not one per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.flops import forward_flops

LAYERS, SETS = 4, 2
BLOCKS = np.array([0, 0, 1, 1])  # layer i runs set i // (LAYERS / SETS), as ALBERT groups


def _copied(params: dict, stack: str) -> dict:
    """The unshared params: each set copied into its block of layers."""
    layers = jax.tree.map(lambda a: a[BLOCKS], params[stack]["layers"])
    return {**params, stack: {**params[stack], "layers": layers}}


def _batch(vocab: int = 128, lengths=(9, 6)):
    rng = np.random.default_rng(0)
    mask = np.arange(max(lengths))[None] < np.asarray(lengths)[:, None]
    return jnp.asarray(np.where(mask, rng.integers(3, vocab, mask.shape), 0), jnp.int32), jnp.asarray(mask)


@pytest.fixture(scope="module")
def albert_like():
    cfg = zoo.preset("tiny-encoder", num_layers=LAYERS, shared_layers=SETS, embed_dim=16)
    return cfg, jax.jit(zoo.init, static_argnums=0)(cfg, jax.random.key(0))


def _loss_and_grad(tokens, mask):
    def loss(p, cfg):
        logits = zoo.forward(p, cfg, tokens, mask=mask).logits
        return jnp.mean(logits ** 2), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)


@pytest.mark.parametrize("scan", [True, False])
def test_shared_sets_compute_their_copies_and_sum_their_gradients(albert_like, scan):
    cfg, params = albert_like
    tokens, mask = _batch()
    assert params["encoder"]["layers"]["attn"]["q"].shape[0] == SETS
    assert params["embed"]["tokens"].shape == (128, 16)
    run = _loss_and_grad(tokens, mask)
    (_, got), grads = run(params, cfg.replace(scan_layers=scan))
    (_, want), copies = run(_copied(params, "encoder"), cfg.replace(shared_layers=0))
    np.testing.assert_allclose(got, want, atol=1e-5)
    summed = jax.tree.map(lambda g: jax.ops.segment_sum(g, BLOCKS, SETS), copies["encoder"]["layers"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads["encoder"]["layers"], summed)


@pytest.mark.slow  # CI time: the unrolled encoder above runs the same per-layer selection
def test_a_shared_decoder_generates_as_its_copies():
    """The decoding layout (layers unstacked over per-layer caches) runs each layer's set."""
    cfg = zoo.preset("tiny-decoder", num_layers=LAYERS, shared_layers=SETS)
    params = zoo.init(cfg, jax.random.key(1))
    prompt, mask = _batch(lengths=(5, 5))
    got = zoo.generate(params, cfg, prompt, prompt_mask=mask, max_new_tokens=4)
    want = zoo.generate(_copied(params, "decoder"), cfg.replace(shared_layers=0), prompt, prompt_mask=mask,
                        max_new_tokens=4)
    np.testing.assert_array_equal(got, want)


def _train_jaxpr(layers: int):
    cfg = zoo.preset("tiny-encoder", num_layers=layers, shared_layers=1, embed_dim=16)
    params = jax.eval_shape(lambda: zoo.init(cfg, jax.random.key(0)))
    tokens, mask = _batch()
    loss = lambda p: jnp.mean(zoo.forward(p, cfg, tokens, mask=mask).logits ** 2)
    return jax.make_jaxpr(jax.grad(loss))(params)


def _equations(jaxpr) -> list[str]:
    """The primitive of every equation, nested programs (scan bodies) included."""
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _equations(inner)
    return out


def test_the_trace_does_not_grow_with_depth():
    """Compile time flat in depth: the training program at 16 layers has the equations of
    the one at 4 (one layer in a scan), only the trip counts differ."""
    small, deep = _train_jaxpr(LAYERS), _train_jaxpr(4 * LAYERS)
    assert _equations(small.jaxpr) == _equations(deep.jaxpr)
    assert len(_equations(small.jaxpr)) > 100


def test_the_backward_keeps_one_copy_of_each_set(albert_like):
    """A weight a layer reads from its set would be saved once per layer if the scan sliced
    it by index; blocks of layers over a fixed set save it once per set."""
    cfg, params = albert_like
    tokens, mask = _batch()
    _, backward = jax.vjp(lambda p: jnp.mean(zoo.forward(p, cfg, tokens, mask=mask).logits ** 2), params)
    saved = {tuple(r.shape) for r in jax.tree.leaves(backward)}
    for w in jax.tree.leaves(params["encoder"]["layers"]):
        if w.ndim > 2:  # matrices (a bias could share its shape with an activation)
            assert (LAYERS, *w.shape[1:]) not in saved, w.shape


def test_model_flops_count_every_layer_that_runs():
    """MFU counts the work done: a shared set runs once per layer of its block, and the
    factorised embeddings' tied head projects from their width."""
    cfg = zoo.preset("albert-base-v2")
    assert forward_flops(cfg, 128) == forward_flops(cfg.replace(shared_layers=0), 128)
    # The tied table [V, 128] costs what an untied [128, V] head does.
    assert forward_flops(cfg, 128) == forward_flops(cfg.replace(tie_embeddings=False), 128)
