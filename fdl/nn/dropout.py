"""Inverted dropout."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from fdl.nn.core import Layer, require_key

__all__ = ["dropout"]


def dropout(rate: float) -> Layer:
    """Inverted dropout: in training, zero each element independently with probability
    ``rate`` and scale the survivors by ``1 / (1 - rate)`` so the expectation is unchanged.

    Input any shape; output the same shape and dtype. No params, no state.
    ``train=True`` needs ``key`` (a typed PRNG key; the mask is a pure function of it).
    ``train=False`` and ``rate == 0`` are the identity. ``rate`` must lie in ``[0, 1)``.
    """
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate must satisfy 0 <= rate < 1, got {rate!r}")
    rate = float(rate)

    def init(key, in_shape):
        return tuple(in_shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        if not train or rate == 0.0:
            return x, state
        require_key("dropout", key)
        keep = jax.random.bernoulli(key, 1.0 - rate, jnp.shape(x))
        scale = jnp.asarray(1.0 / (1.0 - rate), dtype=x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype)), state

    return Layer(init, apply, name="dropout", config={"rate": rate})
