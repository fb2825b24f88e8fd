"""zoo.nn.moe: the routers against a per-token numpy reference (softmax with and without
renormalisation, DeepSeek-V3's sigmoid + selection bias + groups by their best two, V2's
softmax + groups by their best one, gpt-oss's router bias and clamped SwiGLU with expert
biases, shared experts, routed scaling); the sparse dispatch (both grouped-matmul kernels)
equal to the dense reference in value and gradient; a stack with dense layers (segments)
scanned, unrolled and rematerialised alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from conftest import tiny, tokens
import zoo.flops
from zoo.nn import moe

ROUTERS = {
    "mixtral": {},
    "qwen3-no-renorm": dict(router_norm_topk=False, moe_d_ff=24),
    "deepseek-v3": dict(num_experts=8, experts_per_token=3, router="sigmoid", router_score_bias=True,
                        router_groups=4, router_topk_groups=2, routed_scaling=2.5, shared_experts=2,
                        moe_d_ff=16),
    "deepseek-v2": dict(num_experts=8, router_norm_topk=False, router_groups=4, router_topk_groups=2,
                        routed_scaling=1.5, shared_experts=1),
    "gpt-oss": dict(router_bias=True, swiglu_limit=0.3, mlp_bias=True),
}


def _layer(overrides, seed=0):
    """A tiny MoE layer's params with every tensor (biases too) random."""
    cfg = tiny("tiny-moe", **overrides)
    p = jax.tree.map(lambda a: a[0], zoo.init(cfg, jax.random.key(seed))["decoder"]["layers"]["moe"])
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    p = tree.unflatten([a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    return cfg, p


def _reference(p, x, cfg):
    """Per token, as transformers' Mixtral/Qwen3-MoE/DeepSeek/gpt-oss blocks compute it."""
    p = jax.tree.map(np.asarray, p)
    x = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    act = lambda v: v / (1 + np.exp(-v))
    out = np.zeros_like(x)
    for n, row in enumerate(x):
        logits = row @ p["router"] + p.get("router_bias", 0.0)
        scores = (np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum() if cfg.router == "softmax"
                  else 1 / (1 + np.exp(-logits)))
        choice = scores + p.get("score_bias", 0.0)
        if cfg.router_groups > 1:
            groups = choice.reshape(cfg.router_groups, -1)
            rank = (np.sort(groups, -1)[:, -2:].sum(-1) if cfg.router == "sigmoid" else groups.max(-1))
            keep = np.argsort(-rank)[:cfg.router_topk_groups]
            choice = np.where(np.isin(np.arange(cfg.router_groups), keep)[:, None], groups, -np.inf).reshape(-1)
        top = np.argsort(-choice)[:cfg.experts_per_token]
        w = scores[top] / (scores[top].sum() if cfg.router_norm_topk else 1.0) * cfg.routed_scaling
        for weight, e in zip(w, top):
            g, h = row @ p["wg"][e] + p.get("bg", [0.0] * 99)[e], row @ p["wi"][e] + p.get("bi", [0.0] * 99)[e]
            if cfg.swiglu_limit is None:
                mid = act(g) * h
            else:  # GptOssExperts._apply_gate
                g, h = np.minimum(g, cfg.swiglu_limit), np.clip(h, -cfg.swiglu_limit, cfg.swiglu_limit)
                mid = (h + 1) * g / (1 + np.exp(-1.702 * g))
            out[n] += weight * (mid @ p["wo"][e] + p.get("bo", [0.0] * 99)[e])
        if "shared" in p:
            s = p["shared"]
            out[n] += (act(row @ s["wg"]) * (row @ s["wi"])) @ s["wo"]
    return out


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_moe_layer_against_per_token_reference(name):
    cfg, p = _layer(ROUTERS[name])
    x = jax.random.normal(jax.random.key(7), (2, 5, cfg.d_model))
    y, aux = jax.jit(moe.apply_moe, static_argnums=2)(p, x, cfg.replace(grouped_matmul="tiles"))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.d_model), _reference(p, x, cfg), atol=2e-5, rtol=1e-4)
    assert np.isfinite(float(aux))


@pytest.mark.parametrize("kernel", ["tiles", "ragged"])
@pytest.mark.parametrize("name", ["deepseek-v3", "gpt-oss"])
def test_sparse_dispatch_equals_dense_in_value_and_gradient(name, kernel):
    """Dropless: the same outputs and the same gradients (weights, biases, input) as running
    every expert; 40 tokens over 4-8 experts leave some experts with more rows than a tile."""
    cfg, p = _layer(ROUTERS[name])
    x = jax.random.normal(jax.random.key(8), (4, 10, cfg.d_model))
    probe = jax.random.normal(jax.random.key(9), x.shape)

    def loss(p, x, c):
        y, aux = moe.apply_moe(p, x, c)
        return jnp.sum(y * probe) + aux

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    want = grad(p, x, cfg.replace(moe_dispatch="dense"))
    got = grad(p, x, cfg.replace(moe_dispatch="sparse", grouped_matmul=kernel))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5), got, want)


