"""The training step: one jitted `step(state, batch)` for every family and objective.

The state is a pytree (`TrainState`: params, opt_state, step, rng) whose static fields carry
the model `Config` and the `Hparams`, so the one jitted function specialises per model
without closures. Loss = weighted cross entropy (fp32 logsumexp) + z_loss * lse^2 + the MoE
balance loss. Gradients of k micro-batches are summed in a `lax.scan` and normalised by the
weight of the whole batch, so k micro-batches give the update of one k-times batch.

Fine-tuning plugs in as one more objective of the same step: a state made with `task` (a
`zoo.heads.Head` without params, static) holds the head's params under params["task_head"],
and the loss is the cross entropy of the head's logits against one label per row (batch
targets and weights [B]; train.objectives.classify).

Sharded use (the pjit path): build shardings with `state_shardings`/`batch_shardings` and
`jit_step(state_sh, batch_sh)`; call it under `zoo.sharding.use(mesh)` so activations are
constrained by their logical names. The pmap path (`pmap_step`) runs the same gradient and
update code per device with `pmean` of the gradients. `train.parallel` wraps both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import zoo
from train import balance, loss
from train import lora
from train.lora import LORA
from train.optim import TASK_HEAD, Hparams, lora_targets, make_optimizer, param_axes, schedule
from zoo.nn.param import materialize

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
PMAP_AXIS = "data"  # the axis name of the pmap path's collectives

_REQUIRED = {"decoder": ("inputs", "targets", "weights"),
             "encoder": ("inputs", "targets", "weights"),
             "encdec": ("inputs", "decoder_inputs", "targets", "weights")}


@flax.struct.dataclass
class TrainState:
    """params: model pytree; opt_state: optax state; step: int32 []; rng: uint32 [2]
    (raw key data, so checkpoints store a plain array). cfg and hp are static; task: a
    fine-tuning head's static part (`zoo.heads.Head` with params None; its params are
    params["task_head"]) or None."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    cfg: zoo.Config = flax.struct.field(pytree_node=False)
    hp: Hparams = flax.struct.field(pytree_node=False)
    task: Any = flax.struct.field(pytree_node=False, default=None)

    @property
    def head(self) -> zoo.heads.Head | None:
        """The task head with its current params (None without a task)."""
        return None if self.task is None else task_head(self.task, self.params)


def task_head(task: zoo.heads.Head, params: dict) -> zoo.heads.Head:
    """The static `task` with the head params of a state's `params`."""
    return dataclasses.replace(task, params=params[TASK_HEAD])


def static_task(head: zoo.heads.Head) -> zoo.heads.Head:
    """A head's static part (what TrainState.task holds): hashable, no arrays."""
    return dataclasses.replace(head, params=None)


def init_state(cfg: zoo.Config, hp: Hparams, key: jax.Array, task: Any = None) -> TrainState:
    """Fresh params (`zoo.init`, and a random head for `task`), optimizer state, step 0.
    Runs under jit/eval_shape."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    k_params, k_rng, k_head = jax.random.split(jax.random.wrap_key_data(key), 3)
    params = zoo.init(cfg, k_params)
    if task is not None:
        head_spec = zoo.heads.spec(cfg, task.outputs, task.recipe)
        params = {**params, TASK_HEAD: materialize(head_spec, k_head, jnp.dtype(cfg.param_dtype))}
    return state_from_params(cfg, hp, params, jax.random.key_data(k_rng), task)


def state_from_params(cfg: zoo.Config, hp: Hparams, params: Any, rng: jax.Array,
                      task: Any = None) -> TrainState:
    """A state at step 0 over given params (a pretrained body, with params["task_head"] for
    `task`): a fresh optimizer state. rng: uint32 [2] raw key data. Runs under jit."""
    if not isinstance(hp, Hparams):
        raise TypeError(f"init_state: hp must be train.Hparams, got {type(hp).__name__}")
    if (task is not None) != (isinstance(params, dict) and TASK_HEAD in params):
        raise ValueError(f"state: params must hold {TASK_HEAD!r} exactly when a task is given")
    if hp.lora_rank and LORA not in params:  # fresh adapters (W' = W) over the given weights
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), 7)
        params = {**params, LORA: lora.init(params, zoo.axes(cfg), lora_targets(hp), hp.lora_rank, key)}
    opt_state = make_optimizer(cfg, hp, task).init(params)
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                      rng=rng, cfg=cfg, hp=hp, task=task)


def check_batch(cfg: zoo.Config, batch: Batch) -> None:
    """Trace-time check: the keys the family needs, int tokens, matching [B, T] shapes."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch: expected a dict of arrays, got {type(batch).__name__}")
    missing = [k for k in _REQUIRED[cfg.family] if k not in batch]
    if missing:
        raise ValueError(f"batch: the {cfg.family} family needs {list(_REQUIRED[cfg.family])}; "
                         f"missing {missing} (is the objective meant for another family?)")
    if cfg.family != "encdec" and "decoder_inputs" in batch:
        raise ValueError(f"batch: 'decoder_inputs' is for encdec models, the model is {cfg.family}")
    tgt = batch["targets"]
    if batch["weights"].shape != tgt.shape:
        raise ValueError(f"batch['weights']: expected shape {tgt.shape} (as targets), "
                         f"got {batch['weights'].shape}")
    for name in ("inputs", "targets", "decoder_inputs"):
        if name == "inputs" and cfg.num_mel_bins is not None:  # float features (Whisper), checked by the model
            continue
        if name in batch and not jnp.issubdtype(batch[name].dtype, jnp.integer):
            raise ValueError(f"batch[{name!r}]: expected integer token ids, got {batch[name].dtype}")


