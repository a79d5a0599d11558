"""The optimizer protocol: a pure ``(init, update)`` pair over parameter pytrees.

A :class:`GradientTransformation` holds two pure functions::

    init(params) -> opt_state
    update(grads, opt_state, params=None) -> (updates, new_opt_state)

``updates`` has the structure of ``grads``; :func:`apply_updates` adds them to the params.
States are NamedTuples (pytrees) whose step counters are int32 scalars, so whole optimizer
steps can be ``jit``-ed, checkpointed (``fdl.tree.flatten_dict``) and resumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.tree import tree_paths

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "MaskedNode",
    "Schedule",
    "apply_updates",
    "chain",
    "identity",
    "check_same_structure",
    "current_lr",
    "safe_increment",
]

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[Any], Any]


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params=None) -> (updates, state)``.

    ``step(grads, state, params) -> (params, state)``, when not ``None``, is a fused form of
    ``update`` followed by :func:`apply_updates` with the same results (see
    :mod:`fdl.optim.fused`); :func:`fdl.optim.apply_gradients` uses it. Transformations built
    around this one (``chain``, wrappers) do not inherit it.
    """

    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Updates, OptState]]
    step: Callable[..., tuple[Params, OptState]] | None = None


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


class MaskedNode(NamedTuple):
    """Stands in for a leaf that a :func:`fdl.optim.masked` inner transformation does not see.

    An empty NamedTuple: a pytree node without leaves, so ``tree_map`` skips it.
    """


def safe_increment(count):
    """``count + 1`` as int32, saturating at the int32 maximum instead of wrapping."""
    count = jnp.asarray(count, jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    return jnp.where(count < big, count + 1, count).astype(jnp.int32)


def check_same_structure(a, b, name_a: str = "grads", name_b: str = "params",
                         check_shapes: bool = True) -> None:
    """Raise ``ValueError`` naming the first path where trees ``a`` and ``b`` differ.

    Compares tree structure (paths) and, with ``check_shapes``, the leaf shapes. Runs on the
    Python structure only, so it is free under ``jit`` (checked at trace time).
    """
    ta = jax.tree_util.tree_structure(a)
    tb = jax.tree_util.tree_structure(b)
    if ta != tb:
        pa, pb = tree_paths(a), tree_paths(b)
        sb, sa = set(pb), set(pa)
        for p in pa:
            if p not in sb:
                raise ValueError(
                    f"{name_a} tree differs from {name_b} tree: path '{p}' is in {name_a} "
                    f"but not in {name_b}")
        for p in pb:
            if p not in sa:
                raise ValueError(
                    f"{name_a} tree differs from {name_b} tree: path '{p}' is in {name_b} "
                    f"but not in {name_a}")
        raise ValueError(
            f"{name_a} tree differs from {name_b} tree (same paths, different container "
            f"types): {ta} vs {tb}")
    if check_shapes:
        la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
        for i, (x, y) in enumerate(zip(la, lb, strict=True)):
            if jnp.shape(x) != jnp.shape(y):
                p = tree_paths(a)[i]
                raise ValueError(
                    f"{name_a} and {name_b} differ at path '{p}': shape {jnp.shape(x)} vs "
                    f"{jnp.shape(y)}")


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` leaf by leaf, keeping each parameter's dtype.

    Raises ``ValueError`` naming the first differing path if the trees do not match.
    """
    check_same_structure(updates, params, "updates", "params")
    return jax.tree_util.tree_map(
        lambda p, u: (p + u).astype(jnp.result_type(p)) if u is not None else p,
        params, updates)


def identity() -> GradientTransformation:
    """Pass the gradients through unchanged (stateless)."""

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        return grads, state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    The first transformation sees the gradients; each next one sees the previous updates.
    ``params`` (if given) goes to every member. Tree structures are checked once here.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain: argument {i} is {type(t).__name__}, "
                            "expected a GradientTransformation")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params=None):
        if params is not None:
            check_same_structure(grads, params)
        if len(state) != len(transforms):
            raise ValueError(f"chain: state has {len(state)} parts, expected {len(transforms)}")
        new_state = []
        for t, s in zip(transforms, state, strict=True):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _float(x) -> float | None:
    """``float(x)`` for a concrete scalar, ``None`` for a tracer (validated elsewhere)."""
    if not _is_concrete(x):
        return None
    try:
        return float(x)
    except TypeError as e:
        raise TypeError(f"expected a real scalar, got {type(x).__name__}") from e


def check_range(name: str, value, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, where: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is finite and in the stated interval.

    Tracers (hyperparameters injected under ``jit``) are not checked.
    """
    if callable(value):
        return
    v = _float(value)
    if v is None:
        return
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    bad = not math.isfinite(v)
    if lo is not None:
        bad |= v <= lo if lo_open else v < lo
    if hi is not None:
        bad |= v >= hi if hi_open else v > hi
    if bad:
        pre = f"{where}: " if where else ""
        raise ValueError(f"{pre}{name} must be finite and in {rng}, got {value!r}")


def check_lr(lr, where: str = "") -> None:
    """A learning rate: a finite number >= 0, or a schedule (checked at step 0)."""
    if callable(lr):
        v = lr(0)
        if _is_concrete(v) and jnp.ndim(v) == 0:
            check_range("learning rate (schedule value at step 0)", v, 0.0, where=where)
        return
    check_range("learning rate", lr, 0.0, where=where)


# ----------------------------------------------------------------------------- reading state


def _find_lr(state) -> Any:
    # Imported lazily: these modules depend on base.
    from fdl.optim.inject import InjectHyperparamsState
    from fdl.optim.scaling import ScaleByLearningRateState

    if isinstance(state, ScaleByLearningRateState):
        return state.lr
    if isinstance(state, InjectHyperparamsState):
        for name in ("lr", "learning_rate"):
            if name in state.hyperparams:
                return state.hyperparams[name]
        return _find_lr(state.inner_state)
    if isinstance(state, tuple):  # NamedTuples and chain tuples
        for s in state:
            found = _find_lr(s)
            if found is not None:
                return found
    if isinstance(state, dict):
        for s in state.values():
            found = _find_lr(s)
            if found is not None:
                return found
    return None


def current_lr(opt_state):
    """The learning rate the most recent ``update`` applied (at init: the first one it will).

    Searches ``opt_state`` for the first :class:`~fdl.optim.ScaleByLearningRateState` (or an
    injected ``lr`` hyperparameter) and returns its value as a scalar array. Raises
    ``ValueError`` if the state holds no learning rate.
    """
    lr = _find_lr(opt_state)
    if lr is None:
        raise ValueError("current_lr: this optimizer state holds no learning rate "
                         "(no scale_by_learning_rate or injected 'lr' in it)")
    return lr
