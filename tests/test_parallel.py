"""train/parallel.py: every family trains to the same losses on one device, on meshes and
under pmap; FSDP splits parameter and optimizer bytes; mismatches are errors before compiling."""

import dataclasses
import functools
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import train
import zoo
from bench.moe import collective_shapes
from conftest import tiny
from train import objectives
from train.loop import main
from train.parallel import build_mesh, check_fit, make_runner, parse_mesh, rules_from
from train.step import abstract_state
from train_util import ordinary, vocab

V = vocab(128, sentinels=20)
HP = train.Hparams(learning_rate=1e-2, warmup_steps=0, total_steps=5)
STEPS, BATCH, LENGTH = 5, 8, 32
RTOL = 1e-5  # fp32; the observed differences are ~1e-7

# (mesh, parallel); one device is the reference. Plain data=8 under jit is left out here (CI
# time): it is data=2,fsdp=2,tensor=2's batch split alone, and the CLI, step and notebook tests
# run it.
PLACES = [({"data": 2, "fsdp": 2, "tensor": 2}, "jit"), ({"tensor": 8}, "jit"), ({"data": 8}, "pmap")]
# 8 heads so tensor=8 splits them; the decoder keeps 2 KV heads (GQA), which tensor=8 cannot
# split: they fall back to replication with a warning. The encoder runs the first place only
# (CI time): its attention and MLP are the decoder's zoo/nn code, which tensor=8 and pmap check
# here; ModernBERT's and ALBERT's mesh tests (test_train_modernbert, test_train_albert_distilbert)
# and test_context_parallel's encoder rows train encoders on other meshes.
FAMILIES = [("tiny-decoder", "clm", {"num_heads": 8}), ("tiny-encoder", "mlm", {"num_heads": 8}),
            ("tiny-encdec", "span_corruption", {"num_heads": 8})]


def _batches(cfg, objective, seed=0):
    """STEPS host batches of the objective on random rows (two documents per packed row)."""
    obj = train.make_objective(objective, cfg, V, LENGTH)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(STEPS):
        rows = {"tokens": ordinary(rng, (BATCH, obj.row_len), V)}
        if obj.packed:
            rows["segment_ids"] = np.where(np.arange(obj.row_len) < obj.row_len // 3, 1, 2)[None].repeat(BATCH, 0)
        out.append(jax.device_get(jax.jit(obj)(jax.random.key(i), rows)))
    return out


def _mesh(shape):
    devices = jax.devices()[:1] if shape == {"data": 1} else None
    return zoo.sharding.make_mesh(shape, devices)


def _losses(cfg, hp, host_state, batches, shape, parallel="jit"):
    """(losses of STEPS steps from `host_state` on `shape` by `parallel`, the state's
    shardings); also checks that the step donates its state and keeps its shardings."""
    runner = make_runner(cfg, hp, _mesh(shape), batches[0], parallel)
    state = runner.place(host_state)
    losses = []
    for batch in batches:
        old = state
        state, metrics = runner.step(state, jax.device_put(batch, runner.batch_sh))
        losses.append(float(metrics["loss"]))
    assert all(x.is_deleted() for x in jax.tree.leaves(old.params)), "state not donated"
    for x, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(runner.state_sh.params)):
        assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    return losses, runner.state_sh


@pytest.mark.parametrize("name,objective,overrides", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_mesh_and_pmap_give_the_one_device_losses(name, objective, overrides):
    cfg = tiny(name, **overrides)
    batches = _batches(cfg, objective)
    host = jax.device_get(train.init_state(cfg, HP, jax.random.key(0)))
    want, _ = _losses(cfg, HP, host, batches, {"data": 1})
    assert want[-1] < want[0]  # it trains
    for shape, parallel in PLACES if name != "tiny-encoder" else PLACES[:1]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, _ = _losses(cfg, HP, host, batches, shape, parallel)
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{shape} {parallel}")
        fallback = [str(w.message) for w in caught if "does not divide" in str(w.message)]
        if shape == {"tensor": 8} and cfg.num_kv_heads == 2:
            assert fallback and all("kv_heads" in m for m in fallback), fallback
        else:
            assert not fallback, fallback


# (config overrides, Hparams overrides, meshes): Mixtral-style softmax top-2 of 4 experts
# (one per device on expert=4; also with each expert's width split over tensor and its embed
# dim over fsdp), and DeepSeek-V3-style sigmoid scores with a selection bias moved by the
# global load, a shared expert and 8 experts (two per device). Without group-limited routing
# (tested in test_moe): on these random weights a token's routing with groups is a near-tie
# that the ~1e-7 rounding of a mesh flips by step 4, on the partitioner's path as on all_to_all.
MOE = {"mixtral": ({}, {}, [{"expert": 4, "data": 2}, {"expert": 2, "fsdp": 2, "tensor": 2}]),
       "deepseek": (dict(num_experts=8, router="sigmoid", router_score_bias=True, routed_scaling=2.5,
                         shared_experts=1, moe_d_ff=16),
                    dict(score_bias_rate=0.01), [{"expert": 4, "data": 2}])}


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_on_an_expert_axis_gives_the_one_device_losses(name):
    """Experts split over the `expert` mesh axis (the batch too: batch -> data, fsdp, expert),
    each device running its own experts on the assignments all_to_all brings it; the balance
    loss and the score bias's load are over the global batch."""
    overrides, hp_overrides, meshes = MOE[name]
    cfg, hp = tiny("tiny-moe", **overrides), dataclasses.replace(HP, **hp_overrides)
    batches = _batches(cfg, "clm")
    host = jax.device_get(train.init_state(cfg, hp, jax.random.key(0)))
    want, _ = _losses(cfg, hp, host, batches, {"data": 1})
    for shape in meshes:
        got, shardings = _losses(cfg, hp, host, batches, shape)
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=str(shape))
        assert shardings.params["decoder"]["layers"]["moe"]["wi"].spec[1] == "expert"


