"""Step builders: jitted ``train_step`` / ``eval_step`` from a model, a loss and an optimizer.

``train_step(params, state, opt_state, batch, key) -> (params, state, opt_state, metrics)``
does forward, backward and the optimizer update in one compiled call; ``params``, ``state`` and
``opt_state`` buffers are donated (do not reuse the arrays you pass in). ``metrics`` are the
on-device sums of :mod:`fdl.train.metrics`; nothing is copied to the host inside a step, so
dispatch stays asynchronous until you fetch them.

A batch is ``(x, y)`` or ``(x, y, mask)`` (``mask`` of shape ``(N,)``: 1 for real examples, 0
for padding, as produced by ``ArrayLoader(last_batch="pad")``). The loss is the mean over real
examples (and over any further axes of the per-example loss, e.g. tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fdl.nn.core import Layer
from fdl.train.metrics import batch_metrics, resolve_loss, weighted_loss

__all__ = [
    "make_train_step",
    "make_eval_step",
    "make_predict_fn",
    "unpack_batch",
    "apply_fn",
]


def apply_fn(model: Layer | Callable) -> Callable:
    """``model.apply`` for a :class:`~fdl.nn.Layer`, else ``model`` itself (a function with
    the layer signature ``apply(params, state, x, *, key=None, train=False) -> (y, state)``)."""
    if isinstance(model, Layer):
        return model.apply
    if callable(model):
        return model
    raise TypeError(f"model must be an fdl.nn.Layer or an apply function, got {model!r}")


def unpack_batch(batch) -> tuple[Any, Any, Any]:
    """``(x, y, mask_or_None)`` from ``(x, y)`` / ``(x, y, mask)`` / a dict with those keys."""
    if isinstance(batch, dict):
        return batch["x"], batch["y"], batch.get("mask")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise TypeError(
        "a batch must be (x, y), (x, y, mask) or {'x': ..., 'y': ..., 'mask': ...}; got "
        f"{type(batch).__name__}"
    )


def _loss_and_metrics(apply, loss_fn, top_k, params, state, batch, key, train, global_count=None,
                      scale=1.0):
    x, y, mask = unpack_batch(batch)
    out, new_state = apply(params, state, x, key=key, train=train)
    per = loss_fn(out, y)
    total, count = weighted_loss(per, mask, x.shape[0])
    denom = count if global_count is None else global_count(count)
    objective = scale * total / denom
    metrics = batch_metrics(out, y, mask, lax.stop_gradient(total), count, top_k)
    return objective, (new_state, metrics)


def make_train_step(
    model: Layer | Callable,
    optimizer,
    loss: str | Callable = "cross_entropy",
    *,
    top_k: Sequence[int] = (),
    axis_name: str | None = None,
    jit: bool = True,
    donate: bool = True,
) -> Callable:
    """Build ``train_step(params, state, opt_state, batch, key)``.

    Args:
      model: a :class:`~fdl.nn.Layer` or an apply function (see :func:`apply_fn`).
      optimizer: an ``fdl.optim`` ``GradientTransformation`` (``init``/``update``).
      loss: ``"cross_entropy"`` (default; logits vs integer labels), ``"squared_error"``,
        ``"l1"``, ``"binary_cross_entropy"``, or ``loss(outputs, targets) -> per-example``.
      top_k: extra top-k accuracies to count, e.g. ``(5,)``.
      axis_name: set when the step runs under ``pmap``/``shard_map`` over that axis: gradients
        are averaged with ``lax.pmean`` (weighted so the result is the global-batch gradient
        even with padding), metrics summed with ``psum`` and the model state averaged.
      jit: compile with ``jax.jit`` (``False`` returns the pure function, e.g. to ``pmap``).
      donate: donate ``params``, ``state``, ``opt_state`` buffers (with ``jit``).
    """
    apply = apply_fn(model)
    loss_fn = resolve_loss(loss)
    top_k = tuple(int(k) for k in top_k)

    from fdl.optim import apply_updates

    def train_step(params, state, opt_state, batch, key):
        if axis_name is None:
            gc, scale = None, 1.0
        else:
            def gc(c):
                return lax.psum(lax.stop_gradient(c), axis_name)

            scale = lax.psum(1, axis_name)  # pmean(scale * total / global_count) = global mean
        def objective(p):
            return _loss_and_metrics(apply, loss_fn, top_k, p, state, batch, key, True, gc, scale)

        grads, (new_state, metrics) = jax.grad(objective, has_aux=True)(params)
        if axis_name is not None:
            grads = lax.pmean(grads, axis_name)
            metrics = lax.psum(metrics, axis_name)
            new_state = jax.tree.map(
                lambda s: lax.pmean(s, axis_name)
                if jnp.issubdtype(s.dtype, jnp.floating) else s, new_state
            )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = apply_updates(params, updates)
        return params, new_state, opt_state, metrics

    if not jit:
        return train_step
    jitted = jax.jit(train_step, donate_argnums=(0, 1, 2) if donate else ())
    if axis_name is None:
        # lets ``fit`` loop over steps on the device, each with its batch gather, per-step key
        # and metric accumulation (one dispatch per run of steps); see ``fdl.train.loop``
        jitted.fdl_step_fn = train_step  # type: ignore[attr-defined]
        jitted.fdl_donate = donate  # type: ignore[attr-defined]
    return jitted


def make_eval_step(
    model: Layer | Callable,
    loss: str | Callable = "cross_entropy",
    *,
    top_k: Sequence[int] = (),
    axis_name: str | None = None,
    jit: bool = True,
) -> Callable:
    """Build ``eval_step(params, state, batch) -> metrics`` (``train=False``, no key)."""
    apply = apply_fn(model)
    loss_fn = resolve_loss(loss)
    top_k = tuple(int(k) for k in top_k)

    def eval_step(params, state, batch):
        _, (_, metrics) = _loss_and_metrics(
            apply, loss_fn, top_k, params, state, batch, None, False
        )
        if axis_name is not None:
            metrics = lax.psum(metrics, axis_name)
        return metrics

    if not jit:
        return eval_step
    jitted = jax.jit(eval_step)
    if axis_name is None:
        # lets ``fit``/``evaluate`` loop over a device-resident eval set in one compiled call
        jitted.fdl_eval_fn = eval_step  # type: ignore[attr-defined]
    return jitted


def make_predict_fn(model: Layer | Callable, *, jit: bool = True) -> Callable:
    """``predict(params, state, x) -> outputs`` in evaluation mode."""
    apply = apply_fn(model)

    def predict(params, state, x):
        return apply(params, state, x, key=None, train=False)[0]

    return jax.jit(predict) if jit else predict
