"""Multilayer perceptron with dropout on the digits (d2l 5.2 / 5.6), and the weight-decay demo
on d2l's high-dimensional, small-sample regression (d2l 3.7).

Weight decay: ``y = 0.05 + sum_i 0.01 x_i + noise`` with 200 inputs and only 20 training
examples. Without decay the model fits the training set and fails on the test set; with an L2
penalty ``lambda/2 ||w||^2`` (``lambda = 3``) the test loss drops by orders of magnitude.

    python examples/mlp.py [--epochs 10] [--wd-epochs 100]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from fdl import nn, optim
from fdl.cli import load_dataset
from fdl.data import ArrayLoader, high_dim_linear_data
from fdl.train import fit


def mlp_with_dropout(*, epochs: int, hidden: int = 256, dropout: float = 0.2, lr: float = 0.1,
                     batch_size: int = 64, weight_decay: float = 0.0) -> float:
    train, test, k = load_dataset("digits", None, None)
    model = nn.serial(nn.flatten(), ("fc1", nn.dense(hidden)), nn.relu(),
                      ("drop1", nn.dropout(dropout)), ("fc2", nn.dense(hidden)), nn.relu(),
                      ("drop2", nn.dropout(dropout)), ("out", nn.dense(k)))
    _, params, state = model.init(jax.random.key(0), (1, *train[0].shape[1:]))
    res = fit(model, params, state, optim.sgd(lr, weight_decay=weight_decay), train,
              eval_data=test, batch_size=batch_size, epochs=epochs, key=jax.random.key(1),
              progress=False, print_fn=lambda s: print("[mlp]", s))
    return res.history.last["test_acc"]


def weight_decay_demo(lambd: float, *, epochs: int, lr: float = 0.003, batch_size: int = 5):
    """d2l 3.7 from scratch: linear model, squared loss + ``lambd/2 ||w||^2`` (not on b)."""
    (x, y), (xt, yt) = high_dim_linear_data(jax.random.key(0))
    key = jax.random.key(1)
    p = {"w": jax.random.normal(key, (x.shape[1], 1), jnp.float32),
         "b": jnp.zeros(1, jnp.float32)}

    def mse(p, xb, yb):
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2 / 2)

    def objective(p, xb, yb):
        return mse(p, xb, yb) + lambd * jnp.sum(p["w"] ** 2) / 2

    @jax.jit
    def step(p, xb, yb):
        g = jax.grad(objective)(p, xb, yb)
        return jax.tree.map(lambda a, ga: a - lr * ga, p, g)

    loader = ArrayLoader((x, y), batch_size, key=jax.random.fold_in(key, 1), prefetch=0)
    for _ in range(epochs):
        for xb, yb in loader:
            p = step(p, xb, yb)
    train_loss, test_loss = float(mse(p, x, y)), float(mse(p, xt, yt))
    print(f"[weight decay] lambda {lambd}: train loss {train_loss:.5f}, test loss "
          f"{test_loss:.5f}, ||w|| {float(jnp.linalg.norm(p['w'])):.4f}")
    return train_loss, test_loss


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--wd-epochs", type=int, default=100)
    args = ap.parse_args(argv)
    out = {"mlp_test_acc": mlp_with_dropout(epochs=args.epochs)}
    out["no_decay"] = weight_decay_demo(0.0, epochs=args.wd_epochs)
    out["decay_3"] = weight_decay_demo(3.0, epochs=args.wd_epochs)
    print(f"final: MLP+dropout test acc {out['mlp_test_acc']:.4f}; weight decay test loss "
          f"{out['no_decay'][1]:.4f} (lambda 0) -> {out['decay_3'][1]:.4f} (lambda 3)")
    return out


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
