"""The three families: causality, bidirectionality, padding, packing, scan == loop, and
every transformation (jit, grad, vmap, pmap) in fp32 and bf16."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.nn.transformer import apply_layer, layer_kinds, run_stack, self_context
from conftest import encode, forward, run, tiny, tokens

KEY = jax.random.key(0)


def _decoder_logits(params, cfg, toks):
    """Logits of whatever side is causal: the decoder, or encdec's decoder side."""
    if cfg.family == "encdec":
        src = tokens(jax.random.key(9), toks.shape[0], 7)
        return forward(params, cfg, src, toks).logits
    return forward(params, cfg, toks).logits


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-encdec", "tiny-moe"])
def test_causal(name):
    cfg = tiny(name)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(1), 2, 12)
    t = 5
    changed = toks.at[:, t + 1:].set((toks[:, t + 1:] + 7) % cfg.vocab_size)
    a, b = _decoder_logits(params, cfg, toks), _decoder_logits(params, cfg, changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_causal_by_gradient():
    """d logits[t] / d embedding[s] is zero for every s > t."""
    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(1), 1, 8)

    def logit_at(t):
        def f(embed):
            p = {**params, "embed": {**params["embed"], "tokens": embed}}
            return forward(p, cfg, toks).logits[0, t].sum()
        return f

    for t in (0, 3, 6):
        g = jax.grad(logit_at(t))(params["embed"]["tokens"])
        future = set(np.asarray(toks[0, t + 1:]).tolist()) - set(np.asarray(toks[0, : t + 1]).tolist())
        for token in future:
            assert float(jnp.abs(g[token]).max()) == 0.0


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-encdec"])
def test_bidirectional(name):
    cfg = tiny(name)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(1), 2, 10)
    changed = toks.at[:, -1].set((toks[:, -1] + 1) % cfg.vocab_size)
    if name == "tiny-encoder":
        a = forward(params, cfg, toks).hidden
        b = forward(params, cfg, changed).hidden
    else:
        a = encode(params, cfg, toks)[0]
        b = encode(params, cfg, changed)[0]
    assert not np.allclose(a[:, 0], b[:, 0])


def test_padding_changes_nothing_for_real_tokens(tiny_name):
    cfg = tiny(tiny_name)
    params = zoo.init(cfg, KEY)
    real = tokens(jax.random.key(1), 2, 7)
    padded = jnp.concatenate([real, tokens(jax.random.key(2), 2, 5)], axis=1)
    mask = jnp.arange(12)[None] < 7
    mask = jnp.broadcast_to(mask, (2, 12))
    if cfg.family == "encdec":
        tgt = tokens(jax.random.key(3), 2, 4)
        a = forward(params, cfg, real, tgt).logits
        b = forward(params, cfg, padded, tgt, src_mask=mask).logits
        np.testing.assert_allclose(a, b, atol=1e-5)
        return
    a = run(params, cfg, real).logits
    b = run(params, cfg, padded, mask=mask).logits[:, :7]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_left_padding_matches_unpadded_decoder():
    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, KEY)
    real = tokens(jax.random.key(1), 1, 6)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), real], axis=1)
    mask = jnp.arange(9)[None] >= 3
    a = forward(params, cfg, real).logits
    b = forward(params, cfg, padded, mask=mask).logits[:, 3:]
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-decoder", "tiny-encoder"])
def test_packed_segments_equal_separate_rows(name):
    cfg = tiny(name)
    params = zoo.init(cfg, KEY)
    a, b = tokens(jax.random.key(1), 1, 5), tokens(jax.random.key(2), 1, 7)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    out = forward(params, cfg, packed, segment_ids=segments, positions=pos).logits
    np.testing.assert_allclose(out[:, :5], forward(params, cfg, a).logits, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], forward(params, cfg, b).logits, atol=1e-5)


def test_sliding_window_limits_what_a_layer_sees():
    cfg = tiny("tiny-decoder", num_layers=1, sliding_window=3)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(1), 1, 10)
    changed = toks.at[:, 0].set((toks[:, 0] + 1) % cfg.vocab_size)
    a = forward(params, cfg, toks).logits
    b = forward(params, cfg, changed).logits
    assert not np.allclose(a[:, 2], b[:, 2])  # token 0 is inside position 2's window
    np.testing.assert_array_equal(a[:, 3:], b[:, 3:])  # and outside every later one


