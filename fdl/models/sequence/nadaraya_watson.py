"""Nadaraya–Watson kernel regression, the book's introduction to attention ("Attention Pooling").

``f(q) = sum_i softmax_i(-((q - k_i) * w)**2 / 2) * v_i``: a Gaussian kernel over the keys turned
into attention weights. ``w = 1`` is the non-parametric estimator; learning ``w`` (one scalar
parameter) narrows the kernel. Data: d2l's ``y = 2 sin(x) + x**0.8 + eps`` on 50 sorted training
inputs in ``[0, 5)``, tested on ``arange(0, 5, 0.1)``.

The learned estimator is a Layer, :func:`nadaraya_watson_regression`, trained by
:func:`fdl.train.fit` like every model (the book: full-batch SGD, lr 0.5, on the summed squared
error, :func:`summed_squared_error`, of the leave-one-out estimator, :func:`leave_one_out`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fdl.nn.core import Layer, ShapeError

__all__ = [
    "average_pooling",
    "leave_one_out",
    "nadaraya_watson",
    "nadaraya_watson_regression",
    "summed_squared_error",
    "synthetic_data",
    "target_fn",
]


def target_fn(x: jax.Array) -> jax.Array:
    """d2l's ``f(x) = 2 sin(x) + x**0.8``."""
    return 2 * jnp.sin(x) + x**0.8


def synthetic_data(key, n_train: int = 50, noise: float = 0.5
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(x_train (n,), y_train (n,), x_test (50,), y_truth (50,))``: sorted uniform inputs on
    ``[0, 5)``, targets with Gaussian noise of std ``noise``; test inputs ``arange(0, 5, 0.1)``."""
    if not isinstance(n_train, int) or n_train < 2:
        raise ValueError(f"synthetic_data: n_train must be an integer >= 2, got {n_train!r}")
    kx, ky = jax.random.split(key)
    x_train = jnp.sort(jax.random.uniform(kx, (n_train,)) * 5)
    y_train = target_fn(x_train) + noise * jax.random.normal(ky, (n_train,))
    x_test = jnp.arange(0, 5, 0.1, dtype=jnp.float32)
    return x_train, y_train, x_test, target_fn(x_test)


def average_pooling(y_train: jax.Array, n_test: int) -> jax.Array:
    """The trivial estimator: the mean of the training targets for every query."""
    return jnp.full((n_test,), jnp.mean(y_train))


def nadaraya_watson(queries: jax.Array, keys: jax.Array, values: jax.Array,
                    w: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Gaussian-kernel attention pooling.

    ``queries (n_q,)``; ``keys``/``values`` either ``(n_k,)`` (shared by every query) or
    ``(n_q, n_k)`` (one key set per query). Returns ``(y_hat (n_q,), weights (n_q, n_k))``.
    """
    queries = jnp.asarray(queries)
    keys, values = jnp.asarray(keys), jnp.asarray(values)
    if keys.shape != values.shape or keys.ndim not in (1, 2):
        raise ValueError(f"nadaraya_watson: keys and values must both be (n_k,) or (n_q, n_k), "
                         f"got {keys.shape} and {values.shape}")
    if queries.ndim != 1 or (keys.ndim == 2 and keys.shape[0] != queries.shape[0]):
        raise ValueError(f"nadaraya_watson: queries must be (n_q,) matching keys, got "
                         f"{queries.shape} and keys {keys.shape}")
    if keys.ndim == 1:
        keys = jnp.broadcast_to(keys, (queries.shape[0], keys.shape[0]))
        values = jnp.broadcast_to(values, keys.shape)
    weights = jax.nn.softmax(-(((queries[:, None] - keys) * w) ** 2) / 2, axis=-1)
    return jnp.sum(weights * values, axis=-1), weights


def _unpack(x):
    if not (isinstance(x, (tuple, list)) and len(x) == 3):
        raise ShapeError("nadaraya_watson", "expected x = (queries (n_q,), keys, values) with "
                         f"keys/values (n_k,) or (n_q, n_k), got {type(x).__name__}")
    return x


def nadaraya_watson_regression() -> Layer:
    """The learned-width estimator as a Layer: ``x = (queries (n_q,), keys, values)`` (keys
    and values ``(n_k,)`` shared by every query, or ``(n_q, n_k)``) -> ``y_hat (n_q,)``;
    params ``{"w": (1,)}`` drawn from ``U(0, 1)`` as d2l's ``torch.rand((1,))``; no state.
    The attention weights are :func:`nadaraya_watson` with ``w = params["w"][0]``."""

    def init(key, in_shape):
        q_shape, k_shape, v_shape = _unpack(in_shape)
        if len(q_shape) != 1 or tuple(k_shape) != tuple(v_shape) or len(k_shape) not in (1, 2):
            raise ShapeError("nadaraya_watson", f"expected queries (n_q,) and keys/values "
                             f"(n_k,) or (n_q, n_k), got {q_shape}, {k_shape}, {v_shape}")
        return tuple(q_shape), {"w": jax.random.uniform(key, (1,))}, {}

    def apply(params, state, x, *, key=None, train=False):
        queries, keys, values = _unpack(x)
        y_hat, _ = nadaraya_watson(queries, keys, values, params["w"][0])
        return y_hat, state

    return Layer(init, apply, name="nadaraya_watson")


def summed_squared_error():
    """The book's objective for the learned width, ``sum((y_hat - y)**2)`` over the batch, as
    an :class:`fdl.train.Objective` (the logged loss is that sum)."""
    from fdl.train import Objective

    def fn(y_hat, y, mask):
        sq = (y_hat - y) ** 2
        return jnp.sum(sq if mask is None else sq * mask), {}

    return Objective(fn)


def leave_one_out(x_train: jax.Array, y_train: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Training keys/values ``(n, n - 1)``: row ``i`` holds every training pair except ``i``
    (so the learned kernel cannot just copy each point's own target)."""
    n = x_train.shape[0]
    idx = jnp.array([[j for j in range(n) if j != i] for i in range(n)], jnp.int32)
    return x_train[idx], y_train[idx]
