"""Hyperparameters as state: change a learning rate (or any number) without recompiling."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.optim._util import count0
from fdl.optim.base import (
    GradientTransformation,
    check_range,
    safe_increment,
)

__all__ = [
    "InjectHyperparamsState",
    "inject_hyperparams",
    "set_hyperparams",
]


class InjectHyperparamsState(NamedTuple):
    """``count`` (int32), ``hyperparams`` (name -> scalar array), the inner state."""

    count: jax.Array
    hyperparams: dict[str, jax.Array]
    inner_state: Any


def inject_hyperparams(factory: Callable[..., GradientTransformation],
                       static_args: Sequence[str] = ()) -> Callable[..., GradientTransformation]:
    """Wrap an optimizer factory so its numeric hyperparameters live in the state.

    ``opt = inject_hyperparams(adam)(lr=1e-3, b1=0.9)``: every int/float argument becomes a
    scalar array in ``state.hyperparams`` that :func:`set_hyperparams` changes between steps
    without recompiling a jitted step; callable arguments are schedules evaluated at the step
    count. Bools, strings, None and the names in ``static_args`` stay fixed.
    """
    sig = inspect.signature(factory)
    static_args = set(static_args)

    def build(*args, **kwargs) -> GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        static, numeric, scheds = {}, {}, {}
        for name, v in bound.arguments.items():
            if name in static_args or v is None or isinstance(v, (bool, str)):
                static[name] = v
            elif callable(v):
                scheds[name] = v
            elif isinstance(v, (int, float)) or (hasattr(v, "dtype") and jnp.ndim(v) == 0):
                numeric[name] = v
            else:
                static[name] = v
        factory(**bound.arguments)  # validate the initial values now

        def hp_at(count, stored):
            hps = dict(stored)
            for name, s in scheds.items():
                hps[name] = jnp.asarray(s(count), dtype=float)
            return hps

        def init(params):
            hps = {n: jnp.asarray(v, dtype=float) for n, v in numeric.items()}
            hps = hp_at(count0(), hps)
            inner = factory(**static, **hps)
            return InjectHyperparamsState(count0(), hps, inner.init(params))

        def update(grads, state, params=None):
            hps = hp_at(state.count, state.hyperparams)
            inner = factory(**static, **hps)
            u, s = inner.update(grads, state.inner_state, params)
            return u, InjectHyperparamsState(safe_increment(state.count), hps, s)

        return GradientTransformation(init, update)

    return build


def _replace_inject(state, fn):
    if isinstance(state, InjectHyperparamsState):
        return fn(state), True
    if isinstance(state, tuple):
        parts, hit = [], False
        for s in state:
            s2, h = (s, False) if hit else _replace_inject(s, fn)
            parts.append(s2)
            hit |= h
        return (type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)), hit
    return state, False


def set_hyperparams(opt_state, **values) -> Any:
    """A copy of ``opt_state`` with the injected hyperparameters ``values`` replaced.

    Values keep the stored dtype and shape, so a jitted step does not recompile. Names that
    were not injected, and negative or non-finite learning rates, raise ``ValueError``.
    """
    def fn(s: InjectHyperparamsState):
        hps = dict(s.hyperparams)
        for name, v in values.items():
            if name not in hps:
                raise ValueError(f"set_hyperparams: {name!r} is not an injected hyperparameter; "
                                 f"injected: {sorted(hps)}")
            if name in ("lr", "learning_rate"):
                check_range(name, v, 0.0, where="set_hyperparams")
            hps[name] = jnp.asarray(v, dtype=hps[name].dtype).reshape(hps[name].shape)
        return s._replace(hyperparams=hps)

    new, hit = _replace_inject(opt_state, fn)
    if not hit:
        raise ValueError("set_hyperparams: no inject_hyperparams state found in opt_state")
    return new
