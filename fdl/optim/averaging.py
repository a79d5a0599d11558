"""Exponential moving average of the params (an optimizer wrapper).

``opt = ema(sgd(0.1, momentum=0.9), decay=0.999)`` trains exactly as the inner optimizer and
also keeps, in its state, ``avg = decay * avg + (1 - decay) * params_after_step`` after every
step, starting from the initial params (timm's ``ModelEmaV2``, TensorFlow's
``ExponentialMovingAverage``; PyTorch's ``AveragedModel(get_ema_multi_avg_fn(decay))`` equals it
when ``update_parameters`` is called once before training and after every step).
:func:`ema_params` reads the average, to evaluate or save instead of the raw params.

BatchNorm running statistics are model *state*, not params: evaluate the average with the
live model's running statistics (usual practice), or re-estimate them for the averaged params
with a few forward passes in ``train=True`` mode.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.optim._util import count0, hyper, tmap
from fdl.optim.base import GradientTransformation, check_range, safe_increment

__all__ = ["EmaState", "ema", "ema_params"]


class EmaState(NamedTuple):
    """``count`` (int32) updates averaged, ``params``: the average, the inner state."""

    count: jax.Array
    params: Any
    inner_state: Any


def ema(inner: GradientTransformation, decay: float = 0.999, *, warmup: bool = False
        ) -> GradientTransformation:
    """Wrap ``inner``; its updates are returned unchanged, the state also averages the params.

    After step ``t`` (1-based): ``avg = d_t * avg + (1 - d_t) * (params + updates)`` with
    ``d_t = decay``, or with ``warmup`` ``d_t = min(decay, (1 + t) / (10 + t))`` (TensorFlow's
    ``num_updates`` form: the average follows the params quickly at first). The average is kept
    in each param's dtype. ``update`` needs ``params``.
    """
    check_range("decay", decay, 0.0, 1.0, where="ema")

    def init(params):
        return EmaState(count0(), tmap(jnp.array, params), inner.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("ema needs params: call update(grads, state, params)")
        updates, inner_state = inner.update(grads, state.inner_state, params)
        count = safe_increment(state.count)

        def leaf(avg, p, u):
            dt = avg.dtype
            d = hyper(decay, dt)
            if warmup:
                t = count.astype(dt)
                d = jnp.minimum(d, (1 + t) / (10 + t))
            return avg + (1 - d) * ((p + u).astype(dt) - avg)  # lerp, as torch's EMA

        avg = tmap(leaf, state.params, params, updates)
        return updates, EmaState(count, avg, inner_state)

    return GradientTransformation(init, update)


def _find_ema(state):
    if isinstance(state, EmaState):
        return state
    if isinstance(state, (tuple, list)):
        for s in state:
            found = _find_ema(s)
            if found is not None:
                return found
    if isinstance(state, dict):
        for s in state.values():
            found = _find_ema(s)
            if found is not None:
                return found
    return None


def ema_params(opt_state) -> Any:
    """The averaged params held by the first :func:`ema` in ``opt_state``.

    Raises ``ValueError`` if the optimizer state has no EMA."""
    found = _find_ema(opt_state)
    if found is None:
        raise ValueError("ema_params: this optimizer state holds no ema(...) average")
    return found.params