def test_tiles_cover_uneven_groups_and_empty_ones():
    """grouped_matmul's tile scan against a per-group matmul: a group far over one tile, empty
    groups, a group of one row, and 6 padding rows after the groups (zeros out: the rows an
    expert-parallel receiver was not sent), with the tile height from the rows in use."""
    sizes = jnp.array([0, 70, 1, 0, 9], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (86, 6))
    w = jax.random.normal(jax.random.key(1), (5, 6, 3))
    want = np.concatenate([np.asarray(x[a:b] @ w[g]) for g, (a, b) in
                           enumerate(zip(np.cumsum(sizes) - sizes, np.cumsum(sizes)))] + [np.zeros((6, 3))])
    for kernel, rows in (("tiles", None), ("tiles", 40), ("ragged", None)):
        np.testing.assert_allclose(moe.grouped_matmul(x, w, sizes, kernel, expected_rows=rows), want, atol=1e-5)
    assert moe.tile_rows(80, 5) == 16 and moe.tile_rows(8192, 4) == 256 and moe.tile_rows(4096, 32) == 128


def test_score_bias_moves_the_choice_not_the_weights_and_gets_no_gradient():
    cfg, p = _layer(ROUTERS["deepseek-v3"])
    logits = jax.random.normal(jax.random.key(3), (6, cfg.num_experts))
    bias = jnp.zeros(cfg.num_experts).at[5].set(10.0)  # expert 5 always chosen, by the bias alone
    r = moe.route(logits, cfg, bias)
    assert bool(jnp.all(jnp.any(r.chosen == 5, axis=-1)))
    w5 = jnp.sum(jnp.where(r.chosen == 5, r.weights, 0), -1)
    scores = jax.nn.sigmoid(logits)
    np.testing.assert_allclose(w5, scores[:, 5] / jnp.sum(jnp.take_along_axis(scores, r.chosen, -1), -1)
                               * cfg.routed_scaling, rtol=1e-6)
    g = jax.grad(lambda b: jnp.sum(moe.route(logits, cfg, b).weights))(bias)
    assert not bool(jnp.any(g))


def test_stack_with_dense_layers_runs_as_segments():
    """Layer 1 dense in a 3-layer MoE stack: segments "0", "1", "2" with their own layouts;
    scanned, unrolled and rematerialised give the same loss and gradients."""
    cfg = tiny("tiny-moe", num_layers=3, dense_layers=(1,))
    params = zoo.init(cfg, jax.random.key(0))
    layers = params["decoder"]["layers"]
    assert sorted(layers) == ["0", "1", "2"] and "mlp" in layers["1"] and "moe" in layers["2"]
    assert zoo.axes(cfg)["decoder"]["layers"]["2"]["moe"]["wi"] == ("layers", "experts", "embed", "mlp")
    toks = tokens(jax.random.key(1), 2, 12)

    def loss(p, c, remat):
        out = zoo.forward(p, c, toks, remat=remat)
        return jnp.mean(out.logits ** 2) + out.aux_loss

    step = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    want = step(params, cfg, False)
    for c, remat in ((cfg.replace(scan_layers=False), False), (cfg, "full")):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), step(params, c, remat), want)
    # The balance loss is the mean over the two MoE layers, not diluted by the dense one.
    assert 0.9 < float(jax.jit(zoo.forward, static_argnums=1)(params, cfg, toks).aux_loss) < 2.0


def test_flops_count_the_active_experts_only():
    """qwen3-30b-a3b: 2 FLOPs per active weight that multiplies (the token table is gathered,
    norms are not matmuls); a shared expert and a dense layer count whole, expert biases not."""
    cfg = zoo.preset("qwen3-30b-a3b")
    norms = 48 * (2 * 2048 + 2 * 128) + 2048
    assert zoo.flops.matmul_flops(cfg, 1) == 2 * (zoo.param_count(cfg, active=True) - 151936 * 2048 - norms)
    small = tiny("tiny-moe", num_layers=2, dense_layers=(0,), shared_experts=1, moe_d_ff=16, mlp_bias=True)
    d, v = small.d_model, small.vocab_size
    dense, shared, routed = 3 * d * small.d_ff, 3 * d * 16, 2 * 3 * d * 16  # 2 of 4 experts
    attention = 2 * (d * 4 * 8 + d * 2 * 8)  # q, o: 4 heads of 8; k, v: 2
    want = 2 * (2 * attention + dense + shared + routed + d * 4 + d * v)  # + router + head
    assert zoo.flops.matmul_flops(small, 1) == want
