"""Dynamic loss scaling for float16 training (an optimizer wrapper).

float16 gradients below ~6e-5 flush to zero. The step multiplies the loss by a scale ``S``
(:func:`loss_scale` of the optimizer state) before differentiating, so the backward pass runs
on ``S``-times larger numbers; :func:`dynamic_loss_scale` divides the gradients by ``S``
before the inner optimizer sees them, and adapts ``S`` (the scheme of PyTorch's
``GradScaler`` and NVIDIA's apex):

- a step whose gradients are all finite is applied; after ``growth_interval`` such steps in
  a row, ``S *= factor``;
- a step with an Inf/NaN gradient (the scaled backward pass overflowed) is skipped (zero
  updates, inner state unchanged) and ``S = max(S / factor, min_scale)``.

With bfloat16 (float32's exponent range) no loss scaling is needed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.optim._util import count0, tmap, zeros_like
from fdl.optim.base import GradientTransformation, check_range, safe_increment

__all__ = ["DynamicLossScaleState", "dynamic_loss_scale", "loss_scale", "all_finite"]


class DynamicLossScaleState(NamedTuple):
    """``scale`` (float32), ``good_steps`` since the last change, ``skipped`` steps (int32),
    and the inner optimizer's state."""

    scale: jax.Array
    good_steps: jax.Array
    skipped: jax.Array
    inner_state: Any


def all_finite(tree) -> jax.Array:
    """A bool scalar: every element of every leaf is finite."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def dynamic_loss_scale(inner: GradientTransformation, *, init_scale: float = 2.0 ** 15,
                       growth_interval: int = 2000, factor: float = 2.0,
                       min_scale: float = 1.0) -> GradientTransformation:
    """Wrap ``inner`` to take gradients of ``loss * S`` and adapt ``S`` (module docstring).

    Defaults are PyTorch's ``GradScaler`` (``init_scale=2**16`` there; 2**15 here so that the
    first scaled float16 loss of a cross-entropy near ``log(1000)`` stays finite).
    """
    where = "dynamic_loss_scale"
    check_range("init_scale", init_scale, 0.0, lo_open=True, where=where)
    check_range("factor", factor, 1.0, lo_open=True, where=where)
    check_range("min_scale", min_scale, 0.0, lo_open=True, where=where)
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) \
            or growth_interval < 1:
        raise ValueError(f"{where}: growth_interval must be an int >= 1, got {growth_interval!r}")

    def init(params):
        return DynamicLossScaleState(jnp.asarray(init_scale, jnp.float32), count0(), count0(),
                                     inner.init(params))

    def update(grads, state, params=None):
        inv = 1.0 / state.scale
        grads = tmap(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype)
                     if jnp.issubdtype(g.dtype, jnp.floating) else g, grads)
        ok = all_finite(grads)

        def step(_):
            u, s = inner.update(grads, state.inner_state, params)
            good = safe_increment(state.good_steps)
            grow = good >= growth_interval
            scale = jnp.where(grow, state.scale * factor, state.scale)
            return u, s, scale, jnp.where(grow, 0, good).astype(jnp.int32), state.skipped

        def skip(_):
            scale = jnp.maximum(state.scale / factor, min_scale)
            return (zeros_like(grads), state.inner_state, scale.astype(jnp.float32), count0(),
                    safe_increment(state.skipped))

        u, s, scale, good, skipped = jax.lax.cond(ok, step, skip, None)
        return u, DynamicLossScaleState(scale, good, skipped, s)

    return GradientTransformation(init, update)


def _find_scale(state):
    if isinstance(state, DynamicLossScaleState):
        return state.scale
    if isinstance(state, (tuple, list)):
        for s in state:
            found = _find_scale(s)
            if found is not None:
                return found
    if isinstance(state, dict):
        for s in state.values():
            found = _find_scale(s)
            if found is not None:
                return found
    return None


def loss_scale(opt_state) -> jax.Array | float:
    """The factor to multiply the loss by before ``grad``: the scale of the first
    :func:`dynamic_loss_scale` in ``opt_state``, or ``1.0`` if it has none."""
    found = _find_scale(opt_state)
    return 1.0 if found is None else found
