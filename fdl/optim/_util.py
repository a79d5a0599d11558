"""Leaf-level helpers shared by the transformations (not public API)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["tmap", "zeros_like", "hyper", "static_zero", "count0", "unzip"]

tmap = jax.tree_util.tree_map


def zeros_like(tree):
    return tmap(jnp.zeros_like, tree)


def hyper(x, dtype):
    """A hyperparameter as a scalar of ``dtype`` (Python numbers stay weakly typed)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    return jnp.asarray(x).astype(dtype)


def static_zero(x) -> bool:
    """True only for a Python number equal to 0 (arrays may be injected later)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def count0():
    return jnp.zeros([], jnp.int32)


def unzip(tree_of_tuples, like, n: int):
    """Split a tree whose leaves became ``n``-tuples into ``n`` trees shaped like ``like``."""
    treedef = jax.tree_util.tree_structure(like)
    leaves = treedef.flatten_up_to(tree_of_tuples)
    return tuple(jax.tree_util.tree_unflatten(treedef, [lf[i] for lf in leaves])
                 for i in range(n))
