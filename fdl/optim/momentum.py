"""Momentum: the heavy-ball / Nesterov trace."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.optim._util import count0, hyper, static_zero, tmap, unzip, zeros_like
from fdl.optim.base import (
    GradientTransformation,
    check_range,
    check_same_structure,
    safe_increment,
)

__all__ = [
    "TraceState",
    "DampedTraceState",
    "trace",
]


class TraceState(NamedTuple):
    """``momentum``: the momentum buffer, one leaf per parameter."""

    momentum: Any


class DampedTraceState(NamedTuple):
    """``count``: updates made (int32; the first one fills the buffer undamped);
    ``momentum``: the buffer."""

    count: jax.Array
    momentum: Any


def _nonzero_number(x) -> bool:
    """True for a concrete nonzero scalar (a tracer is not concrete: False)."""
    if isinstance(x, jax.core.Tracer):
        return False
    return float(x) != 0.0


def trace(decay: float, nesterov: bool = False, dampening: float | None = None
          ) -> GradientTransformation:
    """Heavy-ball momentum buffer ``b = decay * b + (1 - dampening) * g``; ``u = b``.

    With ``nesterov``, ``u = g + decay * b`` (PyTorch's / Sutskever's Nesterov form). The
    buffer starts at zero, which equals PyTorch's ``b_1 = g_1`` without dampening. With
    ``dampening`` (PyTorch's ``SGD(dampening=...)``) the first step sets ``b_1 = g_1``
    undamped, as PyTorch does, and the state is a :class:`DampedTraceState` (with a step
    count); Nesterov needs ``dampening == 0`` (PyTorch refuses it too). ``None`` (default)
    and ``0`` are no dampening; an array (e.g. injected by :func:`inject_hyperparams`) always
    takes the dampened form.
    Placed *before* ``scale_by_learning_rate`` this is PyTorch's SGD momentum; placed after
    it (accumulating ``-lr * g``), Gluon's / d2l's form ``v = mu v - lr g; w += v``.
    """
    check_range("momentum decay", decay, 0.0, 1.0, hi_open=True, where="trace")
    damped = dampening is not None and not static_zero(dampening)
    if damped:
        check_range("dampening", dampening, 0.0, 1.0, where="trace")
    if nesterov and damped and _nonzero_number(dampening):
        raise ValueError(f"trace: Nesterov momentum needs dampening == 0, got {dampening!r}")

    def init(params):
        if damped:
            return DampedTraceState(count0(), zeros_like(params))
        return TraceState(zeros_like(params))

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.momentum, "grads", "momentum buffer")
        first = state.count == 0 if damped else None

        def leaf(g, b):
            d = hyper(decay, g.dtype)
            if damped:
                b = jnp.where(first, g, d * b + (1 - hyper(dampening, g.dtype)) * g)
            else:
                b = d * b + g
            return (g + d * b if nesterov else b), b

        out = tmap(leaf, grads, state.momentum)
        updates, buf = unzip(out, grads, 2)
        if damped:
            return updates, DampedTraceState(safe_increment(state.count), buf)
        return updates, TraceState(buf)

    return GradientTransformation(init, update)
