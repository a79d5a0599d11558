"""Losses and metrics of a step: per-batch sums on the device, their summary on the host.

A step returns a flat dict of *sums* over the real (unpadded) examples of its batch, so batches
(and devices) add up exactly and an epoch's sums are the tree sum of its batches':

- ``loss``: the summed loss terms and ``count`` how many there were (examples, or tokens);
- ``correct`` / ``top{k}``: correctly classified / label in the top ``k`` (classification:
  outputs an array with one more axis than integer targets);
- any other ``name``: a custom metric, averaged over ``name_count`` when present, else over
  ``count``. A metric function returns ``{name: sum}`` or ``{name: (sum, count)}``; the pairs
  are stored as ``name`` and ``name_count``.

:func:`summarize` turns sums into means: ``loss``, ``acc``, ``top{k}_acc``, each custom metric,
and ``perplexity`` (``exp(mean loss)``) when asked for (language models).

The loss of a step is one of:

- a name from :data:`LOSSES` or a callable ``loss(outputs, targets)`` returning per-example
  losses (``(N,)``, ``(N, T)``, ...; the mean runs over real examples and any further axes) or
  a pair ``(losses, weights)`` of the same shape (e.g. a valid-token mask: the mean is then
  ``sum(losses * weights) / sum(weights)`` over real examples);
- an :class:`Objective`: ``fn(outputs, targets, mask) -> (loss, metrics)`` for full control.
"""

from __future__ import annotations

import dataclasses
import math
import re
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
    "make_objective",
    "Objective",
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
    losses (shape ``(N,)``, ``(N, T)``..., a scalar mean, or a ``(losses, weights)`` pair)."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {sorted(LOSSES)}")
    return LOSSES[loss]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A step's loss with full control: ``fn(outputs, targets, mask) -> (loss, metrics)``.

    ``mask`` is ``None`` or the ``(N,)`` float mask of real examples (``last_batch="pad"``);
    ``loss`` is the scalar the step minimises (already a mean: e.g. BERT's masked-LM mean plus
    its next-sentence mean); ``metrics`` a dict of sums as in the module docstring. When it has
    no ``count``, the batch's real examples are counted; when it has no ``loss``, ``loss *
    count`` is recorded. Under ``pmap``/``shard_map`` the gradient is the mean of the
    devices' gradients."""

    fn: Callable