def _expert_gathers(cfg, shape):
    """The all-gathers in the compiled training step on `shape` whose result holds a whole
    layer's experts: shapes [..., E, D, F] or [..., E, F, D]."""
    batch = _batches(cfg, "clm")[0]
    runner = make_runner(cfg, HP, _mesh(shape), batch)
    abstract = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    state = jax.tree.map(abstract, abstract_state(cfg, HP), runner.state_sh)
    with zoo.sharding.use(runner.mesh, runner.rules):
        text = runner._step.lower(state, jax.tree.map(abstract, batch, runner.batch_sh)).compile().as_text()
    e, d, f = cfg.num_experts, cfg.d_model, cfg.moe_d_ff or cfg.d_ff
    return [s for _, s in collective_shapes(text, "all-gather") if s[-3:] in ((e, d, f), (e, f, d))]


def test_expert_parallel_compute_does_not_gather_the_experts():
    """On expert=4,data=2 each device keeps its own experts' weights and computes with them
    (all_to_all moves the tokens); the partitioner's path (`expert_parallel="gather"`)
    gathers every expert's weights to every device, which the check sees."""
    cfg = tiny("tiny-moe")
    assert _expert_gathers(cfg, {"expert": 4, "data": 2}) == []
    assert _expert_gathers(cfg.replace(expert_parallel="gather"), {"expert": 4, "data": 2})


