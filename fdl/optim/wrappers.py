"""Wrappers around an inner transformation: gradient accumulation, skipping non-finite steps."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.optim._util import count0, hyper, tmap, zeros_like
from fdl.optim.base import (
    GradientTransformation,
    check_same_structure,
    safe_increment,
)

__all__ = [
    "MultiStepsState",
    "SkipNonfiniteState",
    "multi_steps",
    "skip_nonfinite",
]


class MultiStepsState(NamedTuple):
    """``mini_step`` in ``[0, k)``; ``count``: inner updates made; ``acc``: gradient sum."""

    mini_step: jax.Array
    count: jax.Array
    acc: Any
    inner_state: Any


def multi_steps(inner: GradientTransformation, every_k: int) -> GradientTransformation:
    """Gradient accumulation over ``every_k`` micro-batches.

    Each call adds ``g`` to an accumulator and returns zero updates, except every
    ``every_k``-th call, which feeds the *mean* accumulated gradient to ``inner`` (so clipping
    inside ``inner`` applies to the accumulated gradient) and returns its updates. With equal
    micro-batches and a mean loss, this equals one step on the whole batch.
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"multi_steps: every_k must be an int >= 1, got {every_k!r}")

    def init(params):
        return MultiStepsState(count0(), count0(), zeros_like(params), inner.init(params))

    def update(grads, state, params=None):
        check_same_structure(grads, state.acc, "grads", "accumulator")
        acc = tmap(lambda a, g: a + g, state.acc, grads)
        last = state.mini_step == every_k - 1

        def emit(_):
            mean = tmap(lambda a: a / hyper(every_k, a.dtype), acc)
            u, s = inner.update(mean, state.inner_state, params)
            return u, s, zeros_like(acc), count0(), safe_increment(state.count)

        def hold(_):
            return (zeros_like(grads), state.inner_state, acc,
                    safe_increment(state.mini_step), state.count)

        u, s, new_acc, mini, count = jax.lax.cond(last, emit, hold, None)
        return u, MultiStepsState(mini, count, new_acc, s)

    return GradientTransformation(init, update)


class SkipNonfiniteState(NamedTuple):
    """``skipped``: steps skipped for NaN/Inf gradients (int32); the inner state."""

    skipped: jax.Array
    inner_state: Any


def skip_nonfinite(inner: GradientTransformation) -> GradientTransformation:
    """Skip steps whose gradients contain NaN or Inf: zero updates, inner state unchanged,
    ``skipped`` incremented. Otherwise exactly ``inner``."""

    def init(params):
        return SkipNonfiniteState(count0(), inner.init(params))

    def update(grads, state, params=None):
        leaves = jax.tree_util.tree_leaves(grads)
        ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in leaves])) if leaves \
            else jnp.asarray(True)

        def step(_):
            u, s = inner.update(grads, state.inner_state, params)
            return u, s, state.skipped

        def skip(_):
            return zeros_like(grads), state.inner_state, safe_increment(state.skipped)

        u, s, skipped = jax.lax.cond(ok, step, skip, None)
        return u, SkipNonfiniteState(skipped, s)

    return GradientTransformation(init, update)
