"""LeNet-5 with and without BatchNorm on the digits (d2l 7.6 and 8.5).

The 8x8 scikit-learn digits (offline) are resized to LeNet's 28x28 input. Both networks are the
book's (sigmoid activations, average pooling; ``fdl.models.vision.lenet5``) trained with the same
SGD settings; the BatchNorm version converges much faster: compare the test accuracy per epoch.

    python examples/lenet.py [--epochs 10] [--lr 0.9]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from fdl import optim
from fdl.data import load_digits
from fdl.models.vision import lenet5
from fdl.train import fit


def digits_28():
    (x, y), (xt, yt) = load_digits()

    def up(a):
        return np.asarray(jax.image.resize(a, (a.shape[0], 28, 28, 1), "bilinear"))

    return (up(x), y), (up(xt), yt)


def train(batch_norm: bool, train_data, test_data, *, epochs: int, lr: float, batch_size: int):
    model = lenet5(batch_norm=batch_norm)
    _, params, state = model.init(jax.random.key(0), (1, 28, 28, 1))
    tag = "lenet+bn" if batch_norm else "lenet"
    res = fit(model, params, state, optim.sgd(lr), train_data, eval_data=test_data,
              batch_size=batch_size, epochs=epochs, key=jax.random.key(1), progress=False,
              print_fn=lambda s: print(f"[{tag}]", s))
    return res.history["test_acc"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="use only this many examples")
    args = ap.parse_args(argv)
    tr, te = digits_28()
    if args.limit:
        tr = (tr[0][: args.limit], tr[1][: args.limit])
        te = (te[0][: args.limit], te[1][: args.limit])
    kw = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    plain = train(False, tr, te, **kw)
    bn = train(True, tr, te, **kw)
    print("epoch  lenet  lenet+bn")
    for i, (a, b) in enumerate(zip(plain, bn, strict=True)):
        print(f"{i + 1:5d}  {a:.3f}  {b:.3f}")
    print(f"final: LeNet test acc {plain[-1]:.4f}, LeNet+BatchNorm test acc {bn[-1]:.4f}")
    return {"lenet": plain, "lenet_bn": bn}


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