def test_a_chunked_loss_on_a_sharded_mesh_gives_the_one_device_losses():
    """The loss chunks scan the sequence; the batch stays split over data, the vocabulary
    projection over tensor."""
    cfg = tiny("tiny-decoder", num_heads=8)
    batches = _batches(cfg, "clm")
    host = jax.device_get(train.init_state(cfg, HP, jax.random.key(0)))
    want, _ = _losses(cfg, HP, host, batches, {"data": 1})
    chunked = dataclasses.replace(HP, loss_chunk=LENGTH // 4)
    for shape, parallel in [({"data": 2, "fsdp": 2, "tensor": 2}, "jit"), ({"data": 8}, "pmap")]:
        got, _ = _losses(cfg, chunked, host.replace(hp=chunked), batches, shape, parallel)
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{shape} {parallel}")


def test_a_feature_encoder_trains_to_the_one_device_losses_on_a_mesh_and_under_pmap():
    """Whisper's shape (log-mel features through the conv stem, sinusoidal encoder positions,
    no key bias) under the asr objective: the same losses on a sharded mesh and under pmap."""
    cfg = tiny("tiny-encdec", num_heads=8, num_mel_bins=16, encoder_max_len=16, encoder_positions="sinusoidal",
               attn_key_bias=False)
    rng = np.random.default_rng(0)
    make = jax.jit(functools.partial(objectives.asr, start_id=0, spec_augment=(1, 3, 1, 4)))
    target = ordinary(rng, (BATCH, 12), V)
    batches = [jax.device_get(make(jax.random.key(i), {
        "features": rng.normal(size=(BATCH, 16, 32)).astype(np.float32), "target": target,
        "target_mask": np.arange(12)[None] < rng.integers(4, 13, (BATCH, 1)),
        "weights": np.ones(BATCH, np.float32)})) for i in range(3)]
    host = jax.device_get(train.init_state(cfg, HP, jax.random.key(0)))
    want, _ = _losses(cfg, HP, host, batches, {"data": 1})
    assert want[-1] < want[0]
    specs = {}
    for shape, parallel in [({"data": 2, "fsdp": 2, "tensor": 2}, "jit"), ({"data": 8}, "pmap")]:
        got, shardings = _losses(cfg, HP, host, batches, shape, parallel)
        np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{shape} {parallel}")
        specs[parallel] = shardings.params["encoder"]["stem"]["conv1"]["kernel"].spec
    assert specs["jit"] == P(None, None, "fsdp"), specs  # the stem's output channels: embed -> fsdp


def _bytes_per_device(tree):
    out = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def test_fsdp_splits_parameter_and_optimizer_bytes():
    cfg = tiny("tiny-decoder", d_model=64, d_ff=256)
    batch = _batches(cfg, "clm")[0]
    runner = make_runner(cfg, HP, _mesh({"fsdp": 8}), batch)
    state = runner.place(jax.device_get(train.init_state(cfg, HP, jax.random.key(0))))
    for part in (state.params, state.opt_state):
        total = sum(x.nbytes for x in jax.tree.leaves(part))
        per_device = _bytes_per_device(part)
        assert len(per_device) == 8
        # Everything with an `embed` axis is split eight ways; norm scales are replicated.
        assert max(per_device.values()) < total / 8 * 1.1, (total, per_device)
    mu = state.opt_state[1][0].mu["decoder"]["layers"]["mlp"]["wi"]  # clip -> adamw -> (adam, ...)
    assert mu.sharding.spec == P(None, "fsdp", None) and mu.addressable_shards[0].data.shape[1] == 64 // 8


# --- errors before compiling ------------------------------------------------------------------

def test_mesh_flags_and_rules():
    assert parse_mesh("data=2, fsdp=-1") == {"data": 2, "fsdp": -1}
    assert dict(build_mesh("data=2,tensor=-1").shape) == {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}
    assert build_mesh("fsdp=2").size == 2  # the first two devices
    for text, message in [("data=16", "needs 16 devices, 8 available"), ("model=8", "unknown axis"),
                          ("data=2,data=4", "given twice"), ("data=0", "sizes are positive"),
                          ("data=3,tensor=-1", "do not divide by 3"), ("data", "AXIS=SIZE")]:
        with pytest.raises(ValueError, match=message):
            build_mesh(text)
    rules = rules_from({"embed": None, "mlp": ["tensor", "fsdp"]})
    mesh = build_mesh("fsdp=2,tensor=4")
    assert zoo.sharding.spec_for(("embed", "mlp"), (32, 64), mesh, rules) == P(None, ("tensor", "fsdp"))
    with pytest.raises(ValueError, match="expected a mesh axis"):
        rules_from({"embed": "model"})


def test_batch_must_split_over_the_data_parallel_devices():
    mesh = build_mesh("data=2,fsdp=2,tensor=2")
    check_fit(8, mesh, zoo.sharding.DEFAULT_RULES, "jit", 1)
    with pytest.raises(ValueError, match="--batch-size 6 does not split over the 4 data-parallel"):
        check_fit(6, mesh, zoo.sharding.DEFAULT_RULES, "jit", 1)
    with pytest.raises(ValueError, match="x accum_steps 4 .* multiple of 16"):
        check_fit(8, mesh, zoo.sharding.DEFAULT_RULES, "jit", 4)
    with pytest.raises(ValueError, match="pmap is data parallel only"):
        check_fit(8, mesh, zoo.sharding.DEFAULT_RULES, "pmap", 1)
    # tensor-only meshes do not split the batch: any size fits
    check_fit(3, build_mesh("tensor=8"), zoo.sharding.DEFAULT_RULES, "jit", 1)


def test_a_batch_of_another_shape_is_refused_before_it_compiles():
    cfg = tiny("tiny-decoder")
    batch = _batches(cfg, "clm")[0]
    runner = make_runner(cfg, HP, _mesh({"data": 8}), batch)
    longer = {k: np.concatenate([v, v], axis=1) for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"inputs: \(\(8, 32\), .*\) vs \(\(8, 64\)"):
        runner.step(None, longer)


@pytest.mark.parametrize("argv,message", [
    (["--mesh", "data=16"], "needs 16 devices, 8 available"),
    (["--mesh", "data=2,expert=-1,pipeline=2"], "unknown axis ['pipeline']"),
    (["--mesh", "data=4", "--batch-size", "6"], "--batch-size 6 does not split over the 4"),
    (["--batch-size", "12"], "--batch-size 12 does not split over the 8"),  # default: data=-1
    (["--parallel", "pmap", "--mesh", "data=2,tensor=4"], "pmap is data parallel only"),
    (["--parallel", "shmap"], "parallel (--parallel): expected one of ('jit', 'pmap'), got 'shmap'"),
    (["rules={\"embed\": \"model\"}"], "rules: 'embed' -> 'model'"),
    (["--local-devices", "4"], "must take effect before JAX starts"),
    (["--num-processes", "2", "--process-id", "0"], "also give --coordinator"),
    (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id"),
])
def test_mesh_and_launch_mistakes_are_clear_errors(argv, message, tmp_path, capsys):
    jax.devices()  # JAX has started, as in any process that already ran JAX code
    assert main([*argv, "--run-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_unrolled_layers_on_a_sharded_mesh_give_the_one_device_losses():
    """Config.scan_layers=False splits the stacked (sharded) parameters layer by layer."""
    cfg = tiny("tiny-decoder", num_heads=8)
    batches = _batches(cfg, "clm")
    host = jax.device_get(train.init_state(cfg, HP, jax.random.key(0)))
    want, _ = _losses(cfg, HP, host, batches, {"data": 1})
    unrolled = cfg.replace(scan_layers=False)
    got, _ = _losses(unrolled, HP, host.replace(cfg=unrolled), batches, {"data": 2, "fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(got, want, rtol=RTOL)
