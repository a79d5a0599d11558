"""Dense (fully connected) layer and flatten."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fdl.nn import initializers as inits
from fdl.nn.core import Layer, ShapeError, check_positive_int
from fdl.nn.matmul import matmul

__all__ = ["dense", "flatten"]


def dense(
    features: int,
    *,
    use_bias: bool = True,
    w_init: inits.Initializer | None = None,
    b_init: inits.Initializer = inits.zeros,
    dtype=jnp.float32,
) -> Layer:
    """``y = x @ w + b`` over the last axis. Input ``(..., in)``, output ``(..., features)``.

    Params: ``{"w": (in, features), "b": (features,)}``. ``w_init`` defaults to
    Kaiming-uniform with gain 1/sqrt(3) on fan-in, i.e. U(-1/sqrt(in), 1/sqrt(in)) like PyTorch's
    ``nn.Linear``.
    """
    check_positive_int("dense", "features", features)
    w_init = w_init or inits.kaiming_uniform("fan_in", gain=1.0 / math.sqrt(3.0))

    def init(key, in_shape):
        if len(in_shape) < 1:
            raise ShapeError("dense", f"expected input of rank >= 1 (..., in), got {in_shape}")
        n_in = in_shape[-1]
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, (n_in, features), dtype)}
        if use_bias:
            params["b"] = b_init(kb, (features,), dtype)
        return (*in_shape[:-1], features), params, {}

    def apply(params, state, x, *, key=None, train=False):
        w = params["w"]
        if x.ndim < 1 or x.shape[-1] != w.shape[0]:
            raise ShapeError(
                "dense", f"expected input (..., {w.shape[0]}), got shape {tuple(x.shape)}"
            )
        y = matmul(x, w)
        if use_bias:
            y = y + params["b"]
        return y, state

    return Layer(init, apply, name="dense", config={"features": features, "use_bias": use_bias})


def flatten() -> Layer:
    """Flatten all but the batch axis: ``(batch, ...) -> (batch, prod(...))``."""

    def init(key, in_shape):
        if len(in_shape) < 1:
            raise ShapeError("flatten", f"expected input of rank >= 1, got {in_shape}")
        return (in_shape[0], math.prod(in_shape[1:])), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return x.reshape(x.shape[0], -1), state

    return Layer(init, apply, name="flatten")
