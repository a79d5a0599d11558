"""Nadaraya–Watson kernel regression, the book's introduction to attention ("Attention Pooling").

``f(q) = sum_i softmax_i(-((q - k_i) * w)**2 / 2) * v_i``: a Gaussian kernel over the keys turned
into attention weights. ``w = 1`` is the non-parametric estimator; learning ``w`` (one scalar
parameter) narrows the kernel. Data: d2l's ``y = 2 sin(x) + x**0.8 + eps`` on 50 sorted training
inputs in ``[0, 5)``, tested on ``arange(0, 5, 0.1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "average_pooling",
    "fit_nadaraya_watson",
    "init_nadaraya_watson",
    "leave_one_out",
    "nadaraya_watson",
    "nadaraya_watson_apply",
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


def init_nadaraya_watson(key) -> dict[str, jax.Array]:
    """Params ``{"w": (1,)}`` drawn from ``U(0, 1)`` as d2l's ``torch.rand((1,))``."""
    return {"w": jax.random.uniform(key, (1,))}


def nadaraya_watson_apply(params: dict[str, jax.Array], queries, keys, values
                          ) -> tuple[jax.Array, jax.Array]:
    """The learned-width estimator: :func:`nadaraya_watson` with ``w = params["w"]``."""
    return nadaraya_watson(queries, keys, values, params["w"][0])


def leave_one_out(x_train: jax.Array, y_train: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Training keys/values ``(n, n - 1)``: row ``i`` holds every training pair except ``i``
    (so the learned kernel cannot just copy each point's own target)."""
    n = x_train.shape[0]
    idx = jnp.array([[j for j in range(n) if j != i] for i in range(n)], jnp.int32)
    return x_train[idx], y_train[idx]


def fit_nadaraya_watson(params, x_train, y_train, *, lr: float = 0.5, epochs: int = 5
                        ) -> tuple[dict[str, jax.Array], list[float]]:
    """d2l's training: full-batch SGD on the summed squared error ``sum((y_hat - y)**2)`` of the
    leave-one-out estimator. Returns ``(params, losses per epoch)``."""
    keys, values = leave_one_out(x_train, y_train)

    def loss_fn(p):
        y_hat, _ = nadaraya_watson_apply(p, x_train, keys, values)
        return jnp.sum((y_hat - y_train) ** 2)

    step = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for _ in range(epochs):
        loss, g = step(params)
        params = jax.tree_util.tree_map(lambda p, gg: p - lr * gg, params, g)
        losses.append(float(loss))
    return params, losses
