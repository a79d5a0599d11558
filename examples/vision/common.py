"""Shared pieces of the vision examples: the model table (the book's chapter models sized
for the offline digits set), data loading/resizing and a ``fit``-based training run."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdl import optim
from fdl.data import load_digits, load_fashion_mnist
from fdl.models import vision as V
from fdl.nn.core import Layer
from fdl.train import fit


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A chapter model with the settings its digits run uses (input size, epoch budget)."""

    build: Callable[[int, int], Layer]   # (num_classes, in_channels) -> model
    size: int                            # images are resized to size x size
    epochs: int                          # documented epoch budget (digits)
    lr: float = 1e-3                     # Adam learning rate
    batch_size: int = 64
    cosine: bool = False                 # cosine-decay the learning rate to 0 over the budget


RECIPES: dict[str, Recipe] = {
    # the book's LeNet (sigmoid + average pooling), 28x28
    "lenet": Recipe(lambda k, c: V.lenet5(k, c), 28, 20, lr=3e-3, batch_size=16),
    "lenet_bn": Recipe(lambda k, c: V.lenet5(k, c, batch_norm=True), 28, 10, lr=1e-2),
    # small-input AlexNet (3x3 stride-1 first conv), channels / 4, fc 256
    "alexnet": Recipe(lambda k, c: V.alexnet(k, c, small_input=True, width=0.25,
                                             fc_features=256), 32, 15),
    # VGG-11 spec with channels / 4 (the book's small_conv_arch ratio), fc 256
    "vgg": Recipe(lambda k, c: V.vgg(V.VGG11_ARCH, k, c, width=0.25, fc_features=256,
                                     pool_to=None), 32, 15),
    # NiN (no BatchNorm): Adam 1e-3 / batch 64 reached only 78% in 15 epochs; 3e-3 / batch 32
    "nin": Recipe(lambda k, c: V.nin(k, c, small_input=True, width=0.25), 32, 15, lr=3e-3,
                  batch_size=32, cosine=True),
    "googlenet": Recipe(lambda k, c: V.googlenet(k, c, small_input=True, width=0.25), 32, 10),
    "resnet18": Recipe(lambda k, c: V.resnet18(k, c, small_input=True, base_channels=16),
                       32, 6, cosine=True),
    # the book's DenseNet (4 blocks of 4 conv blocks), growth 16, 32x32
    "densenet": Recipe(lambda k, c: V.densenet_book(k, c, growth_rate=16,
                                                    num_init_features=32, small_input=True),
                       32, 10),
}


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(N, H, W, C)`` images to ``size x size`` (float32)."""
    if images.shape[1:3] == (size, size):
        return images.astype(np.float32)
    n, _, _, c = images.shape
    out = jax.image.resize(jnp.asarray(images, jnp.float32), (n, size, size, c), "bilinear")
    return np.asarray(out)


def load_data(data: str, size: int):
    """``((x_train, y_train), (x_test, y_test))`` resized to ``size``: ``"digits"`` (sklearn's
    offline 8x8 digits, 80/20 split) or a directory with Fashion-MNIST's IDX files."""
    if data == "digits":
        (xtr, ytr), (xte, yte) = load_digits()
    else:
        if not os.path.isdir(data):
            raise SystemExit(f"--data: '{data}' is neither 'digits' nor a directory with "
                             "Fashion-MNIST IDX files")
        (xtr, ytr), (xte, yte) = load_fashion_mnist(data, download_missing=False)
    return (resize(xtr, size), ytr), (resize(xte, size), yte)


def train(name: str, *, epochs: int | None = None, data: str = "digits", seed: int = 0,
          size: int | None = None, lr: float | None = None, batch_size: int | None = None,
          max_train: int | None = None, print_fn=print) -> dict[str, Any]:
    """Train chapter model ``name`` with Adam; returns the final metrics and wall time."""
    r = RECIPES[name]
    size = size or r.size
    epochs = epochs or r.epochs
    (xtr, ytr), (xte, yte) = load_data(data, size)
    if max_train:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    model = r.build(10, xtr.shape[-1])
    key = jax.random.key(seed)
    params, state = jax.jit(model.init_params, static_argnums=1)(
        jax.random.fold_in(key, 1), (1, *xtr.shape[1:]))
    lr = lr or r.lr
    bs = batch_size or r.batch_size
    if r.cosine:
        steps = epochs * -(-len(xtr) // bs)
        lr = optim.cosine_decay_schedule(lr, steps)
    t0 = time.time()
    res = fit(model, params, state, optim.adam(lr), (xtr, ytr),
              eval_data=(xte, yte), epochs=epochs, key=key,
              batch_size=bs, progress=False, print_fn=print_fn)
    last = res.history.last
    out = {"model": name, "epochs": epochs, "size": size,
           "train_loss": float(last["train_loss"]), "train_acc": float(last["train_acc"]),
           "test_acc": float(last["test_acc"]), "seconds": time.time() - t0,
           "params": res.params, "state": res.state}
    return out
