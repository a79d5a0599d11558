"""Step builders: a training and an evaluation step from a model, a loss and an optimizer.

``train_step(params, state, opt_state, batch, key) -> (params, state, opt_state, metrics)``
does forward, backward and the optimizer update in one compiled call; ``params``, ``state`` and
``opt_state`` buffers are donated (do not reuse the arrays you pass in). ``metrics`` are the
on-device sums of :mod:`fdl.train.metrics`; nothing is copied to the host inside a step, so
dispatch stays asynchronous until you fetch them.

A batch is ``(x, y)`` or ``(x, y, mask)``: ``x`` goes to the model, ``y`` to the loss; both may
be pytrees (tuples or dicts of arrays with the batch first). ``mask`` of shape ``(N,)`` is 1
for real examples and 0 for padding (``ArrayLoader(last_batch="pad")``).

The builders return explicit objects: a :class:`TrainStep` is called like the compiled step
and also carries its pure function (``fn``), which :func:`~fdl.train.fit` runs inside its
device loop; an :class:`EvalStep` likewise. Any other callable with the step's signature
(e.g. ``fdl.parallel``'s sharded steps) works with ``fit`` as well, one call per batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fdl.nn.core import Layer
from fdl.train.metrics import Objective, make_objective

__all__ = [
    "TrainStep",
    "EvalStep",
    "make_train_step",
    "make_eval_step",
    "make_predict_fn",
    "unpack_batch",
    "apply_fn",
]

_REDUCTIONS = ("mean", "sum")


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


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
    """A training step: ``step(params, state, opt_state, batch, key)`` calls ``call``.

    Attributes:
      call: the compiled step.
      fn: its pure function (``None`` when unknown): ``fit`` then runs runs of steps inside
        one compiled loop on the device (single-device steps from :func:`make_train_step`).
      donate: whether ``call`` donates ``params``, ``state`` and ``opt_state``.
      perplexity: whether summaries of its metrics report perplexity.
    """

    call: Callable
    fn: Callable | None = None
    donate: bool = True
    perplexity: bool = False

    def __call__(self, params, state, opt_state, batch, key):
        return self.call(params, state, opt_state, batch, key)

    @classmethod
    def of(cls, step: Callable) -> TrainStep:
        """``step`` itself if it is a :class:`TrainStep`, else a wrapper without ``fn``."""
        return step if isinstance(step, TrainStep) else cls(call=step)


@dataclasses.dataclass(frozen=True, eq=False)
class EvalStep:
    """An evaluation step: ``step(params, state, batch) -> metrics`` calls ``call``.

    Attributes:
      call: the compiled step.
      fn: its pure function ``fn(params, state, batch) -> (metrics, new_state)`` (``None``
        when unknown): ``evaluate`` then loops it over a device-resident set in one call.
      carry_state: evaluation passes ``new_state`` on to the next batch (a recurrent carry
        across sequential batches) instead of starting every batch from the given state.
      perplexity: whether summaries of its metrics report perplexity.
    """

    call: Callable
    fn: Callable | None = None
    carry_state: bool = False
    perplexity: bool = False

    def __call__(self, params, state, batch):
        return self.call(params, state, batch)

    @functools.cached_property
    def with_state(self) -> Callable:
        """``fn`` compiled: ``(params, state, batch) -> (metrics, new_state)``."""
        if self.fn is None:
            raise ValueError("this eval step has no pure function (carry_state needs one)")
        return jax.jit(self.fn)

    @classmethod
    def of(cls, step: Callable) -> EvalStep:
        """``step`` itself if it is an :class:`EvalStep`, else a wrapper without ``fn``."""
        return step if isinstance(step, EvalStep) else cls(call=step)


def _forward(apply, objective, params, state, batch, key, train):
    """``(numerator, denominator, metrics, new_state)`` of the model on one batch."""
    x, y, mask = unpack_batch(batch)
    out, new_state = apply(params, state, x, key=key, train=train)
    num, den, metrics = objective(out, y, mask, x)
    return num, den, metrics, new_state


def _loss_scale(opt_state):
    """The optimizer's loss scale (``fdl.optim.loss_scale``; 1 when it has none)."""
    try:
        from fdl.optim import loss_scale
    except ImportError:
        return 1.0
    return loss_scale(opt_state)


