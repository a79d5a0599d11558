"""Gradient clipping: by global norm (d2l's ``grad_clipping``) and by value."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fdl.optim._util import hyper, tmap
from fdl.optim.base import (
    EmptyState,
    GradientTransformation,
    check_range,
)

__all__ = [
    "global_norm",
    "clip_by_global_norm",
    "clip_by_value",
]


def global_norm(tree) -> jax.Array:
    """``sqrt(sum of squares of every leaf)``, accumulated in at least float32."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    sq = [jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))
          for x in leaves]
    return jnp.sqrt(sum(sq[1:], sq[0]))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale all gradients together so their global L2 norm is at most ``max_norm``::

        n = sqrt(sum_i ||g_i||^2);  u = g * min(1, max_norm / n)

    d2l's ``grad_clipping(net, theta)``. PyTorch's ``clip_grad_norm_`` divides by
    ``n + 1e-6`` instead of ``n``. Inside :func:`multi_steps`, it sees the accumulated gradient.
    """
    check_range("max_norm", max_norm, 0.0, lo_open=True, where="clip_by_global_norm")

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        n = global_norm(grads)
        factor = jnp.where(n > max_norm, max_norm / jnp.where(n > 0, n, 1.0), 1.0)
        return tmap(lambda g: g * factor.astype(g.dtype), grads), state

    return GradientTransformation(init, update)


def clip_by_value(lo: float, hi: float | None = None) -> GradientTransformation:
    """Clip every gradient element to ``[lo, hi]``; ``clip_by_value(c)`` clips to ``[-c, c]``
    (PyTorch ``clip_grad_value_(c)``)."""
    if hi is None:
        check_range("clip value", lo, 0.0, lo_open=True, where="clip_by_value")
        lo, hi = -lo, lo
    check_range("lo", lo, where="clip_by_value")
    check_range("hi", hi, where="clip_by_value")
    if lo > hi:
        raise ValueError(f"clip_by_value: need lo <= hi, got lo={lo}, hi={hi}")

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        return tmap(lambda g: jnp.clip(g, hyper(lo, g.dtype), hyper(hi, g.dtype)), grads), state

    return GradientTransformation(init, update)
