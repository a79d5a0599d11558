"""Synchronised batch normalisation: statistics over the batch of every device, weighted by
each device's number of real examples.

Under sharded ``jit`` the batch is one logical array and plain :func:`fdl.nn.batch_norm`
already normalises with the global statistics (across processes too). Under ``shard_map`` /
``pmap`` each device sees only its shard; :func:`sync_batch_norm` with ``axis_name`` then
combines the per-device statistics. It is exact when devices hold different numbers of real
examples (a ``mask`` marks padding, e.g. the padded last batch of an epoch split over devices,
or any uneven split): each device computes its count ``n_d``, mean ``m_d`` and sum of squared
deviations ``M2_d`` (two passes over its own shard), and two ``psum`` of ``C + 1`` and ``C``
numbers combine them (Chan et al.'s parallel formula)::

    N = sum_d n_d      mean = sum_d n_d m_d / N
    var = sum_d (M2_d + n_d (m_d - mean)^2) / N

which is the biased variance of all real examples together, as if one device had them. A
device with no real example contributes nothing. (``nn.batch_norm(axis_name=...)`` averages the
per-device moments with equal weights: the same only when every device has as many real
examples.) Gradients flow through the ``psum`` (its transpose is a ``psum`` of the
cotangents), so the backward pass is the gradient of normalising with the global statistics;
the results are replicated over ``axis_name``, as ``shard_map``'s checks expect.

Params ``{"scale", "offset"}`` and state ``{"mean", "var"}`` are those of
:func:`fdl.nn.batch_norm` (checkpoints interchange), with the same ``decay`` convention and
the unbiased variance ``var * N / (N - 1)`` in the running statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fdl.nn import batch_norm
from fdl.nn.core import Layer, ShapeError

__all__ = ["sync_batch_norm", "sync_moments"]


def _weights(x: jax.Array, mask, dtype) -> jax.Array:
    """Per-value weights of shape ``x.shape[:-1] + (1,)`` from a mask over the leading axes."""
    lead = x.shape[:-1]
    if mask is None:
        return jnp.ones((*lead, 1), dtype)
    mask = jnp.asarray(mask)
    if mask.shape != lead[: mask.ndim]:
        raise ShapeError("sync_batch_norm", f"mask of shape {mask.shape} does not match the "
                         f"leading axes {lead} of the input (expected (N,) or {lead})")
    mask = mask.reshape(mask.shape + (1,) * (len(lead) - mask.ndim))
    return jnp.broadcast_to(mask.astype(dtype), lead)[..., None]


def sync_moments(x: jax.Array, *, axis_name=None, mask=None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(mean, var, count)`` per channel (last axis) of the real values of ``x`` on every
    device of ``axis_name`` together (this device alone when ``axis_name`` is ``None``).

    ``x`` is ``(N, ..., C)``; ``mask`` is ``(N,)`` or ``x.shape[:-1]``, 1 for real values and
    0 for padding (fractional weights also work); ``var`` is the biased variance; ``count``
    the number of real values (a scalar). Statistics in ``x``'s dtype (float32 or wider)."""
    axes = tuple(range(x.ndim - 1))
    w = _weights(x, mask, x.dtype)
    n = jnp.sum(w)
    safe = jnp.maximum(n, 1e-12)
    m = jnp.sum(w * x, axis=axes) / safe
    m2 = jnp.sum(w * lax.square(x - m), axis=axes)
    if axis_name is None:
        return m, m2 / safe, n
    total, weighted = lax.psum((n, n * m), axis_name)
    total_safe = jnp.maximum(total, 1e-12)
    mean = weighted / total_safe
    var = lax.psum(m2 + n * lax.square(m - mean), axis_name)
    return mean, var / total_safe, total


def sync_batch_norm(axis_name=None, *, decay: float = 0.9, eps: float = 1e-5,
                    use_scale: bool = True, use_offset: bool = True) -> Layer:
    """Batch normalisation with statistics over every device of ``axis_name``, weighted by
    each device's count of real examples (see the module docstring).

    ``apply(params, state, x, *, key=None, train=False, mask=None)``: ``x`` is ``(N, ..., C)``
    (channels last), ``mask`` ``(N,)`` or ``x.shape[:-1]`` with 1 for real rows and 0 for
    padding (default: all real). Padding rows are normalised too (with the statistics of the
    real ones) but do not enter the statistics. ``train=False`` uses the running statistics,
    exactly like :func:`fdl.nn.batch_norm`, whose params, state, ``decay`` and ``eps`` this
    shares. ``axis_name=None``: this device's real rows only (under sharded ``jit`` that is
    the global batch).
    """
    base = batch_norm(decay=decay, eps=eps, use_scale=use_scale, use_offset=use_offset)
    decay, eps = base.config["decay"], base.config["eps"]

    def apply(params, state, x, *, key=None, train=False, mask=None):
        c = state["mean"].shape[0]
        if x.ndim < 2 or x.shape[-1] != c:
            raise ShapeError("sync_batch_norm",
                             f"expected input of rank >= 2 (N, ..., {c}), got shape {x.shape}")
        if not train:
            return base.apply(params, state, x, train=False)
        sdt = jnp.promote_types(x.dtype, jnp.float32)
        xs = x.astype(sdt)
        mean, var, n = sync_moments(xs, axis_name=axis_name, mask=mask)
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        new_state = {
            "mean": (decay * state["mean"] + (1.0 - decay) * mean).astype(state["mean"].dtype),
            "var": (decay * state["var"] + (1.0 - decay) * unbiased).astype(state["var"].dtype),
        }
        inv = lax.rsqrt(var + eps)
        if use_scale:
            inv = inv * params["scale"].astype(sdt)
        shift = -mean * inv
        if use_offset:
            shift = shift + params["offset"].astype(sdt)
        return (xs * inv + shift).astype(x.dtype), new_state

    return Layer(base.init, apply, name="sync_batch_norm",
                 config={**base.config, "axis_name": axis_name})