def make_train_step(
    model: Layer | Callable,
    optimizer,
    loss: str | Callable | Objective = "cross_entropy",
    *,
    metrics: Callable | None = None,
    top_k: Sequence[int] = (),
    perplexity: bool = False,
    loss_reduction: str = "mean",
    axis_name: str | None = None,
    jit: bool = True,
    donate: bool = True,
) -> TrainStep | Callable:
    """Build ``train_step(params, state, opt_state, batch, key)``.

    Args:
      model: a :class:`~fdl.nn.Layer` or an apply function (see :func:`apply_fn`).
      optimizer: an ``fdl.optim`` ``GradientTransformation`` (``init``/``update``).
      loss: ``"cross_entropy"`` (default; logits vs integer labels), ``"squared_error"``,
        ``"l1"``, ``"binary_cross_entropy"``, ``loss(outputs, targets) -> per-example losses``
        (or ``(losses, weights)``), or an :class:`~fdl.train.Objective`
        (see :mod:`fdl.train.metrics`).
      metrics: ``metrics(outputs, targets, mask) -> {name: sum | (sum, count)}``, extra sums.
      top_k: extra top-k accuracies to count, e.g. ``(5,)``.
      perplexity: report ``exp(mean loss)`` in summaries (language models).
      loss_reduction: ``"mean"`` (default) minimises the mean over real examples/tokens;
        ``"sum"`` their sum (the logged loss stays the mean).
      axis_name: set when the step runs under ``pmap``/``shard_map`` over that axis: gradients
        are averaged with ``lax.pmean`` (weighted so the result is the global-batch gradient
        even with padding), metrics summed with ``psum`` and the model state averaged.
      jit: return a :class:`TrainStep` (compiled; ``False`` returns the pure function, e.g.
        to ``pmap``).
      donate: donate ``params``, ``state``, ``opt_state`` buffers (with ``jit``).
    """
    if loss_reduction not in _REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}, got {loss_reduction!r}")
    apply = apply_fn(model)
    objective = make_objective(loss, metrics=metrics, top_k=top_k)

    from fdl.optim import apply_gradients

    def train_step(params, state, opt_state, batch, key):
        scale = _loss_scale(opt_state)
        devices = 1 if axis_name is None else lax.psum(1, axis_name)

        def minimised(p):
            num, den, m, new_state = _forward(apply, objective, p, state, batch, key, True)
            # the devices' gradients are averaged (pmean): scaling by their number sums them
            if den is None:  # an Objective's loss, reduced already
                value = num if loss_reduction == "mean" else num * devices
            elif loss_reduction == "sum":
                value = num * devices
            else:  # the global mean: the devices' sums over the global count
                den = lax.stop_gradient(den)
                value = num * devices / (den if axis_name is None else lax.psum(den, axis_name))
            return value * scale, (new_state, m)

        grads, (new_state, m) = jax.grad(minimised, has_aux=True)(params)
        if axis_name is not None:
            grads = lax.pmean(grads, axis_name)
            m = lax.psum(m, axis_name)
            new_state = jax.tree.map(
                lambda s: lax.pmean(s, axis_name)
                if jnp.issubdtype(s.dtype, jnp.floating) else s, new_state
            )
        params, opt_state = apply_gradients(optimizer, grads, opt_state, params)
        return params, new_state, opt_state, m

    if not jit:
        return train_step
    call = jax.jit(train_step, donate_argnums=(0, 1, 2) if donate else ())
    return TrainStep(call=call, fn=train_step if axis_name is None else None, donate=donate,
                     perplexity=perplexity)


def make_eval_step(
    model: Layer | Callable,
    loss: str | Callable | Objective = "cross_entropy",
    *,
    metrics: Callable | None = None,
    top_k: Sequence[int] = (),
    perplexity: bool = False,
    carry_state: bool = False,
    axis_name: str | None = None,
    jit: bool = True,
) -> EvalStep | Callable:
    """Build ``eval_step(params, state, batch) -> metrics`` (``train=False``, no key); the
    arguments are those of :func:`make_train_step`. ``carry_state``: see :class:`EvalStep`.
    ``jit=False`` returns the pure ``(params, state, batch) -> metrics`` function."""
    apply = apply_fn(model)
    objective = make_objective(loss, metrics=metrics, top_k=top_k)

    def with_state(params, state, batch):
        _, _, m, new_state = _forward(apply, objective, params, state, batch, None, False)
        if axis_name is not None:
            m = lax.psum(m, axis_name)
        return m, new_state

    def eval_step(params, state, batch):
        return with_state(params, state, batch)[0]

    if not jit:
        return eval_step
    return EvalStep(call=jax.jit(eval_step), fn=with_state if axis_name is None else None,
                    carry_state=carry_state, perplexity=perplexity)


def make_predict_fn(model: Layer | Callable, *, jit: bool = True) -> Callable:
    """``predict(params, state, x) -> outputs`` in evaluation mode."""
    apply = apply_fn(model)

    def predict(params, state, x):
        return apply(params, state, x, key=None, train=False)[0]

    return jax.jit(predict) if jit else predict
