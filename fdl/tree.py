"""Helpers over nested ``dict[str, ...]`` trees (params, state, optimizer state) addressed by
``/``-joined paths: the one place ``nn``, ``optim``, ``train`` and ``interop`` share (no
dependency on any of them).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "flatten_dict",
    "unflatten_dict",
    "count_params",
    "select",
    "path_mask",
    "map_with_path",
    "tree_paths",
]


def _key_str(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def tree_paths(tree) -> list[str]:
    """The ``/``-joined path of every leaf, in ``tree_leaves`` order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(_key_str(k) for k in path) for path, _ in leaves]


def flatten_dict(tree) -> dict[str, Any]:
    """``{"conv1/w": array, ...}`` for any pytree (dicts, lists, NamedTuples)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_str(k) for k in path): leaf for path, leaf in leaves}


def unflatten_dict(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_dict` for trees of nested dicts."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return out


def count_params(tree) -> int:
    """Total number of scalars in the array leaves of ``tree``."""
    return sum(int(math.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(tree))


def _matcher(pattern: str | Callable[[str], bool]) -> Callable[[str], bool]:
    if callable(pattern):
        return pattern
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda p: rx.search(p) is not None
    return lambda p: fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern + "/*")


def path_mask(tree, pattern: str | Callable[[str], bool]):
    """A tree of bools, True where the leaf's path matches ``pattern``.

    ``pattern`` is a glob over paths (``"features/*"``, ``"*/b"``; a prefix such as
    ``"features"`` also matches everything below it), ``"re:<regex>"``, or a predicate.
    """
    match = _matcher(pattern)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flags = [match("/".join(_key_str(k) for k in path)) for path, _ in leaves]
    return jax.tree_util.tree_unflatten(treedef, flags)


def select(tree, pattern: str | Callable[[str], bool]) -> dict[str, Any]:
    """``{path: leaf}`` for the leaves whose path matches ``pattern`` (see :func:`path_mask`)."""
    match = _matcher(pattern)
    return {p: v for p, v in flatten_dict(tree).items() if match(p)}


def map_with_path(fn: Callable[[str, Any], Any], tree):
    """``tree_map`` whose function also receives the leaf's ``/``-joined path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: fn("/".join(_key_str(k) for k in path), x), tree
    )
