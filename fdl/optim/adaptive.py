"""Adaptive per-parameter scalings: Adam (AMSGrad), RMSProp (centered), AdaGrad, AdaDelta."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.optim._util import count0, hyper, tmap, unzip, zeros_like
from fdl.optim.base import (
    GradientTransformation,
    check_range,
    check_same_structure,
    safe_increment,
)

__all__ = [
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByAdagradState",
    "ScaleByAdadeltaState",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_adagrad",
    "scale_by_adadelta",
    "bias_corrections",
    "adam_moments",
    "adam_direction",
]


class ScaleByAdamState(NamedTuple):
    """``count`` (int32), first/second moments ``mu``/``nu``, ``nu_max`` (AMSGrad, else None)."""

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def _check_betas(where: str, **betas) -> None:
    for name, b in betas.items():
        check_range(name, b, 0.0, 1.0, hi_open=True, where=where)


def bias_corrections(count, b1, b2) -> tuple[jax.Array, jax.Array]:
    """Adam's ``(1 / (1 - b1^t), 1 / sqrt(1 - b2^t))`` at step ``t = count`` (default float)."""
    t = count.astype(float)
    bc1 = 1.0 - jnp.asarray(b1, float) ** t
    bc2 = 1.0 - jnp.asarray(b2, float) ** t
    return 1.0 / bc1, 1.0 / jnp.sqrt(bc2)


def adam_moments(g, m, v, b1, b2):
    """The new moments ``(b1 m + (1 - b1) g, b2 v + (1 - b2) g^2)``, as PyTorch computes them
    (the first as a lerp)."""
    dt = g.dtype
    m = m + (1 - hyper(b1, dt)) * (g - m)
    v = hyper(b2, dt) * v + (1 - hyper(b2, dt)) * (g * g)
    return m, v


def adam_direction(m, v, inv_bc1, inv_sqrt_bc2, eps):
    """Adam's update direction ``(m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)``."""
    return (m * inv_bc1) / (jnp.sqrt(v) * inv_sqrt_bc2 + hyper(eps, m.dtype))


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                  amsgrad: bool = False) -> GradientTransformation:
    """Adam's direction with bias correction (Kingma & Ba), in PyTorch's arithmetic::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  t = count + 1
        u = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``eps`` sits *outside* the square root, added to the bias-corrected ``sqrt(v_hat)``
    (PyTorch and optax; TensorFlow's Keras adds it to the uncorrected ``sqrt(v)``).
    AMSGrad keeps ``v_max = max(v_max, v)`` of the *uncorrected* ``v`` and uses it in place
    of ``v`` (PyTorch; optax takes the maximum of the corrected ``v_hat`` instead).
    """
    where = "scale_by_adam"
    _check_betas(where, b1=b1, b2=b2)
    check_range("eps", eps, 0.0, lo_open=True, where=where)

    def init(params):
        return ScaleByAdamState(count0(), zeros_like(params), zeros_like(params),
                                zeros_like(params) if amsgrad else None)

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.mu, "grads", "optimizer state")
        count = safe_increment(state.count)
        inv_bc1, inv_sqrt_bc2 = bias_corrections(count, b1, b2)

        def leaf(g, m, v, vmax=None):
            dt = g.dtype
            m, v = adam_moments(g, m, v, b1, b2)
            vv = v
            if vmax is not None:
                vmax = jnp.maximum(vmax, v)
                vv = vmax
            u = adam_direction(m, vv, inv_bc1.astype(dt), inv_sqrt_bc2.astype(dt), eps)
            return (u, m, v, vmax) if vmax is not None else (u, m, v)

        if amsgrad:
            out = tmap(leaf, grads, state.mu, state.nu, state.nu_max)
            u, mu, nu, nu_max = unzip(out, grads, 4)
        else:
            out = tmap(leaf, grads, state.mu, state.nu)
            (u, mu, nu), nu_max = unzip(out, grads, 3), None
        return u, ScaleByAdamState(count, mu, nu, nu_max)

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    """``nu``: running mean of ``g^2``; ``mu``: running mean of ``g`` (centered, else None)."""

    nu: Any
    mu: Any


