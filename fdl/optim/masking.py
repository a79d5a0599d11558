"""Selecting leaves by path: masks, ``masked``, ``freeze``, per-path factors, weight decay."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.optim._util import hyper, static_zero, tmap
from fdl.optim.base import (
    EmptyState,
    GradientTransformation,
    MaskedNode,
    check_range,
    check_same_structure,
)
from fdl.tree import path_mask

__all__ = [
    "MaskedState",
    "no_bias_norm_mask",
    "resolve_mask",
    "add_decayed_weights",
    "masked",
    "freeze",
    "scale_by_path",
]


_NO_DECAY_SUFFIXES = ("b", "offset", "scale")


def no_bias_norm_mask(params) -> Any:
    """A bool tree, False for biases and norm parameters (paths ending in ``b``/``offset``/
    ``scale``), True elsewhere: the usual "no weight decay on biases and norms" mask."""
    return path_mask(params, lambda p: p.rsplit("/", 1)[-1] not in _NO_DECAY_SUFFIXES)


def resolve_mask(mask, tree):
    """``mask`` (None, bool tree, ``params -> bool tree``, path pattern, ``"no_bias_norm"``)
    to a bool tree shaped like ``tree``; None means all True."""
    if mask is None:
        return tmap(lambda _: True, tree)
    if isinstance(mask, str):
        if mask == "no_bias_norm":
            return no_bias_norm_mask(tree)
        return path_mask(tree, mask)
    if callable(mask):
        mask = mask(tree)
    check_same_structure(mask, tree, "mask", "params", check_shapes=False)
    return mask


def add_decayed_weights(weight_decay: float, mask: Any = None) -> GradientTransformation:
    """``u = g + weight_decay * p`` on the leaves selected by ``mask`` (needs ``params``).

    Before the learning-rate scaling and any adaptive scaling this is *coupled* L2
    regularisation (Gluon's ``wd``, PyTorch's ``weight_decay`` in SGD/Adam); placed after
    Adam's scaling (``adamw``) it is *decoupled* weight decay (Loshchilov & Hutter).
    ``mask``: None (decay everything), a bool tree, a function ``params -> bool tree``, a
    path pattern selecting the decayed leaves, or ``"no_bias_norm"`` (skip paths ending in
    ``b``, ``offset``, ``scale``; see :func:`no_bias_norm_mask`).
    """
    check_range("weight_decay", weight_decay, 0.0, where="add_decayed_weights")

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        if static_zero(weight_decay):
            return grads, state
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        check_same_structure(grads, params)
        m = resolve_mask(mask, params)
        out = tmap(lambda g, p, f: g + hyper(weight_decay, g.dtype) * p if f else g,
                    grads, params, m)
        return out, state

    return GradientTransformation(init, update)


class MaskedState(NamedTuple):
    """The inner transformation's state, over the masked leaves only."""

    inner_state: Any


def _hide(tree, mask):
    return tmap(lambda x, f: x if f else MaskedNode(), tree, mask)


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """Apply ``inner`` only to the leaves selected by ``mask``; the others pass unchanged.

    ``mask`` as in :func:`add_decayed_weights` (bool tree, function of the params, path
    pattern such as ``"head/*"``). ``inner`` keeps state only for the selected leaves.
    """

    def init(params):
        m = resolve_mask(mask, params)
        return MaskedState(inner.init(_hide(params, m)))

    def update(grads, state, params=None):
        m = resolve_mask(mask, params if params is not None and callable(mask) else grads)
        check_same_structure(m, grads, "mask", "grads", check_shapes=False)
        sub_p = None if params is None else _hide(params, m)
        sub_u, inner_state = inner.update(_hide(grads, m), state.inner_state, sub_p)
        treedef = jax.tree_util.tree_structure(grads)
        g_leaves = treedef.flatten_up_to(grads)
        flags = treedef.flatten_up_to(m)
        u_leaves = jax.tree_util.tree_leaves(
            sub_u, is_leaf=lambda x: isinstance(x, MaskedNode))
        out = [u if f else g for g, u, f in zip(g_leaves, u_leaves, flags, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out), MaskedState(inner_state)

    return GradientTransformation(init, update)


def freeze(pattern: Any) -> GradientTransformation:
    """Zero the updates of the leaves whose path matches ``pattern`` (stateless).

    Fine-tuning with a frozen backbone: ``chain(masked(adam(1e-3), "head"), freeze("backbone"))``
    keeps no optimizer state for the frozen leaves; ``chain(adam(1e-3), freeze("backbone"))``
    is simpler but keeps it. ``pattern`` as :func:`fdl.tree.path_mask` (or a bool tree).
    """

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        m = resolve_mask(pattern, grads)
        return tmap(lambda g, f: jnp.zeros_like(g) if f else g, grads, m), state

    return GradientTransformation(init, update)


def scale_by_path(factors: Mapping[str, float] | Sequence[tuple[str, float]],
                  default: float = 1.0) -> GradientTransformation:
    """Multiply each leaf's update by the factor of the first path pattern it matches.

    Per-layer learning-rate multipliers: ``chain(sgd(0.01, 0.9), scale_by_path({"head": 10.}))``
    trains the head at 10x the backbone's rate (PyTorch: two param groups). Patterns as
    :func:`fdl.tree.path_mask`; unmatched leaves get ``default``.
    """
    items = list(factors.items()) if isinstance(factors, Mapping) else list(factors)
    for pat, f in items:
        check_range(f"factor for {pat!r}", f, 0.0, where="scale_by_path")
    check_range("default", default, 0.0, where="scale_by_path")

    def leaf_factors(tree):
        treedef = jax.tree_util.tree_structure(tree)
        out: list[Any] = [None] * treedef.num_leaves
        for pat, f in items:
            hits = treedef.flatten_up_to(path_mask(tree, pat))
            out = [f if cur is None and hit else cur for cur, hit in zip(out, hits, strict=True)]
        return jax.tree_util.tree_unflatten(
            treedef, [default if cur is None else cur for cur in out])

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        fs = leaf_factors(grads)
        return tmap(lambda g, f: g if f == 1.0 else g * hyper(f, g.dtype), grads, fs), state

    return GradientTransformation(init, update)
