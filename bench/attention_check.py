"""On a GPU: the cuDNN attention path agrees with the XLA path (forward and gradients) for
causal, padded, packed and sliding-window batches, and `attention="auto"` picks cuDNN there
(and XLA on a CPU, in fp32 and with a bias). `python -m bench.attention_check`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import zoo


def rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> None:
    base = zoo.preset("tiny-decoder", d_model=256, num_heads=4, num_kv_heads=2, dtype="bfloat16",
                      max_len=512)
    params = zoo.init(base, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (4, 256), 3, base.vocab_size)
    seg = jnp.concatenate([jnp.ones((4, 100), jnp.int32), 2 * jnp.ones((4, 156), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.arange(100), jnp.arange(156)])[None].repeat(4, 0)
    cases = {
        "causal": dict(),
        "right-padded": dict(mask=jnp.arange(256)[None].repeat(4, 0) < 200),
        "packed": dict(segment_ids=seg, positions=pos, mask=seg > 0),
    }
    for window, names in ((None, tuple(cases)), (64, ("packed",))):
        for name in names:
            kw = cases[name]
            out = {}
            impls = ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",)
            for impl in impls:
                cfg = base.replace(attention=impl, sliding_window=window)
                f = jax.jit(lambda p, t: zoo.decoder.forward(p, cfg, t, **kw).logits.astype(jnp.float32))
                g = jax.jit(jax.grad(lambda p, t: jnp.mean(
                    zoo.decoder.forward(p, cfg, t, **kw).logits.astype(jnp.float32) ** 2)))
                out[impl] = (f(params, toks), g(params, toks)["decoder"]["layers"]["attn"]["q"])
            if "cudnn" in out:
                print(f"window={window} {name:13s} logits rel err {rel(out['cudnn'][0], out['xla'][0]):.2e}"
                      f"  dq rel err {rel(out['cudnn'][1], out['xla'][1]):.2e}")
    for name, cfg in (("bf16, RoPE", base), ("fp32, RoPE", base.replace(dtype="float32")),
                      ("bf16, ALiBi", base.replace(positions="alibi"))):
        cfg = cfg.replace(attention="auto")
        hlo = jax.jit(jax.grad(lambda p, t: jnp.mean(
            zoo.decoder.forward(p, cfg, t).logits.astype(jnp.float32)))).lower(params, toks).as_text()
        print(f"attention='auto', {name:12s} on {jax.default_backend()}: "
              f"{'cudnn' if 'cudnn' in hlo else 'xla'}")


if __name__ == "__main__":
    main()
