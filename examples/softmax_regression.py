"""Softmax regression on the digits, from scratch and concise (d2l 4.4 / 4.5).

The book uses Fashion-MNIST; the 8x8 scikit-learn digits are used here because they are
available offline (``--data fashion_mnist`` works if the IDX files can be found/downloaded).

    python examples/softmax_regression.py [--epochs 10]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from fdl import nn, optim
from fdl.cli import load_dataset
from fdl.data import ArrayLoader
from fdl.train import accuracy, fit


def softmax(o):
    """d2l's ``softmax``: ``exp(o) / sum(exp(o))`` row-wise (shifted by the max for safety)."""
    e = jnp.exp(o - o.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(y_hat, y):
    return -jnp.log(y_hat[jnp.arange(y_hat.shape[0]), y])


def from_scratch(train, test, *, epochs, batch_size, lr, key, num_classes):
    (x, y), (xt, yt) = train, test
    d = x[0].size
    params = {"W": 0.01 * jax.random.normal(key, (d, num_classes), jnp.float32),
              "b": jnp.zeros(num_classes, jnp.float32)}

    def net(p, xb):
        return softmax(xb.reshape(xb.shape[0], -1) @ p["W"] + p["b"])

    @jax.jit
    def step(p, xb, yb):
        g = jax.grad(lambda q: cross_entropy(net(q, xb), yb).mean())(p)
        return jax.tree.map(lambda a, ga: a - lr * ga, p, g)

    loader = ArrayLoader((x, y), batch_size, key=jax.random.fold_in(key, 1), prefetch=0)
    for epoch in range(epochs):
        for xb, yb in loader:
            params = step(params, xb, yb)
        acc = float(accuracy(net(params, xt), yt))
        print(f"[scratch] epoch {epoch + 1}, test acc {acc:.4f}")
    return acc


def concise(train, test, *, epochs, batch_size, lr, key, num_classes):
    model = nn.serial(nn.flatten(), nn.dense(num_classes, w_init=nn.initializers.normal(0.01)))
    _, params, state = model.init(key, (1, *train[0].shape[1:]))
    res = fit(model, params, state, optim.sgd(lr), train, eval_data=test, batch_size=batch_size,
              epochs=epochs, key=jax.random.fold_in(key, 1), progress=False,
              print_fn=lambda s: print("[concise]", s))
    return res.history.last["test_acc"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args(argv)
    train, test, k = load_dataset(args.data, None, None)
    kw = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, key=jax.random.key(0),
              num_classes=k)
    out = {"scratch_test_acc": from_scratch(train, test, **kw),
           "concise_test_acc": concise(train, test, **kw)}
    print(f"final: scratch test acc {out['scratch_test_acc']:.4f}, "
          f"concise test acc {out['concise_test_acc']:.4f}")
    return out


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
