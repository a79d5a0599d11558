"""Parameter initializers: ``init(key, shape, dtype=float32) -> array``.

Fan computation follows the layouts of DESIGN.md: dense kernels ``(in, out)``, conv kernels
``(*spatial, in/groups, out)`` (HWIO), so ``fan_in = prod(shape[:-1])`` and
``fan_out = prod(spatial) * out``. Any callable with the same signature can be passed to a
layer instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

__all__ = [
    "Initializer",
    "zeros",
    "ones",
    "constant",
    "normal",
    "uniform",
    "xavier_uniform",
    "xavier_normal",
    "glorot_uniform",
    "glorot_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "he_uniform",
    "he_normal",
    "orthogonal",
    "fans",
]


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` for a kernel of ``shape`` in (…, in, out) layout."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def zeros(key, shape, dtype=jnp.float32):
    """All zeros."""
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype=jnp.float32):
    """All ones."""
    return jnp.ones(shape, dtype)


def constant(value: float) -> Initializer:
    """Every entry equal to ``value``."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.full(shape, value, dtype)

    return init


def normal(stddev: float = 0.01, mean: float = 0.0) -> Initializer:
    """N(mean, stddev^2) (d2l's default ``normal(0.01)``)."""
    if stddev < 0:
        raise ValueError(f"normal: stddev must be >= 0, got {stddev}")

    def init(key, shape, dtype=jnp.float32):
        return mean + stddev * jax.random.normal(key, shape, dtype)

    return init


def uniform(scale: float = 0.07) -> Initializer:
    """U(-scale, scale) (Gluon's default ``Uniform(0.07)``)."""
    if scale < 0:
        raise ValueError(f"uniform: scale must be >= 0, got {scale}")

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def _check_mode(mode: str) -> None:
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"mode must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")


def _fan(shape, mode):
    fi, fo = fans(shape)
    return {"fan_in": fi, "fan_out": fo, "fan_avg": (fi + fo) / 2}[mode]


def xavier_uniform(gain: float = 1.0) -> Initializer:
    """Glorot/Xavier uniform: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))."""

    def init(key, shape, dtype=jnp.float32):
        fi, fo = fans(shape)
        a = gain * math.sqrt(6.0 / (fi + fo))
        return jax.random.uniform(key, shape, dtype, -a, a)

    return init


def xavier_normal(gain: float = 1.0) -> Initializer:
    """Glorot/Xavier normal: N(0, gain^2 * 2 / (fan_in + fan_out))."""

    def init(key, shape, dtype=jnp.float32):
        fi, fo = fans(shape)
        return gain * math.sqrt(2.0 / (fi + fo)) * jax.random.normal(key, shape, dtype)

    return init


glorot_uniform = xavier_uniform
glorot_normal = xavier_normal


def kaiming_uniform(mode: str = "fan_in", gain: float = math.sqrt(2.0)) -> Initializer:
    """He/Kaiming uniform: U(-b, b), b = gain * sqrt(3 / fan) (fan by ``mode``)."""
    _check_mode(mode)

    def init(key, shape, dtype=jnp.float32):
        b = gain * math.sqrt(3.0 / _fan(shape, mode))
        return jax.random.uniform(key, shape, dtype, -b, b)

    return init


def kaiming_normal(mode: str = "fan_in", gain: float = math.sqrt(2.0)) -> Initializer:
    """He/Kaiming normal: N(0, gain^2 / fan) (fan by ``mode``)."""
    _check_mode(mode)

    def init(key, shape, dtype=jnp.float32):
        return gain / math.sqrt(_fan(shape, mode)) * jax.random.normal(key, shape, dtype)

    return init


he_uniform = kaiming_uniform
he_normal = kaiming_normal


def orthogonal(gain: float = 1.0) -> Initializer:
    """A (semi-)orthogonal matrix over ``(prod(shape[:-1]), shape[-1])``, times ``gain``."""

    def init(key, shape, dtype=jnp.float32):
        if len(shape) < 2:
            raise ValueError(f"orthogonal: needs a shape of rank >= 2, got {tuple(shape)}")
        rows, cols = math.prod(shape[:-1]), shape[-1]
        # QR in the requested precision (at least float32), so float64 stays orthogonal
        work = jnp.promote_types(dtype, jnp.float32)
        a = jax.random.normal(key, (max(rows, cols), min(rows, cols)), work)
        q, r = jnp.linalg.qr(a)
        q = q * jnp.sign(jnp.diagonal(r))
        if rows < cols:
            q = q.T
        return (gain * q[:rows, :cols]).reshape(shape).astype(dtype)

    return init