def test_prefix_mask_makes_the_prefix_bidirectional():
    cfg = tiny("tiny-decoder")
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(1), 1, 8)
    prefix = jnp.arange(8)[None] < 4
    changed = toks.at[:, 3].set((toks[:, 3] + 1) % cfg.vocab_size)
    a = forward(params, cfg, toks, prefix_mask=prefix).logits
    b = forward(params, cfg, changed, prefix_mask=prefix).logits
    assert not np.allclose(a[:, 0], b[:, 0])  # position 0 sees the prefix's end
    changed = toks.at[:, 5].set((toks[:, 5] + 1) % cfg.vocab_size)
    b = forward(params, cfg, changed, prefix_mask=prefix).logits
    np.testing.assert_array_equal(a[:, :5], b[:, :5])  # the rest stays causal


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope", "alibi", "relative", "none"])
def test_every_position_scheme_encodes_order(positions):
    """Swapping two earlier tokens changes the last position's output iff positions count."""
    cfg = tiny("tiny-decoder", positions=positions, num_layers=1)
    params = zoo.init(cfg, KEY)
    # Sharpen attention so position effects stand far above float noise.
    stack = params["decoder"]
    stack["layers"]["attn"] = {k: v * 30 for k, v in stack["layers"]["attn"].items()}
    if "rel_bias" in stack:
        stack["rel_bias"] = stack["rel_bias"] * 100
    toks = tokens(jax.random.key(1), 1, 6)
    swapped = toks.at[:, 0].set(toks[:, 1]).at[:, 1].set(toks[:, 0])
    a = forward(params, cfg, toks).logits[0, -1]
    b = forward(params, cfg, swapped).logits[0, -1]
    assert bool(jnp.isfinite(a).all())
    if positions == "none":
        np.testing.assert_allclose(a, b, atol=1e-5)
    else:
        assert float(jnp.abs(a - b).max()) > 1e-3  # 'none' differs by ~1e-7


def test_scan_equals_python_loop(tiny_name):
    cfg = tiny(tiny_name, num_layers=3)
    params = zoo.init(cfg, KEY)
    stack_name = "decoder" if cfg.family == "decoder" else "encoder"
    stack = params[stack_name]
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    ctx = self_context(stack, cfg, pos, causal=cfg.family == "decoder", valid=None)
    x = jax.random.normal(jax.random.key(2), (2, 9, cfg.d_model))
    scanned, _, _ = run_stack({"layers": stack["layers"]}, x, ctx, cfg)
    looped = x
    for i, kind in enumerate(layer_kinds(cfg, 3)):
        looped, _, _ = apply_layer(jax.tree.map(lambda a: a[i], stack["layers"]), looped, kind, ctx, cfg)
    np.testing.assert_allclose(scanned, looped, atol=1e-5)


# A pattern of 3 over 5 layers: the kinds do not line up with the depth.
PATTERN = dict(num_layers=5, layer_pattern=("local", "local", "global"), sliding_window=3,
               local_rope_theta=100.0)


def test_a_patterned_stack_scans_as_a_python_loop_over_its_kinds():
    cfg = tiny("tiny-decoder", **PATTERN)
    stack = zoo.init(cfg, KEY)["decoder"]
    kinds = layer_kinds(cfg, cfg.num_layers)
    assert [k.attention for k in kinds] == ["local", "local", "global", "local", "local"]
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    ctx = self_context(stack, cfg, pos, causal=True, valid=None)
    assert sorted(ctx.attention) == ["global", "local"]
    x = jax.random.normal(jax.random.key(2), (2, 9, cfg.d_model))
    scanned, _, _ = run_stack({"layers": stack["layers"]}, x, ctx, cfg)
    unrolled, _, _ = run_stack({"layers": stack["layers"]}, x, ctx, cfg.replace(scan_layers=False))
    looped = x
    for i, kind in enumerate(kinds):
        looped, _, _ = apply_layer(jax.tree.map(lambda a: a[i], stack["layers"]), looped, kind, ctx, cfg)
    np.testing.assert_allclose(scanned, looped, atol=1e-5)
    np.testing.assert_allclose(unrolled, looped, atol=1e-5)
    # The kinds differ: all-global layers give other numbers.
    one_kind = cfg.replace(layer_pattern=("global",))
    other, _, _ = run_stack({"layers": stack["layers"]}, x, self_context(stack, one_kind, pos, causal=True,
                                                                          valid=None), one_kind)
    assert float(jnp.max(jnp.abs(other - looped))) > 1e-3