def forward(params: Any, cfg: zoo.Config, batch: Batch, key: jax.Array | None = None,
            remat: bool | str = False) -> zoo.Output:
    """The model's forward (`zoo.apply`) on a batch dict."""
    return zoo.apply(params, cfg, model_inputs(cfg, batch), key=key, remat=remat)


def model_inputs(cfg: zoo.Config, batch: Batch) -> zoo.Inputs:
    """A batch dict as `zoo.Inputs`. Seq2seq batches hold the source in `inputs` and the
    shifted target in `decoder_inputs`; packed rows carry segment_ids (0: padding)."""
    inputs = batch["inputs"]
    if "decoder_inputs" in batch:  # a feature encoder reads every frame: no source mask
        mask = None if cfg.num_mel_bins is not None else inputs != cfg.pad_id
        return zoo.Inputs(batch["decoder_inputs"], source=inputs, source_mask=mask)
    seg = batch.get("segment_ids")
    return zoo.Inputs(inputs, mask=seg > 0 if seg is not None else inputs != cfg.pad_id,
                      positions=batch.get("positions"), segment_ids=seg,
                      prefix_mask=batch.get("prefix_mask"), token_types=batch.get("token_types"))


def loss_sums(params: Any, cfg: zoo.Config, batch: Batch, key: jax.Array | None,
              remat: bool | str = False, z_loss: float = 0.0, chunk: int = 0,
              task: Any = None, distill: tuple[float, float] = (0.5, 2.0),
              label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """Sums over the batch: weighted cross entropy `ce`, `z` (weighted lse^2), `correct`,
    `weight`, `objective` = ce + z_loss * z; `aux` is the model's MoE balance loss. Logits go
    to fp32 before logsumexp. label_smoothing: the objective's vocabulary cross entropy is
    taken against smoothed targets (`train.loss`; task heads take none). chunk > 0 computes
    the vocabulary projection and the loss that many positions at a time
    (`train.loss.chunked`): the [B, T, V] logits never exist.
    task: the cross entropy is the task head's (`task_logits`), one target per row
    (targets/weights [B]), per token ([B, T]) or, for qa heads, the answer's start and end
    positions ([B, 2], each a softmax over the T positions). A batch with `teacher_logits`
    (shaped as the head's logits) distils: distill = (alpha, T) makes the objective
    alpha * T^2 * KL(teacher || student at T) + (1 - alpha) * ce (+ z_loss * z)."""
    if task is not None:
        logits, out = task_logits(params, cfg, batch, task, key, remat)
        targets, w = batch["targets"], batch["weights"]
        if task.kind == "qa":  # [B, T, 2] -> [B, 2, T]: the start and the end, each a softmax over positions
            logits = jnp.swapaxes(logits, 1, 2)
        elif targets.ndim == 1:  # one target per row (sequence heads); token heads have one per token
            logits, targets, w = logits[:, None], targets[:, None], w[:, None]
        sums = loss.from_logits(logits, targets, w, z_loss)
        if "teacher_logits" in batch:
            sums = _distilled(sums, logits, batch["teacher_logits"], w, *distill, z_loss)
        return {**sums, "weight": jnp.sum(batch["weights"].astype(jnp.float32)),
                "aux": jnp.asarray(out.aux_loss, jnp.float32)}
    out = forward(params, cfg, batch, key, remat)
    targets, w = batch["targets"], batch["weights"]
    if chunk and chunk < targets.shape[1]:
        head = {k: params[k] for k in ("embed", "head", "mlm") if k in params}
        sums = loss.chunked(functools.partial(_logits, cfg), head, out.hidden, targets, w,
                            z_loss, chunk, label_smoothing)
    else:
        sums = loss.from_logits(out.logits, targets, w, z_loss, label_smoothing)
    return {**sums, "weight": jnp.sum(w.astype(jnp.float32)),
            "aux": jnp.asarray(out.aux_loss, jnp.float32)}


def _distilled(sums: dict, logits: jax.Array, teacher: jax.Array, w: jax.Array, alpha: float,
               temperature: float, z_loss: float) -> dict:
    """The sums with the distillation objective (see `loss_sums`). logits [B, 1, L] or as
    teacher, teacher [B, L] (sequence heads) or the logits' shape, w the cross entropy's."""
    teacher = teacher.reshape(logits.shape).astype(jnp.float32) / temperature
    student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    t_log = jax.nn.log_softmax(teacher, axis=-1)
    kl = jnp.sum(jnp.exp(t_log) * (t_log - student), axis=-1)
    kl_sum = jnp.sum(kl * w)
    objective = alpha * temperature ** 2 * kl_sum + (1 - alpha) * sums["ce"] + z_loss * sums["z"]
    return {**sums, "objective": objective}


def task_logits(params: Any, cfg: zoo.Config, batch: Batch, task: Any, key: jax.Array | None = None,
                remat: bool | str = False) -> tuple[jax.Array, zoo.Output]:
    """The task head's logits on a batch: sequence heads [B, num_labels], and the body's
    Output (its unused vocabulary logits are dead code under jit). key: dropout RNG."""
    body = {k: v for k, v in params.items() if k != TASK_HEAD}
    k_body, k_head = (None, None) if key is None else tuple(jax.random.split(key))
    out = forward(body, cfg, batch, k_body, remat)
    mask = model_inputs(cfg, batch).mask
    return zoo.heads.apply(task_head(task, params), cfg, out, mask=mask, key=k_head), out


def _logits(cfg: zoo.Config, head: dict, hidden: jax.Array) -> jax.Array:
    return zoo.model.logits(head, cfg, hidden)


def _input_tokens(cfg: zoo.Config, batch: Batch) -> jax.Array:
    """Real (non-padding) tokens the model reads: encoder + decoder sides."""
    if "segment_ids" in batch:
        n = jnp.sum(batch["segment_ids"] > 0)
    elif cfg.num_mel_bins is not None:  # features [B, M, F]: the encoder's F / 2 positions per row
        n = jnp.asarray(batch["inputs"].shape[0] * (batch["inputs"].shape[2] // 2))
    else:
        n = jnp.sum(batch["inputs"] != cfg.pad_id)
    if "decoder_inputs" in batch:
        n = n + jnp.sum(batch["weights"] > 0)
    return n.astype(jnp.float32)


def check_split(batch_size: int, accum_steps: int, devices: int = 1, where: str = "") -> None:
    """The one check that a batch splits evenly over `devices` data-parallel devices and each
    device's share into `accum_steps` micro-batches; `where` describes the devices."""
    if batch_size % (devices * accum_steps):
        each = f" x accum_steps {accum_steps}" if accum_steps > 1 else ""
        raise ValueError(f"--batch-size {batch_size} does not split over the {devices} data-parallel "
                         f"device{'s' if devices > 1 else ''}{each}{where}; use a multiple of "
                         f"{devices * accum_steps}")


def _grads(state: TrainState, batch: Batch, key: jax.Array | None,
           norm: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of (ce + z_loss*z) / norm + aux_weight * mean(aux) and the summed
    statistics, over hp.accum_steps micro-batches. `norm` is the weight the cross entropy
    is divided by: the whole batch's on one program, a device's share of it under pmap."""
    cfg, hp, k = state.cfg, state.hp, state.hp.accum_steps

    def micro_loss(params: Any, mb: Batch, mkey: jax.Array | None) -> tuple[jax.Array, dict]:
        sums = loss_sums(lora.merged(params, hp.lora_alpha), cfg, mb, mkey, hp.remat, hp.z_loss, hp.loss_chunk,
                         state.task, (hp.distill_alpha, hp.distill_temperature), hp.label_smoothing)
        loss = sums["objective"] / norm + hp.aux_weight * sums["aux"] / k
        return loss, sums

    grad_fn = jax.grad(micro_loss, has_aux=True)
    dropout = key is not None and cfg.dropout > 0
    if k == 1:
        return grad_fn(state.params, batch, jax.random.fold_in(key, 0) if dropout else None)
    b = batch["inputs"].shape[0]
    check_split(b, k)
    # Micro-batch i takes rows i, i+k, ...: the scanned axis is not the sharded one.
    micro = jax.tree.map(lambda x: x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

    def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        g_acc, s_acc = carry
        mb, i = xs
        g, s = grad_fn(state.params, mb, jax.random.fold_in(key, i) if dropout else None)
        g_acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_acc, g)
        return (g_acc, jax.tree.map(jnp.add, s_acc, s)), None

    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    names = ("ce", "z", "correct", "objective", "weight", "aux")
    zeros_s = {n: jnp.zeros((), jnp.float32) for n in names}
    (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), (micro, jnp.arange(k)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    return grads, {**sums, "aux": sums["aux"] / k}


def _update(state: TrainState, grads: Any, sums: dict[str, jax.Array],
            tokens: jax.Array) -> tuple[TrainState, Metrics]:
    """The optimizer update from the batch's gradients, and the step's metrics from its
    summed statistics (`sums` and `tokens` cover the whole global batch)."""
    tx = make_optimizer(state.cfg, state.hp, state.task)
    grads, loads = balance.split_loads(grads)  # MoE selection biases move outside the gradient
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = balance.update_score_bias(optax.apply_updates(state.params, updates), loads,
                                       state.hp.score_bias_rate)
    w = jnp.maximum(sums["weight"], 1.0)
    metrics = {"loss": sums["ce"] / w, "accuracy": sums["correct"] / w, "z_loss": sums["z"] / w,
               "aux_loss": sums["aux"], "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.hp)(state.step), "tokens": tokens,
               "targets": sums["weight"]}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def _step_key(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One program sees the global batch (one device, or a mesh under jit)."""
    check_batch(state.cfg, batch)
    total_w = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
    grads, sums = _grads(state, batch, _step_key(state), total_w)
    return _update(state, grads, sums, _input_tokens(state.cfg, batch))


def _pmap_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """Under `jax.pmap(axis_name=PMAP_AXIS)`: each device holds 1/n of the batch.

    The loss is normalised by the *global* weight, so pmean(grads) is exactly the gradient
    of the one-device loss: device i's loss is ce_i / (W / n), and the mean over devices of
    its gradients is d(sum_i ce_i / W). (A per-device mean, ce_i / W_i, would weight the
    devices' tokens unequally whenever their weights differ.) The MoE balance loss is the
    mean of the devices' balance losses, as in any data-parallel pmap."""
    check_batch(state.cfg, batch)
    n = jax.lax.psum(1, PMAP_AXIS)
    total_w = jnp.maximum(jax.lax.psum(jnp.sum(batch["weights"].astype(jnp.float32)), PMAP_AXIS), 1.0)
    key = _step_key(state)
    if state.cfg.dropout > 0:  # each device draws its own dropout masks
        key = jax.random.fold_in(key, jax.lax.axis_index(PMAP_AXIS))
    grads, sums = _grads(state, batch, key, total_w / n)
    grads = jax.lax.pmean(grads, PMAP_AXIS)
    sums = jax.lax.psum(sums, PMAP_AXIS)
    tokens = jax.lax.psum(_input_tokens(state.cfg, batch), PMAP_AXIS)
    return _update(state, grads, {**sums, "aux": sums["aux"] / n}, tokens)


def _eval_metrics(sums: dict[str, jax.Array]) -> Metrics:
    w = jnp.maximum(sums["weight"], 1.0)
    loss = sums["ce"] / w
    return {"loss": loss, "perplexity": jnp.exp(loss), "accuracy": sums["correct"] / w,
            "targets": sums["weight"]}


def _eval_step(state: TrainState, batch: Batch) -> Metrics:
    check_batch(state.cfg, batch)
    return _eval_metrics(loss_sums(lora.merged(state.params, state.hp.lora_alpha), state.cfg, batch, None,
                                   chunk=state.hp.loss_chunk, task=state.task))


def _pmap_eval_step(state: TrainState, batch: Batch) -> Metrics:
    check_batch(state.cfg, batch)
    sums = loss_sums(lora.merged(state.params, state.hp.lora_alpha), state.cfg, batch, None,
                     chunk=state.hp.loss_chunk, task=state.task)
    return _eval_metrics(jax.lax.psum(sums, PMAP_AXIS))


step = jax.jit(_step, donate_argnums=0)
step.__doc__ = """(state, batch) -> (state, metrics). One optimizer update; the state is donated.
metrics: loss (weighted CE), accuracy, z_loss, aux_loss, grad_norm (before clipping),
learning_rate (of this update), tokens (model input tokens), targets (loss weight)."""
eval_step = jax.jit(_eval_step)
eval_step.__doc__ = """(state, batch) -> {loss, perplexity, accuracy, targets}; no dropout, no update."""


# --- sharding -----------------------------------------------------------------------------

def state_shardings(state: TrainState, mesh: Mesh,
                    rules: zoo.sharding.Rules = zoo.sharding.DEFAULT_RULES) -> TrainState:
    """NamedShardings for a (possibly abstract, from `jax.eval_shape`) state: params by
    their logical axes, optimizer moments like their params, scalars replicated."""
    replicated = NamedSharding(mesh, P())
    params = zoo.sharding.tree_shardings(param_axes(state.cfg, state.task, state.hp), mesh, state.params, rules)
    if state.hp.lora_rank:
        opt = _masked_moments_like(state.opt_state, params, replicated)
    else:
        tx = make_optimizer(state.cfg, state.hp, state.task)
        opt = optax.tree_utils.tree_map_params(tx, lambda _, s: s, state.opt_state, params,
                                               transform_non_params=lambda _: replicated)
    return state.replace(params=params, opt_state=opt, step=replicated, rng=replicated)


def _masked_moments_like(opt_state: Any, params: Any, other: Any) -> Any:
    """The shardings of a LoRA optimizer state: each params-shaped subtree (the moments, with
    optax's MaskedNode where a weight is frozen) takes `params`' shardings, any other array
    `other`. optax.tree_utils.tree_map_params does not see through multi_transform's masks."""
    masked = lambda x: isinstance(x, optax.MaskedNode)
    target = jax.tree.structure(params)

    def visit(node: Any) -> Any:
        if masked(node):
            return node
        if jax.tree.structure(node, is_leaf=masked) == target:
            return jax.tree.map(lambda m, sh: m if masked(m) else sh, node, params, is_leaf=masked)
        if hasattr(node, "shape"):
            return other
        return jax.tree.map(visit, node, is_leaf=lambda x: x is not node)

    return visit(opt_state)


def batch_shardings(batch: Any, mesh: Mesh,
                    rules: zoo.sharding.Rules = zoo.sharding.DEFAULT_RULES) -> Any:
    """Every batch leaf [B, ...] sharded on its batch dim (mesh axes data, fsdp)."""
    def one(x: Any) -> NamedSharding:
        names = ("batch",) + (None,) * (len(x.shape) - 1)
        return NamedSharding(mesh, zoo.sharding.spec_for(names, x.shape, mesh, rules))
    return jax.tree.map(one, batch)


def abstract_state(cfg: zoo.Config, hp: Hparams, task: Any = None) -> TrainState:
    """Shapes and dtypes of the state (with a `task` head), allocating nothing."""
    return jax.eval_shape(lambda key: init_state(cfg, hp, key, task), jax.random.key(0))


def create_state(cfg: zoo.Config, hp: Hparams, seed: int, mesh: Mesh,
                 rules: zoo.sharding.Rules = zoo.sharding.DEFAULT_RULES) -> TrainState:
    """A fresh state created directly in its shardings on `mesh`."""
    shardings = state_shardings(abstract_state(cfg, hp), mesh, rules)
    init = jax.jit(init_state, static_argnums=(0, 1), out_shardings=shardings)
    return init(cfg, hp, jax.random.key(seed))


def jit_step(state_sh: TrainState, batch_sh: Any, mesh: Mesh):
    """`step` jitted with explicit in/out shardings and a donated state (the pjit path)."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=0)


def jit_eval_step(state_sh: TrainState, batch_sh: Any, mesh: Mesh):
    replicated = NamedSharding(mesh, P())
    return jax.jit(_eval_step, in_shardings=(state_sh, batch_sh), out_shardings=replicated)


def pmap_step(devices: Sequence[jax.Device] | None = None):
    """`step` as data-parallel `jax.pmap` over `devices` (default: all): (state, batch) ->
    (state, metrics) with batch leaves [n_local_devices, B / n, ...]. The state goes in
    unmapped (in_axes=None) and comes back once (out_axes=None): pmean keeps every device's
    copy identical, so it keeps the layout of the jit path and checkpoints the same way."""
    return jax.pmap(_pmap_step, axis_name=PMAP_AXIS, in_axes=(None, 0), out_axes=(None, None),
                    devices=devices, donate_argnums=0)


def pmap_eval_step(devices: Sequence[jax.Device] | None = None):
    """`eval_step` under pmap; batch leaves [n_local_devices, B / n, ...]."""
    return jax.pmap(_pmap_eval_step, axis_name=PMAP_AXIS, in_axes=(None, 0), out_axes=None,
                    devices=devices)
