"""Accuracy and speed of the training features on a zoo model, each against the plain run.

Model: ``fdl.models.vision.resnet18(10, small_input=True, base_channels=16)`` on the offline
digits (8x8 resized to 32x32, 1438 train / 359 test), Adam 1e-3 cosine-decayed to 0, batch
64, trained with ``fdl.train.fit``. Variants:

- ``baseline``; ``ema`` (``optim.ema(adam, 0.99)``; test accuracy of the raw and averaged
  params); ``ema_warmup`` (the same with ``warmup=True``); ``remat`` (``nn.at_paths(model,
  {"features/layer*": nn.remat})``);
  ``bf16`` (``nn.mixed_precision(model, "bfloat16")``); ``fp16`` (``nn.mixed_precision(model,
  "float16")`` with ``optim.dynamic_loss_scale``); ``augment`` (``augment.augmented(model,
  from_spec("crop"))``: random 4-pixel-padded crops; no flips for digits).

Speed: the jitted training step (forward, backward, update) of each variant timed against the
baseline's in interleaved rounds in one process (paired; read the ratios on a shared machine).
Memory: XLA's compiled temp-buffer size of the step.

    python -m scripts.training_features [--epochs 6] [--variants ema,remat,...] [--time-only]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("baseline", "ema", "ema_warmup", "remat", "bf16", "fp16", "augment")


def _data(size=32):
    sys.path.insert(0, "examples/vision")
    from common import load_data

    (xtr, ytr), (xte, yte) = load_data("digits", size)
    return (xtr, ytr), (xte, yte)


def _variant(name: str, epochs: int, steps_per_epoch: int):
    from fdl import nn, optim
    from fdl.data import augment
    from fdl.models import vision

    model = vision.resnet18(10, 1, small_input=True, base_channels=16)
    lr = optim.cosine_decay_schedule(1e-3, epochs * steps_per_epoch)
    opt = optim.adam(lr)
    if name in ("ema", "ema_warmup"):
        opt = optim.ema(opt, 0.99, warmup=name == "ema_warmup")
    elif name == "remat":
        model = nn.at_paths(model, {"features/layer*": nn.remat})
    elif name == "bf16":
        model = nn.mixed_precision(model, "bfloat16")
    elif name == "fp16":
        model = nn.mixed_precision(model, "float16")
        opt = optim.dynamic_loss_scale(opt, init_scale=2.0 ** 12, growth_interval=200)
    elif name == "augment":
        model = augment.augmented(model, augment.from_spec("crop"))
    return model, opt


def _step_fn(model, opt):
    from fdl import optim
    from fdl.nn.losses import softmax_cross_entropy

    @jax.jit
    def step(params, state, opt_state, x, y, key):
        def loss(p):
            out, ns = model.apply(p, state, x, key=key, train=True)
            return jnp.mean(softmax_cross_entropy(out, y)) * optim.loss_scale(opt_state), ns
        (_, ns), g = jax.value_and_grad(loss, has_aux=True)(params)
        u, opt_state = opt.update(g, opt_state, params)
        return optim.apply_updates(params, u), ns, opt_state

    return step


def _accuracy(model, params, state, x, y) -> float:
    pred = jax.jit(lambda p, s, x: model.apply(p, s, x)[0])(params, state, jnp.asarray(x))
    return float(np.mean(np.argmax(np.asarray(pred), -1) == y))


def _train(name, epochs, data, seed, print_fn) -> dict:
    from fdl import optim
    from fdl.train import fit

    (xtr, ytr), (xte, yte) = data
    bs = 64
    model, opt = _variant(name, epochs, -(-len(xtr) // bs))
    key = jax.random.key(seed)
    params, state = jax.jit(model.init_params, static_argnums=1)(key, (1, *xtr.shape[1:]))
    t0 = time.time()
    # fit's step multiplies the loss by optim.loss_scale(opt_state) (the fp16 variant's scale)
    res = fit(model, params, state, opt, (xtr, ytr), eval_data=(xte, yte), epochs=epochs,
              key=key, batch_size=bs, progress=False, print_fn=None)
    out = {"test_acc": float(res.history.last["test_acc"]),
           "train_loss": float(res.history.last["train_loss"]), "seconds": time.time() - t0}
    if name in ("ema", "ema_warmup"):
        out["test_acc_ema"] = _accuracy(model, optim.ema_params(res.opt_state), res.state,
                                        xte, yte)
    if name == "fp16":
        out["loss_scale"] = float(optim.loss_scale(res.opt_state))
        out["skipped_steps"] = int(res.opt_state.skipped)
    print_fn(f"{name}: {out}")
    return out


def _time(names, rounds, steps, data, print_fn) -> None:
    (xtr, ytr), _ = data
    bs = 64
    x, y = jnp.asarray(xtr[:bs]), jnp.asarray(ytr[:bs])
    runs = {}
    for name in names:
        model, opt = _variant(name, 1, 100)
        params, state = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0),
                                                                     (1, *xtr.shape[1:]))
        step = _step_fn(model, opt)
        o = opt.init(params)
        compiled = step.lower(params, state, o, x, y, jax.random.key(1)).compile()
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        jax.block_until_ready(step(params, state, o, x, y, jax.random.key(1)))
        runs[name] = (step, params, state, o, temp)
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            step, p, s, o, _ = runs[name]
            t = time.perf_counter()
            out = None
            for i in range(steps):
                out = step(p, s, o, x, y, jax.random.key(i))
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t) / steps)
    base = np.array(times["baseline"])
    for name in names:
        a = np.array(times[name])
        temp = runs[name][4]
        mb = f"{temp / 2**20:.1f} MiB" if temp is not None else "n/a"
        print_fn(f"step {name}: median {np.median(a) * 1e3:.1f} ms; paired ratio to baseline "
                 f"median {np.median(a / base):.3f} (per round: "
                 f"{', '.join(f'{v:.2f}' for v in a / base)}); XLA temp buffers {mb}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--time-only", action="store_true")
    ap.add_argument("--train-only", action="store_true")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if "baseline" not in names:
        names.insert(0, "baseline")
    data = _data()
    if not args.train_only:
        _time(names, args.rounds, args.steps, data, print)
    if not args.time_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                _train(name, args.epochs, data, seed, print)


if __name__ == "__main__":
    main()