@pytest.mark.parametrize("pattern", [("local", "local", "global"), ("global",)])
def test_the_scan_costs_the_backward_no_second_copy_of_the_weights(pattern):
    """A scanned stack reads its [L, ...] weights as they are: its compiled gradient needs
    about the temp memory of the same stack unrolled (a reshape into periods, or slicing,
    held a second copy of the weights and their gradients)."""
    def temp_bytes(cfg):
        params = jax.eval_shape(lambda: zoo.init(cfg, KEY))
        loss = lambda p, t: jnp.mean(zoo.forward(p, cfg, t).logits ** 2)
        toks = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        return jax.jit(jax.grad(loss)).lower(params, toks).compile().memory_analysis().temp_size_in_bytes

    cfg = tiny("tiny-decoder", d_model=128, d_ff=512, **{**PATTERN, "num_layers": 6, "layer_pattern": pattern})
    weights = sum(a.size * 4 for a in jax.tree.leaves(jax.eval_shape(lambda: zoo.init(cfg, KEY))))
    assert temp_bytes(cfg) < temp_bytes(cfg.replace(scan_layers=False)) + weights / 4


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_applies_on_every_path(scan_layers):
    """remat reaches the layers whether they are scanned, unrolled, or patterned."""
    cfg = tiny("tiny-decoder", scan_layers=scan_layers, **PATTERN)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(1), 2, 8)
    loss = lambda p, remat: jnp.mean(zoo.forward(p, cfg, toks, remat=remat).logits ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, "full"))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= (1 if scan_layers else cfg.num_layers)
    assert "checkpoint[" not in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, False))
    chex.assert_trees_all_close(jax.grad(loss)(params, "full"), jax.grad(loss)(params, False), atol=1e-6)


# bf16 for the decoder in CI; the other families' bf16 runs with -m slow (CI time: their fp32
# runs and tests/test_train_step.py's bf16 training cover the same code).
@pytest.mark.parametrize("name,dtype", [
    pytest.param(n, d, marks=pytest.mark.slow) if d == "bfloat16" and n != "tiny-decoder" else (n, d)
    for d in ("float32", "bfloat16") for n in ("tiny-encoder", "tiny-decoder", "tiny-encdec", "tiny-moe")])
def test_transformations(name, dtype):
    cfg = tiny(name, dtype=dtype)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(1), 8, 8)

    def loss(p, t):
        out = run(p, cfg, t)
        return jnp.mean(out.logits.astype(jnp.float32) ** 2) + out.aux_loss

    jitted = jax.jit(lambda p, t: run(p, cfg, t).logits)(params, toks)
    assert jitted.dtype == jnp.dtype(dtype) and bool(jnp.isfinite(jitted.astype(jnp.float32)).all())
    grads = jax.jit(jax.grad(loss))(params, toks)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # Every transformation against the fp32 logits, elementwise: bf16 (3 significant
    # digits) stays within ~3 % of the logits' spread; a wrong mask or cast is ~100 % off.
    want = jitted if dtype == "float32" else jax.jit(
        lambda p, t: run(p, cfg.replace(dtype="float32"), t).logits)(params, toks)
    atol = 1e-4 if dtype == "float32" else 0.1 * float(jnp.std(want))
    np.testing.assert_allclose(jitted.astype(jnp.float32), want, rtol=0, atol=atol)
    vmapped = jax.jit(jax.vmap(lambda t: run(params, cfg, t[None]).logits[0]))(toks)
    np.testing.assert_allclose(vmapped.astype(jnp.float32), want, rtol=0, atol=atol)
    # One shard per device: 8 on the CPU test mesh, 1 on a single accelerator.
    shards = math.gcd(8, jax.local_device_count())
    pmapped = jax.pmap(lambda t: run(params, cfg, t).logits)(toks.reshape(shards, 8 // shards, 8))
    np.testing.assert_allclose(pmapped.reshape(jitted.shape).astype(jnp.float32), want, rtol=0, atol=atol)


def test_pure_and_deterministic(tiny_name):
    """The forward leaves its params untouched, and eager dispatch, a freshly traced jit and
    a second call of it agree: no hidden state, no dependence on the cached program."""
    cfg = tiny(tiny_name)
    params = zoo.init(cfg, KEY)
    before = jax.tree.map(np.array, params)  # host copies
    toks = tokens(jax.random.key(1), 2, 6)
    tgt = (toks[:, :3],) if cfg.family == "encdec" else ()
    eager = zoo.forward(params, cfg, toks, *tgt).logits
    fresh = jax.jit(lambda p, t: zoo.forward(p, cfg, t, *tgt).logits)  # a new trace, compiled now
    first = fresh(params, toks)
    chex.assert_trees_all_equal(first, fresh(params, toks))
    chex.assert_trees_all_close(eager, first, atol=1e-5, rtol=0)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), before)


