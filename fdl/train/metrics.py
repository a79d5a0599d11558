"""Metrics: per-batch sums computed on device, and their summary on the host.

A step returns a dict of *sums* over the (masked) examples of the batch, so batches of any size
(and devices) add up exactly:

- ``loss``: sum of per-example (per-token) losses; ``count``: number of examples (tokens);
- ``correct``: correctly classified (classification only); ``top{k}``: label in the top ``k``.

:func:`summarize` turns accumulated sums into ``loss`` (mean), ``acc`` (accuracy),
``top{k}_acc`` and ``perplexity`` (``exp(mean loss)``, meaningful for cross-entropy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdl.nn import losses as L

__all__ = [
    "accuracy",
    "top_k_accuracy",
    "batch_metrics",
    "summarize",
    "resolve_loss",
    "LOSSES",
]


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of ``argmax(logits, -1) == labels`` (d2l's ``accuracy`` divided by ``n``)."""
    return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def _in_top_k(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Whether each label is among the ``k`` largest logits (ties counted in its favour)."""
    true = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)
    return jnp.sum(logits > true, axis=-1) < k


def top_k_accuracy(logits: jax.Array, labels: jax.Array, k: int = 5) -> jax.Array:
    """Fraction of examples whose label is among the ``k`` largest logits."""
    return jnp.mean(_in_top_k(logits, labels, k).astype(jnp.float32))


def _per_example_ce(logits, labels):
    return L.softmax_cross_entropy(logits, labels, reduction="none")


def _per_example_sq(pred, target):
    return L.squared_error(pred, target, reduction="none")


def _per_example_l1(pred, target):
    return L.l1_loss(pred, target, reduction="none")


def _per_example_bce(logits, labels):
    return L.sigmoid_binary_cross_entropy(logits, labels, reduction="none")


LOSSES: dict[str, Callable] = {
    "cross_entropy": _per_example_ce,
    "squared_error": _per_example_sq,
    "l1": _per_example_l1,
    "binary_cross_entropy": _per_example_bce,
}


def resolve_loss(loss: str | Callable) -> Callable:
    """A loss name from :data:`LOSSES` or a callable ``loss(outputs, targets) -> per-example``
    losses (shape ``(N,)``, ``(N, T)``..., or a scalar mean)."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {sorted(LOSSES)}")
    return LOSSES[loss]


def _weights(mask, shape, dtype):
    if mask is None:
        return jnp.ones(shape, dtype)
    mask = mask.astype(dtype)
    mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
    return jnp.broadcast_to(mask, shape)


def weighted_loss(per, mask, n: int):
    """``(total, count)`` of per-example losses under ``mask``; a scalar loss counts ``n``."""
    per = jnp.asarray(per)
    if per.ndim == 0:
        count = jnp.asarray(n, per.dtype) if mask is None else jnp.sum(mask).astype(per.dtype)
        return per * count, count
    w = _weights(mask, per.shape, per.dtype)
    return jnp.sum(per * w), jnp.sum(w)


def batch_metrics(outputs, targets, mask, total, count, top_k: Sequence[int] = ()) -> dict:
    """The sums listed in the module docstring for one batch (on device, float32)."""
    m = {"loss": total.astype(jnp.float32), "count": count.astype(jnp.float32)}
    if (
        hasattr(outputs, "ndim")
        and hasattr(targets, "ndim")
        and jnp.issubdtype(targets.dtype, jnp.integer)
        and outputs.ndim == targets.ndim + 1
    ):
        w = _weights(mask, targets.shape, jnp.float32)
        m["correct"] = jnp.sum((jnp.argmax(outputs, -1) == targets) * w)
        for k in top_k:
            m[f"top{k}"] = jnp.sum(_in_top_k(outputs, targets, k) * w)
    return m


def summarize(sums: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Host floats from accumulated sums: ``loss``, ``acc``, ``top{k}_acc``, ``perplexity``;
    keys prefixed with ``prefix`` (e.g. ``"train_"``)."""
    sums = {k: float(np.asarray(v)) for k, v in jax.device_get(sums).items()}
    n = max(sums.get("count", 0.0), 1e-12)
    out = {"loss": sums["loss"] / n}
    if "correct" in sums:
        out["acc"] = sums["correct"] / n
    for k, v in sums.items():
        if k.startswith("top"):
            out[f"{k}_acc"] = v / n
    out["perplexity"] = math.exp(min(out["loss"], 700.0))
    return {prefix + k: v for k, v in out.items()}
