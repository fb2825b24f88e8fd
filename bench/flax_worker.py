"""Runs inside the Flax peer's virtualenv (transformers 4.57.6): one benchmark on the
shapes given as a JSON argument; prints one JSON line. Imports nothing from zoo."""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers as tf


def median(fn, iters, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn())
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def config(job, max_len):
    if job["family"] == "decoder":
        return tf.GPT2Config(vocab_size=job["vocab_size"], n_embd=job["d_model"], n_layer=job["num_layers"],
                             n_head=job["num_heads"], n_inner=job["d_ff"], n_positions=max_len,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if job["family"] == "encoder":
        return tf.BertConfig(vocab_size=job["vocab_size"], hidden_size=job["d_model"],
                             num_hidden_layers=job["num_layers"], num_attention_heads=job["num_heads"],
                             intermediate_size=job["d_ff"], max_position_embeddings=max_len,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.T5Config(vocab_size=job["vocab_size"], d_model=job["d_model"], d_kv=job["head_dim"],
                       d_ff=job["d_ff"], num_layers=job["num_layers"],
                       num_decoder_layers=job["num_decoder_layers"], num_heads=job["num_heads"],
                       dropout_rate=0.0, feed_forward_proj="relu", decoder_start_token_id=0,
                       pad_token_id=0, eos_token_id=1)


def main():
    job = json.loads(sys.argv[1])
    b, t = job["batch_size"], job["seq_len"]
    max_len = max(1024, t + job["new_tokens"] + 1)
    cfg = config(job, max_len)
    rng = np.random.default_rng(0)
    lib = f"transformers {tf.__version__} (Flax), jax {jax.__version__}"
    if job["bench"] == "encode":
        model = tf.FlaxBertModel(cfg, seed=0)
        ids = jnp.asarray(rng.integers(3, job["vocab_size"], (b, t)), jnp.int32)
        f = jax.jit(lambda p, x: model(x, attention_mask=jnp.ones_like(x), params=p).last_hidden_state)
        seconds = median(lambda: f(model.params, ids), job["iters"])
        print(json.dumps({"tokens_per_s": b * t / seconds, "step_s": seconds, "library": lib}))
        return
    if job["bench"] == "decode":
        model = (tf.FlaxGPT2LMHeadModel if job["family"] == "decoder" else tf.FlaxT5ForConditionalGeneration)(cfg, seed=0)
        ids = jnp.asarray(rng.integers(3, job["vocab_size"], (1, job["prompt_len"])), jnp.int32)
        n = job["new_tokens"]
        gen = jax.jit(lambda p, x: model.generate(x, params=p, max_new_tokens=n, min_new_tokens=n,
                                                   do_sample=False, pad_token_id=0).sequences)
        seconds = median(lambda: gen(model.params, ids), job["iters"], warmup=1)
        print(json.dumps({"tokens_per_s": n / seconds, "step_s": seconds / n, "library": lib}))
        return
    cls = {"decoder": tf.FlaxGPT2LMHeadModel, "encoder": tf.FlaxBertForMaskedLM,
           "encdec": tf.FlaxT5ForConditionalGeneration}[job["family"]]
    model = cls(cfg, seed=0)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1))
    params = model.params
    opt_state = tx.init(params)
    ids = jnp.asarray(rng.integers(3, job["vocab_size"], (b, t)), jnp.int32)

    def loss_fn(p):
        if job["family"] == "encdec":
            logits = model(ids, decoder_input_ids=ids, params=p, train=True,
                           dropout_rng=jax.random.key(0)).logits
        else:
            logits = model(ids, params=p, train=True, dropout_rng=jax.random.key(0)).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = {"p": params, "s": opt_state}

    def one():
        state["p"], state["s"], loss = step(state["p"], state["s"])
        return loss

    seconds = median(one, job["iters"])
    print(json.dumps({"tokens_per_s": b * t / seconds, "step_s": seconds, "library": lib}))


if __name__ == "__main__":
    main()