def test_dropout_needs_a_key(tiny_name):
    cfg = tiny(tiny_name, dropout=0.5)
    params = zoo.init(cfg, KEY)
    toks = tokens(jax.random.key(1), 2, 6)
    plain = run(params, cfg, toks).logits
    np.testing.assert_array_equal(plain, run(params, cfg, toks).logits)
    a = run(params, cfg, toks, key=jax.random.key(3)).logits
    assert not np.allclose(a, plain)
    np.testing.assert_array_equal(a, run(params, cfg, toks, key=jax.random.key(3)).logits)


def _perturbed(tree, seed: int):
    """tree + N(0, 0.5): biases and norms leave their trivial init, so a swapped or skipped
    tensor changes the numbers."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + 0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def test_encoder_pooler_and_heads():
    """zoo.heads.apply against the heads written out in numpy: BERT's pooler (tanh dense on
    the first token) then a linear layer, RoBERTa's own dense+tanh on the first token when
    the encoder has no pooler, and a per-token linear layer."""
    dense = lambda x, p: np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    toks = tokens(jax.random.key(1), 3, 6)
    cfg = tiny("tiny-encoder")
    params = _perturbed(zoo.init(cfg, KEY), 1)
    out = forward(params, cfg, toks)
    chex.assert_shape(out.pooled, (3, cfg.d_model))
    pooled = np.tanh(dense(np.asarray(out.hidden)[:, 0], params["pooler"]))
    chex.assert_trees_all_close(out.pooled, pooled, atol=1e-5, rtol=0)
    seq = _perturbed(zoo.heads.init(cfg, jax.random.key(2), num_labels=5), 2)
    got = zoo.heads.apply(seq, cfg, out)
    chex.assert_shape(got, (3, 5))
    chex.assert_trees_all_close(got, dense(pooled, seq.params["out"]), atol=1e-5, rtol=0)
    tok = _perturbed(zoo.heads.init(cfg, jax.random.key(2), num_labels=4, kind="token"), 3)
    got = zoo.heads.apply(tok, cfg, out)
    chex.assert_shape(got, (3, 6, 4))
    chex.assert_trees_all_close(got, dense(out.hidden, tok.params["out"]), atol=1e-5, rtol=0)

    nopool = tiny("tiny-encoder", pooler=False)
    head = _perturbed(zoo.heads.init(nopool, jax.random.key(2), num_labels=2), 4)
    assert "dense" in head.params
    out = forward(zoo.init(nopool, KEY), nopool, toks)
    assert out.pooled is None
    want = dense(np.tanh(dense(np.asarray(out.hidden)[:, 0], head.params["dense"])), head.params["out"])
    chex.assert_trees_all_close(zoo.heads.apply(head, nopool, out), want, atol=1e-5, rtol=0)


def test_bf16_compute_keeps_fp32_params():
    cfg = tiny("tiny-decoder", dtype="bfloat16", param_dtype="float32")
    params = zoo.init(cfg, KEY)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = forward(params, cfg, tokens(jax.random.key(1), 2, 5))
    assert out.logits.dtype == jnp.bfloat16 and out.hidden.dtype == jnp.bfloat16
