"""Measure the transformer options: compile time with and without scan over layers (and with
remat), and the numerical difference of the bfloat16 compute policy against float32.

    python -m scripts.bench.transformer_options [--layers 12] [--repeat 2]

Compile time: ``jax.jit(value_and_grad(loss)).lower(...).compile()`` of a BERT-style training
loss (d 256, 4 heads, FFN 1024, sequence 64, batch 8) for ``--layers`` identical layers, best of
``--repeat`` fresh compilations. Mixed precision: the same model's encoder output and MLM/NSP
logits with ``compute_dtype=bfloat16`` (params cast on entry, float32 master weights, float32
softmax and LayerNorm statistics) against float32, on the same params and batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


def _setup(layers, **kw):
    from fdl.models.sequence.bert import BertConfig, bert_pretraining

    kw = {"dropout": 0.1, **kw}
    cfg = BertConfig(vocab_size=10_000, num_hiddens=256, ffn_hiddens=1024, num_heads=4,
                     num_layers=layers, max_len=64, **kw)
    rng = np.random.default_rng(0)
    b, t, p = 8, 64, 10
    x = (jnp.asarray(rng.integers(0, 10_000, (b, t)), jnp.int32),
         jnp.asarray((np.arange(t) >= 32)[None].repeat(b, 0), jnp.int32),
         jnp.full((b,), t, jnp.int32), jnp.asarray(rng.integers(1, t, (b, p)), jnp.int32))
    y = (jnp.asarray(rng.integers(0, 10_000, (b, p)), jnp.int32), jnp.ones((b, p)),
         jnp.asarray(rng.integers(0, 2, (b,)), jnp.int32))
    return cfg, bert_pretraining(cfg), x, y


def compile_seconds(layers, repeat, **kw):
    from fdl.models.sequence.bert import pretraining_loss

    cfg, model, x, y = _setup(layers, **kw)
    _, params, _ = model.init(jax.random.key(0), tuple(
        (None if a is None else a.shape) for a in x))

    def loss(p, x, y, k):
        out, _ = model.apply(p, {}, x, key=k, train=True)
        return pretraining_loss(out, *y)[0]

    best = float("inf")
    for _ in range(repeat):
        fn = jax.jit(jax.value_and_grad(loss))  # a fresh function: no compilation cache hit
        t0 = time.perf_counter()
        fn.lower(params, x, y, jax.random.key(1)).compile()
        best = min(best, time.perf_counter() - t0)
    return best


def precision_difference(layers):
    cfg, model, x, _ = _setup(layers, dropout=0.0)
    _, params, _ = model.init(jax.random.key(0), tuple(a.shape for a in x))
    from fdl.models.sequence.bert import bert_pretraining

    bf = bert_pretraining(dataclasses.replace(cfg, compute_dtype=jnp.bfloat16))
    o32, _ = jax.jit(model.apply)(params, {}, x)
    o16, _ = jax.jit(bf.apply)(params, {}, x)
    out = {}
    for name in ("encoded", "mlm_logits", "nsp_logits"):
        a = np.asarray(getattr(o32, name), np.float64)
        b = np.asarray(getattr(o16, name), np.float64)
        out[name] = (float(np.max(np.abs(a - b))), float(np.max(np.abs(a - b)) / np.max(np.abs(a))))
    agree = float(np.mean(np.argmax(np.asarray(o32.mlm_logits), -1)
                          == np.argmax(np.asarray(o16.mlm_logits), -1)))
    return out, agree


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--precision-only", action="store_true")
    args = ap.parse_args(argv)
    rows = {}
    for name, kw in () if args.precision_only else (("loop", {}), ("scan", {"scan_layers": True}),
                     ("scan + remat", {"scan_layers": True, "remat": True}),
                     ("loop + remat", {"remat": True})):
        rows[name] = compile_seconds(args.layers, args.repeat, **kw)
        print(f"{args.layers} layers, {name}: compile {rows[name]:.2f} s", flush=True)
    if rows:
        print(f"scan compiles {rows['loop'] / rows['scan']:.2f}x faster than the unrolled loop")
    diff, agree = precision_difference(min(args.layers, 4))
    for name, (abs_err, rel) in diff.items():
        print(f"bf16 vs float32 {name}: max |diff| {abs_err:.4g} ({rel:.2%} of max |value|)")
    print(f"MLM arg-max agreement bf16 vs float32: {agree:.1%}")


if __name__ == "__main__":
    main()
