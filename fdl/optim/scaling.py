"""Scaling by a constant and by a learning rate (or schedule) kept readable in the state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fdl.optim._util import count0, hyper, tmap
from fdl.optim.base import (
    EmptyState,
    GradientTransformation,
    Schedule,
    check_lr,
    check_range,
    safe_increment,
)

__all__ = [
    "ScaleByLearningRateState",
    "scale",
    "scale_by_learning_rate",
]


def scale(factor: float) -> GradientTransformation:
    """``u = factor * g`` (stateless)."""
    check_range("factor", factor, where="scale")

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        return tmap(lambda g: g * hyper(factor, g.dtype), grads), state

    return GradientTransformation(init, update)


class ScaleByLearningRateState(NamedTuple):
    """``count``: updates applied (int32); ``lr``: the learning rate the last update used."""

    count: jax.Array
    lr: jax.Array


def scale_by_learning_rate(lr: float | Schedule, *, flip_sign: bool = True
                           ) -> GradientTransformation:
    """``u = -lr(t) * g`` (``+`` with ``flip_sign=False``); ``lr`` a number or a schedule.

    The state records the step count and the learning rate last applied, so
    :func:`fdl.optim.current_lr` can read it for logging.
    """
    check_lr(lr, where="scale_by_learning_rate")
    sign = -1.0 if flip_sign else 1.0

    def value(count):
        v = lr(count) if callable(lr) else lr
        return jnp.asarray(v, dtype=float)

    def init(params):
        del params
        return ScaleByLearningRateState(count0(), value(count0()))

    def update(grads, state, params=None):
        del params
        if callable(lr) or not isinstance(lr, (int, float)):
            v = value(state.count)
            step = sign * v
        else:  # a Python constant: stays weakly typed, exact in every dtype
            v = state.lr
            step = sign * lr
        updates = tmap(lambda g: g * hyper(step, g.dtype), grads)
        return updates, ScaleByLearningRateState(safe_increment(state.count), v)

    return GradientTransformation(init, update)
