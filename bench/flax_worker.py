"""Runs inside the Flax peer's virtualenv (transformers 4.57.6): one benchmark of the job
given as a JSON argument (`bench.peers.job`: zoo's architecture as a transformers config,
its dtypes, the shapes); prints one JSON line. Imports nothing from zoo.

The model is the transformers Flax class of the config's model_type (FlaxLlamaForCausalLM,
FlaxBartForConditionalGeneration, FlaxT5ForConditionalGeneration for T5 v1.1, ...) computing
in the job's dtype over param_dtype weights; the training step donates its parameters and
optimizer state, as zoo's does. Generation is asked for exactly new_tokens (min_length: the
Flax generate has no min_new_tokens) and the tokens it made are counted. A parameter count
other than the job's expect_params stops it before timing."""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers as tf


def _clip(x, min=None, max=None, *, a_min=None, a_max=None):
    return _jnp_clip(x, a_min if min is None else min, a_max if max is None else max)


# transformers 4.57.6's Flax T5 calls jnp.clip(a_max=...), a keyword this JAX no longer takes.
_jnp_clip, jnp.clip = jnp.clip, _clip


def median(fn, iters, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn())
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def model_class(job):
    """The Flax auto class of the job: hidden states for encode, else the LM of the family."""
    if job["bench"] == "encode":
        return tf.FlaxAutoModel
    return {"decoder": tf.FlaxAutoModelForCausalLM, "encdec": tf.FlaxAutoModelForSeq2SeqLM,
            "encoder": tf.FlaxAutoModelForMaskedLM}[job["family"]]


def build(job):
    cfg = tf.AutoConfig.for_model(**job["hf_config"])
    cls = model_class(job)._model_mapping[type(cfg)]  # a KeyError names the config without a Flax class
    kw = {"add_pooling_layer": False} if job["bench"] == "encode" and "add_pooling_layer" in getattr(cls.module_class, "__dataclass_fields__", {}) else {}
    model = cls(cfg, seed=0, dtype=getattr(jnp, job["dtype"]), **kw)
    params = model.params
    if job["param_dtype"] != "float32":
        params = jax.tree.map(lambda x: x.astype(job["param_dtype"]), params)
    return model, params


def main():
    job = json.loads(sys.argv[1])
    b, t, vocab = job["batch_size"], job["seq_len"], job["hf_config"]["vocab_size"]
    rng = np.random.default_rng(0)
    model, params = build(job)
    out = {"library": f"transformers {tf.__version__} (Flax), jax {jax.__version__}, {jax.default_backend()}",
           "device": jax.default_backend(), "architecture": type(model).__name__, "compiled": True,
           "params": sum(x.size for x in jax.tree.leaves(params))}
    if out["params"] != job["expect_params"]:
        print(json.dumps({**out, "refused": True}))
        return
    if job["bench"] == "encode":
        ids = jnp.asarray(rng.integers(3, vocab, (b, t)), jnp.int32)
        f = jax.jit(lambda p, x: model(x, attention_mask=jnp.ones_like(x), params=p).last_hidden_state)
        seconds = median(lambda: f(params, ids), job["iters"])
        out.update(tokens_per_s=b * t / seconds, step_s=seconds)
    elif job["bench"] == "decode":
        ids = jnp.asarray(rng.integers(3, vocab, (1, job["prompt_len"])), jnp.int32)
        n = job["new_tokens"]
        start = ids.shape[1] if job["family"] == "decoder" else 1  # encdec: the decoder start token
        gen = jax.jit(lambda p, x: model.generate(x, params=p, max_new_tokens=n, min_length=start + n,
                                                   do_sample=False, pad_token_id=0).sequences)
        seconds = median(lambda: gen(params, ids), job["iters"], warmup=1)
        made = np.asarray(gen(params, ids))[0, start:]
        eos = job["hf_config"].get("eos_token_id")
        stops = np.flatnonzero(made == eos) if eos is not None else []
        out.update(tokens_per_s=n / seconds, step_s=seconds / n,
                   generated_tokens=int(stops[0]) + 1 if len(stops) else len(made))
    else:
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1))
        ids = jnp.asarray(rng.integers(3, vocab, (b, t)), jnp.int32)

        def loss_fn(p):
            kw = {"decoder_input_ids": ids} if job["family"] == "encdec" else {}
            logits = model(ids, params=p, train=True, dropout_rng=jax.random.key(0), **kw).logits
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

        def step(p, s):
            loss, g = jax.value_and_grad(loss_fn)(p)
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

        step = jax.jit(step, donate_argnums=(0, 1))  # the state updated in place, as zoo's step
        state = {"p": params, "s": tx.init(params)}

        def one():
            state["p"], state["s"], loss = step(state["p"], state["s"])
            return loss

        seconds = median(one, job["iters"])
        out.update(tokens_per_s=b * t / seconds, step_s=seconds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
