"""The training step (train/step.py) and optimizer (train/optim.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import train
import zoo
from train import loss as train_loss
from conftest import compiles, tiny
from train.step import forward as train_forward, loss_sums
from train_util import ordinary, small_tokenizer, shakespeare_texts, vocab

V = vocab(128, sentinels=20)
ONE = zoo.sharding.make_mesh({"data": 1}, jax.devices()[:1])


def _batch(cfg, objective="clm", b=8, t=32, seed=0):
    obj = train.make_objective(objective, cfg, V, t)
    rows = ordinary(np.random.default_rng(seed), (b, obj.row_len), V)
    seg = np.ones_like(rows)
    if obj.packed:  # two documents per row
        seg[:, obj.row_len // 3:] = 2
    return jax.jit(obj)(jax.random.key(seed), {"tokens": rows, "segment_ids": seg})


def _state(cfg, **hp):
    return train.init_state(cfg, train.Hparams(**{"warmup_steps": 0, **hp}), jax.random.key(0))


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_accumulating_k_micro_batches_equals_one_big_batch():
    cfg = tiny("tiny-decoder")
    batch = _batch(cfg, b=8)
    one, m1 = train.step(_state(cfg), batch)
    four, m4 = train.step(_state(cfg, accum_steps=4), batch)
    chex.assert_trees_all_close(one.params, four.params, atol=1e-6, rtol=0)
    for k in ("loss", "accuracy", "grad_norm", "tokens", "targets"):
        np.testing.assert_allclose(m1[k], m4[k], rtol=1e-5)


def test_steps_neither_recompile_nor_read_back_to_the_host():
    cfg = tiny("tiny-decoder")
    batches = [jax.device_put(_batch(cfg, seed=s)) for s in range(3)]
    state, _ = train.step(_state(cfg), batches[0])
    jax.block_until_ready(state)
    with compiles() as n, jax.transfer_guard("disallow"):
        for batch in batches[1:]:
            state, metrics = train.step(state, batch)
    assert n[0] == 0
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))


def test_weight_decay_skips_norms_and_biases():
    mask = train.decay_mask(tiny("tiny-encoder"))
    layer = mask["encoder"]["layers"]
    assert layer["attn"]["q"] and layer["mlp"]["wi"] and mask["embed"]["tokens"]
    assert not layer["attn_norm"]["scale"] and not layer["attn_norm"]["bias"]
    assert not layer["attn"]["q_bias"] and not layer["mlp"]["bi"] and not mask["head"]["bias"]
    assert not mask["mlm"]["norm"]["scale"] and mask["encoder"]["positions"]


def test_schedule_warms_up_then_decays():
    hp = train.Hparams(learning_rate=1.0, warmup_steps=10, total_steps=100, end_lr_ratio=0.1)
    lr = [float(train.schedule(hp)(s)) for s in (0, 5, 10, 55, 100)]
    assert lr[0] == 0 and lr[1] == pytest.approx(0.5) and lr[2] == pytest.approx(1.0)
    assert lr[3] == pytest.approx(0.55, abs=0.01) and lr[4] == pytest.approx(0.1)
    # Off the midpoint, where a linear decay differs from the cosine: the formula by hand.
    for s in (20, 32, 70, 90):
        cosine = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - 10) / 90))
        assert float(train.schedule(hp)(s)) == pytest.approx(cosine, abs=1e-6), s


def test_step_metrics_and_eval():
    cfg = tiny("tiny-decoder")
    batch = _batch(cfg)
    state, m = train.step(_state(cfg, learning_rate=1e-3, warmup_steps=2), batch)
    assert int(state.step) == 1 and float(m["learning_rate"]) == 0.0  # the first warmup step
    assert set(m) >= {"loss", "accuracy", "grad_norm", "learning_rate", "tokens"}
    assert float(m["tokens"]) == 8 * 32 and float(m["targets"]) == float(jnp.sum(batch["weights"]))
    assert float(m["loss"]) == pytest.approx(np.log(128), rel=0.05)  # random init
    ev = train.eval_step(state, batch)
    assert float(ev["perplexity"]) == pytest.approx(float(np.exp(ev["loss"])), rel=1e-5)


def test_z_loss_and_moe_balance_loss_enter_the_gradient():
    cfg = tiny("tiny-moe")
    batch = _batch(cfg)
    hp = train.Hparams(aux_weight=1.0, z_loss=1e-2)
    state = train.init_state(cfg, hp, jax.random.key(0))

    def terms(params):
        """CE (optax), z = logsumexp^2 and the model's balance loss, from the forward
        alone: none of train.loss / loss_sums (the code under test)."""
        out = train_forward(params, cfg, batch)
        logits = out.logits.astype(jnp.float32)
        w = batch["weights"]
        ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * w)
        z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * w)
        return ce / jnp.sum(w), z / jnp.sum(w), out.aux_loss

    def objective(params, aux_weight, z_loss):
        ce, z, aux = terms(params)
        return ce + z_loss * z + aux_weight * aux, (ce, z, aux)

    grad = jax.jit(jax.grad(objective, has_aux=True))
    g, (ce, z, aux) = grad(state.params, 1.0, 1e-2)
    expected = optax.tree.norm(g)
    without = optax.tree.norm(grad(state.params, 0.0, 0.0)[0])
    _, m = train.step(state, batch)  # donates state
    assert float(m["aux_loss"]) > 0.5 and float(m["z_loss"]) > 0
    for name, want in (("loss", ce), ("z_loss", z), ("aux_loss", aux)):
        np.testing.assert_allclose(m[name], want, rtol=1e-5, err_msg=name)
    # The step's gradient is that of CE + z_loss * lse^2 + aux_weight * balance loss ...
    np.testing.assert_allclose(m["grad_norm"], expected, rtol=1e-5)
    # ... and both extra terms change it.
    assert abs(float(without) - float(expected)) > 1e-4


def test_prefix_lm_training_attends_bidirectionally_over_the_prefix():
    """The step reads the batch's prefix_mask: its loss is the decoder's loss with that mask
    (optax cross entropy on zoo.decoder.forward), which differs from the causal one in value
    and gradient, and in training a prefix token sees the prefix tokens after it."""
    cfg = tiny("tiny-decoder")
    batch = _batch(cfg, "prefix_lm", b=4)
    params = zoo.init(cfg, jax.random.key(1))
    seg, prefix = batch["segment_ids"], batch["prefix_mask"]
    decoder = jax.jit(zoo.decoder.forward, static_argnums=1)
    logits = decoder(params, cfg, batch["inputs"], mask=seg > 0, segment_ids=seg,
                     positions=batch["positions"], prefix_mask=prefix).logits
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    want = float(jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"]))
    causal = {**batch, "prefix_mask": jnp.zeros_like(prefix)}  # no prefix: plain causal attention

    def loss(p, b):
        s = loss_sums(p, cfg, b, None)
        return s["ce"] / s["weight"]

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    (got, g_prefix), (plain, g_causal) = value_and_grad(params, batch), value_and_grad(params, causal)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert abs(float(got) - float(plain)) > 1e-4 and _max_diff(g_prefix, g_causal) > 1e-4

    # A row whose first document has a prefix of >= 2 tokens: its first token sees the last.
    row = int(np.argmax(np.sum(np.asarray(prefix & (seg == 1)), axis=1)))
    last = int(np.sum(np.asarray(prefix[row] & (seg[row] == 1)))) - 1
    assert last >= 1
    changed = {**batch, "inputs": batch["inputs"].at[row, last].set((batch["inputs"][row, last] + 1) % cfg.vocab_size)}
    fwd = jax.jit(lambda b: train_forward(params, cfg, b).hidden)
    assert float(jnp.abs(fwd(batch)[row, 0] - fwd(changed)[row, 0]).max()) > 1e-4


def test_bf16_compute_keeps_fp32_params_and_trains_like_fp32():
    """Five steps at lr 1e-2 (the loss falls by ~20 %, so the logits are no longer near
    uniform): bf16 compute follows fp32's losses step by step, and the bf16 forward of the
    trained model matches fp32's elementwise within a few % of the logits' spread (bf16's
    3 significant digits give ~2 %; a wrong mask, cast or scale gives ~100 %)."""
    cfg32 = tiny("tiny-decoder")
    cfg = tiny("tiny-decoder", dtype="bfloat16", param_dtype="float32")
    batch = _batch(cfg)
    state, state32 = _state(cfg, learning_rate=1e-2), _state(cfg32, learning_rate=1e-2)
    for _ in range(5):
        state, m = train.step(state, batch)
        state32, m32 = train.step(state32, batch)
        np.testing.assert_allclose(m["loss"], m32["loss"], rtol=2e-3)
    assert float(m32["loss"]) < 0.9 * np.log(128)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    fwd = jax.jit(zoo.forward, static_argnums=1)
    want = fwd(state32.params, cfg32, batch["inputs"]).logits
    got = fwd(state32.params, cfg, batch["inputs"]).logits
    assert got.dtype == jnp.bfloat16
    spread = float(jnp.std(want))
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0, atol=0.05 * spread)
    trained = fwd(state.params, cfg32, batch["inputs"]).logits  # Adam magnifies bf16 noise
    assert float(jnp.mean(jnp.abs(trained - want))) < 0.1 * spread


@pytest.mark.parametrize("remat", [True, "full", "dots", "minimal"])
def test_remat_gives_the_same_update(remat):
    cfg = tiny("tiny-decoder")
    batch = _batch(cfg)
    a, _ = train.step(_state(cfg), batch)
    b, _ = train.step(_state(cfg, remat=remat), batch)
    chex.assert_trees_all_close(a.params, b.params, atol=1e-6, rtol=0)


def test_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="remat.*'most'"):
        train.Hparams(remat="most")


def test_sharded_step_matches_one_device():
    """The pjit path: shardings from zoo.axes on a data x fsdp x tensor mesh, donated state."""
    cfg = tiny("tiny-decoder")
    hp = train.Hparams(warmup_steps=0)
    batch = _batch(cfg)
    ref, m_ref = train.step(train.create_state(cfg, hp, 0, ONE), batch)
    mesh = zoo.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = train.create_state(cfg, hp, 0, mesh)
    state_sh = train.state_shardings(state, mesh)
    batch_sh = train.batch_shardings(batch, mesh)
    assert state.params["decoder"]["layers"]["mlp"]["wi"].sharding.spec == P(None, "fsdp", "tensor")
    with zoo.sharding.use(mesh):
        out, m = train.jit_step(state_sh, batch_sh, mesh)(state, jax.device_put(batch, batch_sh))
    chex.assert_trees_all_close(out.params, ref.params, atol=1e-5, rtol=0)
    np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-5)


def test_bad_batches_are_clear_errors():
    dec, encdec = tiny("tiny-decoder"), tiny("tiny-encdec")
    with pytest.raises(ValueError, match="missing \\['decoder_inputs'\\]"):
        train.step(_state(encdec), _batch(dec))
    with pytest.raises(ValueError, match="'decoder_inputs' is for encdec"):
        train.step(_state(dec), {**_batch(dec), "decoder_inputs": jnp.zeros((8, 32), jnp.int32)})
    with pytest.raises(ValueError, match="--batch-size 8 does not split over the 1 data-parallel device x accum_steps 3"):
        train.step(_state(dec, accum_steps=3), _batch(dec))
    with pytest.raises(ValueError, match="learning_rate"):
        train.Hparams(learning_rate=-1.0)


FAMILIES = [("tiny-decoder", "clm"), ("tiny-encoder", "mlm"), ("tiny-encdec", "span_corruption"),
            pytest.param("tiny-decoder", "prefix_lm", marks=pytest.mark.slow),
            pytest.param("tiny-encdec", "denoise", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,objective", FAMILIES)
def test_each_family_overfits_one_batch(name, objective):
    """On one fixed batch of real English, 60 steps take the loss well down."""
    tok = small_tokenizer(100 if name == "tiny-encdec" else 0)
    cfg = tiny(name, vocab_size=tok.vocab.size, pad_id=0, eos_id=1, bos_id=None)
    obj = train.make_objective(objective, cfg, tok.vocab, 32)
    ids = np.concatenate(tok.encode(shakespeare_texts()[:1]))[: 8 * obj.row_len].reshape(8, -1)
    batch = jax.jit(obj)(jax.random.key(0), {"tokens": ids.astype(np.int32)})
    state = train.init_state(cfg, train.Hparams(learning_rate=1e-2, warmup_steps=5, total_steps=60,
                                                weight_decay=0.0), jax.random.key(0))
    losses = []
    for _ in range(60):
        state, m = train.step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.35 * losses[0], losses[::10]


@pytest.mark.parametrize("name,objective", [("tiny-decoder", "prefix_lm"), ("tiny-encdec", "denoise")])
def test_prefix_lm_and_denoise_train_on_tiny_shapes(name, objective):
    """The default-run counterpart of the slow real-text cases above: 8 steps on one
    4 x 16 batch at lr 1e-2 take the loss well down (the model learns what the objective's
    batch asks; a batch the model cannot read, e.g. wrong decoder inputs, would not)."""
    cfg = tiny(name)
    batch = _batch(cfg, objective, b=4, t=16)
    state = _state(cfg, learning_rate=1e-2)
    losses = []
    for _ in range(8):
        state, m = train.step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("name,objective,smoothing", [("tiny-decoder", "clm", 0.0), ("tiny-encoder", "mlm", 0.0),
                                                      ("tiny-encdec", "span_corruption", 0.1)])
def test_chunked_loss_equals_the_whole_sequence_loss_and_gradients(name, objective, smoothing):
    # smoothing: the chunked loss's own gradient of label smoothing against autodiff's
    cfg = tiny(name)
    batch = _batch(cfg, objective, b=4)
    t = batch["targets"].shape[1]
    params = zoo.init(cfg, jax.random.key(1))

    def run(chunk):
        def objective_(p):
            s = loss_sums(p, cfg, batch, None, z_loss=1e-2, chunk=chunk, label_smoothing=smoothing)
            return s["objective"], s
        return jax.jit(jax.value_and_grad(objective_, has_aux=True))(params)

    (whole, s_whole), g_whole = run(0)
    divisor = next(c for c in range(t // 2, 0, -1) if t % c == 0)
    (part, s_part), g_part = run(divisor)
    assert divisor < t
    for k in ("ce", "z", "correct", "objective", "weight"):
        np.testing.assert_allclose(s_part[k], s_whole[k], rtol=1e-5)
    chex.assert_trees_all_close(g_part, g_whole, atol=1e-5, rtol=0)


def test_a_step_with_a_chunked_loss_equals_the_whole_sequence_step():
    cfg = tiny("tiny-decoder")
    batch = _batch(cfg, b=8)
    whole, m_whole = train.step(_state(cfg, z_loss=1e-3, accum_steps=2), batch)
    part, m_part = train.step(_state(cfg, z_loss=1e-3, accum_steps=2, loss_chunk=8), batch)
    chex.assert_trees_all_close(part.params, whole.params, atol=1e-6, rtol=0)
    for k in ("loss", "accuracy", "z_loss", "grad_norm"):
        np.testing.assert_allclose(m_part[k], m_whole[k], rtol=1e-5)


def test_label_smoothing_is_optax_smoothed_cross_entropy_and_the_logged_loss_stays_plain():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)))
    w = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)
    sums = train_loss.from_logits(logits, targets, w, label_smoothing=0.1)
    want = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(targets, 11), 0.1))
    np.testing.assert_allclose(sums["objective"], jnp.sum(want * w), rtol=1e-5)
    np.testing.assert_allclose(sums["ce"], train_loss.from_logits(logits, targets, w)["ce"], rtol=1e-6)
    # the step takes the smoothed objective's gradient and logs the plain cross entropy
    cfg = tiny("tiny-decoder")
    batch = _batch(cfg, b=4)
    _, m_plain = train.step(_state(cfg), batch)
    _, m_smoothed = train.step(_state(cfg, label_smoothing=0.1), batch)
    np.testing.assert_allclose(m_smoothed["loss"], m_plain["loss"], rtol=1e-6)
    assert abs(float(m_smoothed["grad_norm"]) - float(m_plain["grad_norm"])) > 1e-3 * float(m_plain["grad_norm"])
    with pytest.raises(ValueError, match="label_smoothing"):
        train.Hparams(label_smoothing=1.0)


def test_loss_chunk_must_divide_the_target_length():
    cfg = tiny("tiny-decoder")
    batch = _batch(cfg, b=2)
    with pytest.raises(ValueError, match="loss chunk 5 must be a positive divisor"):
        loss_sums(zoo.init(cfg, jax.random.key(1)), cfg, batch, None, chunk=5)
    with pytest.raises(ValueError, match="loss_chunk"):
        train.Hparams(loss_chunk=-1)


@pytest.mark.parametrize("name,objective,remat", [("tiny-decoder", "clm", "none"),
                                                  ("tiny-decoder", "clm", "minimal"),
                                                  ("tiny-encoder", "mlm", "none"),
                                                  ("tiny-encdec", "span_corruption", "full")])
def test_unrolled_layers_give_the_scanned_loss_and_gradients(name, objective, remat):
    # Config.scan_layers=False runs the stacked parameters layer by layer (split, not sliced).
    cfg = tiny(name)
    batch = _batch(cfg, objective, b=4)
    params = zoo.init(cfg, jax.random.key(1))

    def run(c):
        def objective_(p):
            s = loss_sums(p, c, batch, jax.random.key(2), remat=remat)
            return s["objective"], s
        return jax.jit(jax.value_and_grad(objective_, has_aux=True))(params)

    (scanned, _), g_scanned = run(cfg)
    (unrolled, _), g_unrolled = run(cfg.replace(scan_layers=False))
    np.testing.assert_allclose(unrolled, scanned, rtol=1e-6)
    assert jax.tree.structure(g_unrolled) == jax.tree.structure(g_scanned)
    chex.assert_trees_all_close(g_unrolled, g_scanned, atol=1e-6, rtol=0)
