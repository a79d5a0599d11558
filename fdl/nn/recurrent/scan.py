"""The ``lax.scan`` driver: run any ``cell(params, carry, x_t) -> (carry, y_t)`` over the time
axis, forwards or backwards, with optional per-sequence valid lengths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["reverse_within_lengths", "scan_cell"]


def reverse_within_lengths(xs: jax.Array, seq_lengths: jax.Array) -> jax.Array:
    """Reverse each sequence of time-major ``xs`` (T, B, ...) within its first
    ``seq_lengths[b]`` steps; positions past the length stay in place."""
    steps = xs.shape[0]
    t = jnp.arange(steps)[:, None]
    lens = seq_lengths[None, :]
    idx = jnp.where(t < lens, lens - 1 - t, t)  # (T, B)
    idx = idx.reshape(idx.shape + (1,) * (xs.ndim - 2))
    return jnp.take_along_axis(xs, jnp.broadcast_to(idx, xs.shape[:2] + (1,) * (xs.ndim - 2)),
                               axis=0)


def scan_cell(
    cell: Callable,
    params: dict,
    xs: jax.Array,
    carry: Any,
    *,
    time_major: bool = True,
    reverse: bool = False,
    unroll: int = 1,
    seq_lengths: jax.Array | None = None,
) -> tuple[Any, jax.Array]:
    """Run ``cell(params, carry, x_t) -> (carry, y_t)`` over the time axis with ``lax.scan``.

    ``xs``: (T, B, F) if ``time_major`` else (B, T, F) (usually pre-projected inputs).
    ``reverse``: process the sequence from its end (with ``seq_lengths``: from each sequence's
    last valid step, i.e. reversed within the valid length, as PyTorch's packed sequences).
    ``seq_lengths`` (B,) int: past ``seq_lengths[b]`` the carry of sequence ``b`` is frozen
    (the final carry is the one at its last valid step) and its outputs are zero.
    ``unroll``: steps per loop iteration (``lax.scan``'s ``unroll``); results do not depend on it.
    Returns ``(final_carry, ys)`` with ``ys`` in the layout of ``xs`` and in the original
    time order.
    """
    if not time_major:
        xs = jnp.swapaxes(xs, 0, 1)
    if seq_lengths is None:
        def step(c, x):
            return cell(params, c, x)

        carry, ys = lax.scan(step, carry, xs, reverse=reverse, unroll=unroll)
    else:
        seq_lengths = jnp.asarray(seq_lengths)
        steps = xs.shape[0]
        if reverse:
            xs = reverse_within_lengths(xs, seq_lengths)
        mask = jnp.arange(steps)[:, None] < seq_lengths[None, :]  # (T, B)

        def step(c, inp):
            x, m = inp
            c_new, y = cell(params, c, x)
            c_new = jax.tree_util.tree_map(
                lambda a, b: jnp.where(m[:, None], a, b), c_new, c)
            y = jnp.where(m[:, None], y, jnp.zeros((), y.dtype))
            return c_new, y

        carry, ys = lax.scan(step, carry, (xs, mask), unroll=unroll)
        if reverse:
            ys = reverse_within_lengths(ys, seq_lengths)
    if not time_major:
        ys = jnp.swapaxes(ys, 0, 1)
    return carry, ys