def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8, *, centered: bool = False
                 ) -> GradientTransformation:
    """RMSProp's direction (Tieleman & Hinton), PyTorch's arithmetic::

        s = alpha s + (1 - alpha) g^2;       u = g / (sqrt(s) + eps)
        centered: a = alpha a + (1 - alpha) g;  u = g / (sqrt(s - a^2) + eps)

    ``eps`` outside the root, state starting at 0 (PyTorch; optax puts ``eps`` inside the
    root; d2l's ``rmsprop`` adds it outside as here). ``alpha`` is d2l's ``gamma``.
    """
    where = "scale_by_rms"
    check_range("alpha", alpha, 0.0, 1.0, hi_open=True, where=where)
    check_range("eps", eps, 0.0, lo_open=True, where=where)

    def init(params):
        return ScaleByRmsState(zeros_like(params), zeros_like(params) if centered else None)

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.nu, "grads", "optimizer state")

        def leaf(g, s, a=None):
            dt = g.dtype
            al = hyper(alpha, dt)
            s = al * s + (1 - al) * (g * g)
            if a is not None:
                a = a + (1 - al) * (g - a)  # PyTorch's lerp: fewer roundings in s - a^2
                return g / (jnp.sqrt(s - a * a) + hyper(eps, dt)), s, a
            return g / (jnp.sqrt(s) + hyper(eps, dt)), s

        if centered:
            u, nu, mu = unzip(tmap(leaf, grads, state.nu, state.mu), grads, 3)
        else:
            (u, nu), mu = unzip(tmap(leaf, grads, state.nu), grads, 2), None
        return u, ScaleByRmsState(nu, mu)

    return GradientTransformation(init, update)


class ScaleByAdagradState(NamedTuple):
    """``sum_of_squares``: the running sum of ``g^2``."""

    sum_of_squares: Any


def scale_by_adagrad(initial_accumulator_value: float = 0.0, eps: float = 1e-10
                     ) -> GradientTransformation:
    """AdaGrad's direction (Duchi et al.): ``s += g^2;  u = g / (sqrt(s) + eps)``.

    ``eps`` outside the root as PyTorch (default 1e-10) and d2l (1e-6); optax puts it
    inside (``rsqrt(s + eps)``).
    """
    where = "scale_by_adagrad"
    check_range("initial_accumulator_value", initial_accumulator_value, 0.0, where=where)
    check_range("eps", eps, 0.0, lo_open=True, where=where)

    def init(params):
        return ScaleByAdagradState(tmap(
            lambda p: jnp.full_like(p, initial_accumulator_value), params))

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.sum_of_squares, "grads", "optimizer state")

        def leaf(g, s):
            s = s + g * g
            return g / (jnp.sqrt(s) + hyper(eps, g.dtype)), s

        u, s = unzip(tmap(leaf, grads, state.sum_of_squares), grads, 2)
        return u, ScaleByAdagradState(s)

    return GradientTransformation(init, update)


class ScaleByAdadeltaState(NamedTuple):
    """``sq_avg``: running mean of ``g^2``; ``delta_avg``: running mean of the squared steps."""

    sq_avg: Any
    delta_avg: Any


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    """AdaDelta's step (Zeiler), without a learning rate::

        s = rho s + (1 - rho) g^2;  d = sqrt(D + eps) / sqrt(s + eps) * g
        D = rho D + (1 - rho) d^2;  u = d

    ``eps`` inside both roots (Zeiler, PyTorch, d2l). PyTorch multiplies ``d`` by an extra
    ``lr`` (default 1.0): chain with :func:`scale_by_learning_rate` for that.
    """
    where = "scale_by_adadelta"
    check_range("rho", rho, 0.0, 1.0, where=where)
    check_range("eps", eps, 0.0, lo_open=True, where=where)

    def init(params):
        return ScaleByAdadeltaState(zeros_like(params), zeros_like(params))

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.sq_avg, "grads", "optimizer state")

        def leaf(g, s, dsum):
            dt = g.dtype
            r, e = hyper(rho, dt), hyper(eps, dt)
            s = r * s + (1 - r) * (g * g)
            d = jnp.sqrt(dsum + e) / jnp.sqrt(s + e) * g
            dsum = r * dsum + (1 - r) * (d * d)
            return d, s, dsum

        u, s, dsum = unzip(tmap(leaf, grads, state.sq_avg, state.delta_avg), grads, 3)
        return u, ScaleByAdadeltaState(s, dsum)

    return GradientTransformation(init, update)
