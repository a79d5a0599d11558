"""d2l's optimizer chapter with fdl.optim: 2-D traces and loss curves on a real regression set.

1. Traces of every optimizer on d2l's ill-conditioned quadratic ``f(x1, x2) = 0.1 x1^2 + 2 x2^2``
   from ``(-5, -2)`` and on Rosenbrock's function from ``(-1.5, 2)``, drawn over contour plots
   (``quadratic.png``, ``rosenbrock.png``).
2. Linear regression on scikit-learn's diabetes set (442 patients, 10 standardised features,
   standardised target; offline), mini-batch 32, the loss curves of all optimizers in one
   figure (``regression.png``), as d2l's airfoil experiments.

Run: ``python examples/optimizers_2d.py [OUT_DIR] [--steps N] [--rosen-steps N] [--epochs N]``
(default ``runs/optimizers/``). Prints the final point / loss of each optimizer.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import fdl.optim as fo

QUAD_OPTS = {  # d2l's hyperparameters where it gives them
    "sgd (eta 0.4)": lambda: fo.sgd(0.4),
    "momentum (0.6, beta 0.5)": lambda: fo.momentum(0.6, 0.5),
    "nesterov (0.2, 0.5)": lambda: fo.nesterov(0.2, 0.5),
    "adagrad (0.4)": lambda: fo.adagrad(0.4, eps=1e-6),
    "rmsprop (0.4, gamma 0.9)": lambda: fo.rmsprop(0.4, alpha=0.9, eps=1e-6),
    "adadelta (rho 0.9)": lambda: fo.adadelta(rho=0.9, eps=1e-2),
    "adam (0.5)": lambda: fo.adam(0.5),
}
ROSEN_OPTS = {
    "sgd (1.5e-3)": lambda: fo.sgd(1.5e-3),
    "momentum (1e-3, 0.9)": lambda: fo.momentum(1e-3, 0.9),
    "nesterov (1e-3, 0.9)": lambda: fo.nesterov(1e-3, 0.9),
    "adagrad (1.0)": lambda: fo.adagrad(1.0),
    "rmsprop (1e-2, decayed)": lambda: fo.rmsprop(fo.exponential_decay(1e-2, 0.1, 5000)),
    "adadelta (lr 1e-3, eps 1e-2)": lambda: fo.adadelta(1e-3, eps=1e-2),
    "adam (0.02)": lambda: fo.adam(0.02),
}
REG_OPTS = {
    "sgd (0.01)": lambda: fo.sgd(0.01),
    "momentum (0.01, 0.9)": lambda: fo.momentum(0.01, 0.9),
    "nesterov (0.01, 0.9)": lambda: fo.nesterov(0.01, 0.9),
    "adagrad (0.1)": lambda: fo.adagrad(0.1),
    "rmsprop (0.01)": lambda: fo.rmsprop(0.01, alpha=0.9),
    "adadelta": lambda: fo.adadelta(rho=0.9, eps=1e-5),
    "adam (0.01)": lambda: fo.adam(0.01),
    "adamw (0.01, wd 1e-2)": lambda: fo.adamw(0.01),
}


def quadratic(x):
    return 0.1 * x[0] ** 2 + 2.0 * x[1] ** 2


def rosenbrock(x):
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


def trace_2d(opt: fo.GradientTransformation, f, x0, steps: int) -> np.ndarray:
    """The ``(steps + 1, 2)`` trajectory of ``opt`` minimising ``f`` from ``x0`` (jitted scan)."""
    x = jnp.asarray(x0, jnp.float32)

    def body(carry, _):
        x, s = carry
        u, s = opt.update(jax.grad(f)(x), s, x)
        x = fo.apply_updates(x, u)
        return (x, s), x

    _, xs = jax.jit(lambda x, s: jax.lax.scan(body, (x, s), None, length=steps))(x, opt.init(x))
    return np.concatenate([np.asarray(x)[None], np.asarray(xs)])


def diabetes():
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def train_regression(opt: fo.GradientTransformation, x, y, epochs: int, batch: int = 32,
                     seed: int = 0) -> np.ndarray:
    """Mini-batch linear regression; the full-data loss (``(y_hat - y)^2 / 2``) every 10 steps."""
    n = (x.shape[0] // batch) * batch
    params = {"w": jnp.zeros((x.shape[1],), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    loss = lambda p, x, y: 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    def epoch(carry, key):
        p, s = carry
        idx = jax.random.permutation(key, x.shape[0])[:n].reshape(-1, batch)

        def step(carry, i):
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p, x[i], y[i]), s, p)
            p = fo.apply_updates(p, u)
            return (p, s), loss(p, x, y)

        return jax.lax.scan(step, (p, s), idx)

    run = jax.jit(lambda p, s, keys: jax.lax.scan(epoch, (p, s), keys))
    keys = jax.random.split(jax.random.key(seed), epochs)
    _, losses = run(params, opt.init(params), keys)
    return np.concatenate([[float(loss(params, x, y))], np.asarray(losses).reshape(-1)])


def _contour(ax, f, xlim, ylim, levels):
    g1, g2 = np.meshgrid(np.linspace(*xlim, 200), np.linspace(*ylim, 200))
    ax.contour(g1, g2, f(np.stack([g1, g2])), levels=levels, colors="#999999", linewidths=0.6)


def plot_traces(path, f, traces, xlim, ylim, levels, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    _contour(ax, f, xlim, ylim, levels)
    for name, tr in traces.items():
        ax.plot(tr[:, 0], tr[:, 1], "-o", ms=2, lw=1, label=name)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(path, curves, steps_per_epoch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        ax.plot(np.arange(len(c)) / steps_per_epoch, c, lw=1.2, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (y_hat - y)^2 / 2")
    ax.set_yscale("log")
    ax.set_title("Linear regression on the diabetes set, mini-batch 32")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="runs/optimizers/", help="PNG output directory")
    ap.add_argument("--steps", type=int, default=20, help="steps on the quadratic (d2l: 20)")
    ap.add_argument("--rosen-steps", type=int, default=20000, help="steps on Rosenbrock")
    ap.add_argument("--epochs", type=int, default=20, help="regression epochs")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    results: dict = {"quadratic": {}, "rosenbrock": {}, "regression": {}}

    quad = {k: trace_2d(m(), quadratic, [-5.0, -2.0], args.steps) for k, m in QUAD_OPTS.items()}
    print(f"quadratic 0.1 x1^2 + 2 x2^2 from (-5, -2), {args.steps} steps:")
    for k, tr in quad.items():
        results["quadratic"][k] = tr[-1]
        print(f"  {k:30s} x = ({tr[-1, 0]: .5f}, {tr[-1, 1]: .5f})  f = {quadratic(tr[-1]):.3e}")
    plot_traces(os.path.join(args.out, "quadratic.png"), quadratic, quad, (-5.5, 1.5),
                (-3.0, 3.0), 20, "f(x1, x2) = 0.1 x1^2 + 2 x2^2")

    rosen = {k: trace_2d(m(), rosenbrock, [-1.5, 2.0], args.rosen_steps)
             for k, m in ROSEN_OPTS.items()}
    print(f"Rosenbrock from (-1.5, 2), {args.rosen_steps} steps (optimum (1, 1)):")
    for k, tr in rosen.items():
        results["rosenbrock"][k] = tr[-1]
        print(f"  {k:30s} x = ({tr[-1, 0]: .5f}, {tr[-1, 1]: .5f})  f = {rosenbrock(tr[-1]):.3e}")
    stride = max(1, args.rosen_steps // 400)
    plot_traces(os.path.join(args.out, "rosenbrock.png"), rosenbrock,
                {k: tr[::stride] for k, tr in rosen.items()}, (-2.0, 2.0), (-1.0, 3.0),
                np.logspace(-1, 3.5, 20), "Rosenbrock (1 - x1)^2 + 100 (x2 - x1^2)^2")

    x, y = diabetes()
    curves = {k: train_regression(m(), x, y, args.epochs) for k, m in REG_OPTS.items()}
    print(f"linear regression, diabetes (442 x 10), batch 32, {args.epochs} epochs:")
    for k, c in curves.items():
        results["regression"][k] = float(c[-1])
        print(f"  {k:30s} final loss {c[-1]:.4f}")
    plot_losses(os.path.join(args.out, "regression.png"), curves, x.shape[0] // 32)
    print(f"wrote quadratic.png, rosenbrock.png, regression.png to {args.out} "
          f"({time.perf_counter() - t0:.1f} s)")
    return results


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