def _first_leaf(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("a batch needs at least one array")
    return leaves[0]


def _examples(mask, x) -> jax.Array:
    """The number of real examples of a batch (float32)."""
    if mask is not None:
        return jnp.sum(mask).astype(jnp.float32)
    return jnp.asarray(_first_leaf(x).shape[0], jnp.float32)


def _weights(mask, shape, dtype):
    if mask is None:
        return jnp.ones(shape, dtype)
    mask = mask.astype(dtype)
    mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
    return jnp.broadcast_to(mask, shape)


def weighted_loss(per, mask, n: int, weights=None):
    """``(total, count)`` of per-example losses under ``mask`` (and per-entry ``weights``, of
    ``per``'s shape); a scalar loss counts ``n``."""
    per = jnp.asarray(per)
    if per.ndim == 0:
        count = jnp.asarray(n, per.dtype) if mask is None else jnp.sum(mask).astype(per.dtype)
        return per * count, count
    w = _weights(mask, per.shape, per.dtype)
    if weights is not None:
        w = w * jnp.asarray(weights, per.dtype)
    return jnp.sum(per * w), jnp.sum(w)


def batch_metrics(outputs, targets, mask, total, count, top_k: Sequence[int] = ()) -> dict:
    """``loss``, ``count`` and, for classification, ``correct``/``top{k}`` sums of one batch
    (on device, float32)."""
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


_RESERVED = ("loss", "count", "correct")


def _flatten_metrics(metrics: dict, where: str) -> dict:
    """``{name: sum | (sum, count)}`` as flat float32 sums (``name``, ``name_count``)."""
    if not isinstance(metrics, dict):
        raise TypeError(f"{where} must return a dict of sums, got {type(metrics).__name__}")
    out = {}
    for name, value in metrics.items():
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ValueError(f"{where}: metric {name!r} must be a sum or a (sum, count) "
                                 f"pair, got {len(value)} values")
            out[f"{name}_count"] = jnp.asarray(value[1], jnp.float32)
            value = value[0]
        out[name] = jnp.asarray(value, jnp.float32)
    return out


def make_objective(loss: str | Callable | Objective, *, metrics: Callable | None = None,
                   top_k: Sequence[int] = ()) -> Callable:
    """``objective(outputs, targets, mask, x) -> (numerator, denominator, metric sums)``: the
    step minimises ``numerator / denominator`` (``denominator`` ``None`` for an already
    reduced loss) and sums ``metric sums`` over the epoch."""
    top_k = tuple(int(k) for k in top_k)
    if isinstance(loss, Objective):
        fn = loss.fn

        def objective(outputs, targets, mask, x):
            result = fn(outputs, targets, mask)
            if not isinstance(result, tuple) or len(result) != 2:
                raise TypeError(f"Objective.fn must return (loss, metrics), got "
                                f"{type(result).__name__}")
            value, m = result
            if jnp.ndim(value) != 0:
                raise ValueError(f"Objective.fn: the loss must be a scalar, got shape "
                                 f"{jnp.shape(value)}")
            m = _flatten_metrics(m, "Objective.fn")
            count = m.setdefault("count", _examples(mask, x))
            m.setdefault("loss", jax.lax.stop_gradient(value).astype(jnp.float32) * count)
            return value, None, m
    else:
        loss_fn = resolve_loss(loss)

        def objective(outputs, targets, mask, x):
            per = loss_fn(outputs, targets)
            weights = None
            if isinstance(per, tuple):
                if len(per) != 2:
                    raise ValueError(f"loss: a tuple result must be (losses, weights), got "
                                     f"{len(per)} values")
                per, weights = per
                if jnp.shape(weights) != jnp.shape(per):
                    raise ValueError(f"loss: weights of shape {jnp.shape(weights)} for losses "
                                     f"of shape {jnp.shape(per)}; they must be equal")
            total, count = weighted_loss(per, mask, _first_leaf(x).shape[0], weights)
            m = batch_metrics(outputs, targets, mask, jax.lax.stop_gradient(total), count, top_k)
            return total, count, m

    if metrics is None:
        return objective

    def with_metrics(outputs, targets, mask, x):
        num, den, m = objective(outputs, targets, mask, x)
        extra = _flatten_metrics(metrics(outputs, targets, mask), "metrics")
        clash = sorted(set(extra) & set(m))
        if clash:
            raise ValueError(f"metrics: the names {clash} are already used by the loss's sums; "
                             f"rename them")
        return num, den, {**m, **extra}

    return with_metrics


_TOP = re.compile(r"top\d+")


def summarize(sums: dict[str, Any], prefix: str = "", *, perplexity: bool = False
              ) -> dict[str, float]:
    """Host floats from accumulated sums: ``loss``, ``acc``, ``top{k}_acc``, custom metrics and
    (with ``perplexity``) ``perplexity``; keys prefixed with ``prefix`` (e.g. ``"train_"``)."""
    sums = {k: float(np.asarray(v)) for k, v in jax.device_get(sums).items()}
    n = max(sums.get("count", 0.0), 1e-12)
    out = {"loss": sums["loss"] / n}
    for k, v in sums.items():
        if k in ("loss", "count") or k.endswith("_count"):
            continue
        if k == "correct":
            out["acc"] = v / n
        elif _TOP.fullmatch(k):
            out[f"{k}_acc"] = v / n
        else:
            out[k] = v / max(sums.get(f"{k}_count", n), 1e-12)
    if perplexity:
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
    return {prefix + k: v for k, v in out.items()}
