"""Momentum: the heavy-ball / Nesterov trace."""

from __future__ import annotations

from typing import Any, NamedTuple

from fdl.optim._util import hyper, tmap, unzip, zeros_like
from fdl.optim.base import (
    GradientTransformation,
    check_range,
    check_same_structure,
)

__all__ = [
    "TraceState",
    "trace",
]


class TraceState(NamedTuple):
    """``momentum``: the momentum buffer, one leaf per parameter."""

    momentum: Any


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum buffer ``b = decay * b + g``; ``u = b`` (or ``g + decay * b``).

    With ``nesterov``, ``u = g + decay * b`` (PyTorch's / Sutskever's Nesterov form). The
    buffer starts at zero, which equals PyTorch's ``b_1 = g_1`` (no dampening).
    Placed *before* ``scale_by_learning_rate`` this is PyTorch's SGD momentum; placed after
    it (accumulating ``-lr * g``), Gluon's / d2l's form ``v = mu v - lr g; w += v``.
    """
    check_range("momentum decay", decay, 0.0, 1.0, hi_open=True, where="trace")

    def init(params):
        return TraceState(zeros_like(params))

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.momentum, "grads", "momentum buffer")

        def leaf(g, b):
            d = hyper(decay, g.dtype)
            b = d * b + g
            return (g + d * b if nesterov else b), b

        out = tmap(leaf, grads, state.momentum)
        updates, buf = unzip(out, grads, 2)
        return updates, TraceState(buf)

    return GradientTransformation(init, update)
