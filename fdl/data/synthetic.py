"""Synthetic datasets from the d2l curriculum."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["synthetic_linear_data", "high_dim_linear_data"]


def synthetic_linear_data(key, w, b, num_examples: int, noise: float = 0.01,
                          dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """d2l's ``synthetic_data``: ``X ~ N(0, 1)`` of shape ``(n, len(w))`` and
    ``y = X w + b + N(0, noise^2)`` of shape ``(n, 1)``."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    w = jnp.asarray(w, dtype).reshape(-1)
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (num_examples, w.shape[0]), dtype)
    y = x @ w + jnp.asarray(b, dtype)
    y = y + noise * jax.random.normal(kn, y.shape, dtype)
    return x, y.reshape(-1, 1)


def high_dim_linear_data(key, num_train: int = 20, num_test: int = 100, num_inputs: int = 200,
                         noise: float = 0.01, dtype=jnp.float32):
    """d2l's weight-decay demo (§3.7): ``y = 0.05 + sum_i 0.01 x_i + noise`` with 200 inputs and
    only 20 training examples. Returns ``((x_train, y_train), (x_test, y_test))``."""
    w = jnp.full((num_inputs,), 0.01, dtype)
    k1, k2 = jax.random.split(key)
    train = synthetic_linear_data(k1, w, 0.05, num_train, noise, dtype)
    test = synthetic_linear_data(k2, w, 0.05, num_test, noise, dtype)
    return train, test
