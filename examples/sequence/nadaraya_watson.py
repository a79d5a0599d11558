"""Nadaraya–Watson kernel regression (d2l "Attention Pooling"): average pooling, the
non-parametric Gaussian-kernel estimator and the learned-width one, with attention heat maps.

    python examples/sequence/nadaraya_watson.py [--out runs/nadaraya_watson] [--seed 0]

The learned width is a Layer trained by ``fdl.train.fit``. Prints the test MSE of each estimator
and the training loss per epoch; saves
``regression.png`` (fits against the truth) and ``attention_nonparametric.png`` /
``attention_parametric.png`` (weights of the 50 test queries over the 50 training keys).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp


def main(argv=None) -> dict[str, float]:
    from fdl.data import ArrayLoader
    from fdl.models.sequence import nadaraya_watson as nw
    from fdl.optim import sgd
    from fdl.train import fit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/nadaraya_watson")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    key = jax.random.key(args.seed)
    k_data, k_init = jax.random.split(key)
    x_train, y_train, x_test, y_truth = nw.synthetic_data(k_data)

    def mse(y):
        return float(jnp.mean((y - y_truth) ** 2))

    y_avg = nw.average_pooling(y_train, x_test.shape[0])
    y_np, w_np = nw.nadaraya_watson(x_test, x_train, y_train)
    # the learned width: a Layer trained by fit, full batch (the leave-one-out keys/values of
    # every training input), plain SGD on the summed squared error as the book
    model = nw.nadaraya_watson_regression()
    keys, values = nw.leave_one_out(x_train, y_train)
    n = x_train.shape[0]
    _, params, state = model.init(k_init, ((n,), keys.shape, values.shape))
    data = ArrayLoader(((x_train, keys, values), y_train), n)
    res = fit(model, params, state, sgd(args.lr), data, epochs=args.epochs, key=k_init,
              loss=nw.summed_squared_error(), progress=False, print_fn=print)
    params = res.params
    y_p, w_p = nw.nadaraya_watson(x_test, x_train, y_train, params["w"][0])
    res = {"mse_average": mse(y_avg), "mse_nonparametric": mse(y_np),
           "mse_parametric": mse(y_p), "w": float(params["w"][0])}
    print(f"learned w = {res['w']:.3f}")
    print(f"test MSE: average pooling {res['mse_average']:.4f}, non-parametric "
          f"{res['mse_nonparametric']:.4f}, learned width {res['mse_parametric']:.4f}")

    if not args.no_plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(args.out, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(x_test, y_truth, label="truth")
        ax.plot(x_test, y_avg, "--", label="average pooling")
        ax.plot(x_test, y_np, "-.", label="non-parametric")
        ax.plot(x_test, y_p, ":", label=f"learned w={res['w']:.2f}")
        ax.plot(x_train, y_train, "o", alpha=0.5, markersize=3)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "regression.png"), dpi=120)
        plt.close(fig)
        for name, w in (("nonparametric", w_np), ("parametric", w_p)):
            fig, ax = plt.subplots(figsize=(4, 3.5))
            im = ax.imshow(w, cmap="Reds")
            ax.set_xlabel("sorted training inputs (keys)")
            ax.set_ylabel("sorted testing inputs (queries)")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, f"attention_{name}.png"), dpi=120)
            plt.close(fig)
        print(f"plots saved under {args.out}/")
    return res


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
