"""Linear regression, from scratch and concise (d2l 3.2 / 3.3).

Synthetic data ``y = X w + b + noise`` with ``w = [2, -3.4]``, ``b = 4.2``; minibatch SGD.
The from-scratch version writes the model, the squared loss and the SGD update by hand; the
concise one uses ``fdl.nn.dense``, ``fdl.optim.sgd`` and ``fdl.train.fit``.

    python examples/linear_regression.py [--epochs 3] [--n 1000]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fdl import nn, optim
from fdl.data import ArrayLoader, synthetic_linear_data
from fdl.train import fit

TRUE_W, TRUE_B = jnp.array([2.0, -3.4]), 4.2


def from_scratch(x, y, *, epochs: int, batch_size: int, lr: float, key):
    """d2l 3.2: params ``w ~ N(0, 0.01^2)``, ``b = 0``; loss ``(y_hat - y)^2 / 2``."""
    params = {"w": 0.01 * jax.random.normal(jax.random.fold_in(key, 0), (2, 1), jnp.float32),
              "b": jnp.zeros(1, jnp.float32)}

    def loss(p, xb, yb):
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2 / 2)

    @jax.jit
    def sgd_step(p, xb, yb):
        g = jax.grad(loss)(p, xb, yb)
        return jax.tree.map(lambda a, ga: a - lr * ga, p, g)

    loader = ArrayLoader((x, y), batch_size, key=jax.random.fold_in(key, 1), prefetch=0)
    for epoch in range(epochs):
        for xb, yb in loader:
            params = sgd_step(params, xb, yb)
        print(f"[scratch] epoch {epoch + 1}, loss {float(loss(params, x, y)):.6f}")
    return params


def concise(x, y, *, epochs: int, batch_size: int, lr: float, key):
    """d2l 3.3: ``dense(1)`` with N(0, 0.01) weights, ``sgd(lr)``, squared loss, ``fit``."""
    model = nn.dense(1, w_init=nn.initializers.normal(0.01))
    _, params, state = model.init(jax.random.fold_in(key, 0), (1, 2))
    res = fit(model, params, state, optim.sgd(lr), (x, y), loss="squared_error",
              batch_size=batch_size, epochs=epochs, key=jax.random.fold_in(key, 1),
              progress=False, print_fn=lambda s: print("[concise]", s))
    return {"w": res.params["w"], "b": res.params["b"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.03)
    args = ap.parse_args(argv)
    key = jax.random.key(0)
    x, y = synthetic_linear_data(key, TRUE_W, TRUE_B, args.n)
    out = {}
    for name, fn in (("scratch", from_scratch), ("concise", concise)):
        p = fn(x, y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
               key=jax.random.key(1))
        w_err = np.asarray(TRUE_W - p["w"].reshape(-1))
        b_err = float(TRUE_B - p["b"].reshape(()))
        print(f"{name}: error in estimating w: {w_err}, error in estimating b: {b_err:.5f}")
        out[name] = {"w_error": float(np.abs(w_err).max()), "b_error": abs(b_err)}
    return out


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
