"""Helpers for layer state that crosses calls (recurrent carries, decoder caches).

- :func:`init_state` -- the state ``init`` would return for an input shape, without building
  params (e.g. a batch-1 state to generate text from a model trained on batches of 32);
- :func:`reset_state` -- zero the arrays under some paths of a state tree (a recurrent carry
  restarting at a new sequence; the book's "begin_state").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fdl.nn.core import Layer, Shape

__all__ = ["init_state", "reset_state"]


def init_state(layer: Layer, in_shape: Shape, *, key=None) -> dict:
    """``layer.init(key, in_shape)``'s state alone. Runs ``init`` under ``jax.jit``, so the
    params it would build are never computed (XLA drops them)."""
    key = jax.random.key(0) if key is None else key
    shape = tuple(in_shape)
    return jax.jit(lambda k: layer.init(k, shape)[2])(key)


def _split(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError(f"reset_state: empty path {path!r}")
    return parts


def reset_state(state: dict, paths: str | Sequence[str] | None = None) -> dict:
    """A copy of ``state`` with every array under ``paths`` set to zero (``paths=None``: every
    array). Paths are ``/``-separated keys (``"rnn"``, ``"decoder/rnn"``); a path that is not in
    ``state`` raises ``KeyError`` naming it. Zero is the reset value of a recurrent carry and of a
    KV cache (entries and index); do not include BatchNorm statistics (the running variance
    starts at one): reset only the paths of carries and caches."""
    zero = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)  # noqa: E731
    if paths is None:
        return zero(state)
    if isinstance(paths, str):
        paths = [paths]
    out = dict(state)
    for path in paths:
        keys = _split(path)
        node: Any = out
        parents = []
        for i, k in enumerate(keys):
            if not isinstance(node, dict) or k not in node:
                raise KeyError(f"reset_state: no state at {'/'.join(keys[:i + 1])!r} (path "
                               f"{path!r}); top-level keys are {sorted(out)}")
            parents.append(node)
            node = node[k]
        new = zero(node)
        for parent, k in zip(reversed(parents), reversed(keys), strict=True):
            parent = dict(parent)
            parent[k] = new
            new = parent
        out = new
    return out
