"""Small models and data shared by the training tests."""

import jax
import jax.numpy as jnp
import numpy as np

from fdl import nn


def tiny_mlp(dropout=0.0, bn=True):
    layers = [("fc1", nn.dense(16))]
    if bn:
        layers.append(("bn1", nn.batch_norm()))
    layers.append(("act", nn.relu()))
    if dropout:
        layers.append(("drop", nn.dropout(dropout)))
    layers.append(("fc2", nn.dense(3)))
    return nn.serial(*layers)


def blobs(n=40, d=5, seed=0):
    centers = np.random.default_rng(123).normal(0, 2, (3, d))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    x = (centers[y] + rng.normal(0, 1, (n, d))).astype(np.float32)
    return x, y


def init(model, d=5, seed=0):
    _, params, state = model.init(jax.random.key(seed), (1, d))
    return params, state


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.tobytes() != y.tobytes():
            return False
    return True


def f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
