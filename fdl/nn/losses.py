"""Loss functions: pure ``loss(prediction, target, ...) -> array``.

Every loss takes keyword-only ``weights=None`` and ``reduction="mean"``:

* ``reduction="none"``: the per-example loss (times ``weights`` if given), shape as documented
  per loss;
* ``"sum"``: ``sum(w * l)``;
* ``"mean"``: ``mean(l)`` without weights, ``sum(w * l) / sum(w)`` with weights (0 if all
  weights are 0). With a 0/1 padding mask this is the average over the *valid* positions — what
  PyTorch's ``cross_entropy(..., ignore_index=pad)`` computes.

d2l's ``MaskedSoftmaxCELoss`` instead averages the masked loss over *all* positions of each
sequence (padding included) and returns one value per sequence; get it with::

    softmax_cross_entropy(logits, labels, weights=mask, reduction="none").mean(axis=1)

**Labels out of range.** Integer class labels must lie in ``[0, K)`` and binary targets in
``[0, 1]``, except at positions of weight 0 (padding). On concrete arrays (outside ``jit``) a
label out of range raises ``ValueError`` naming the first one; under ``jit`` the loss of such a
position is NaN (so the mean is NaN and training visibly fails, where a clamped index would
silently train on the wrong class). For an error under ``jit``, call :func:`check_labels` in the
step and wrap the step with ``jax.experimental.checkify.checkify``.

``weights`` must broadcast to the per-example loss shape without changing it (a mask of shape
``(N, T)`` for a loss of shape ``(N, T)``, or ``(N, 1)``); anything else raises ``ValueError``.
Predictions and targets must have exactly the documented shapes: a ``(N, 1)`` prediction
against a ``(N,)`` target raises ``ValueError`` naming both shapes instead of silently
broadcasting to ``(N, N)``.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "check_labels",
    "label_nll",
    "softmax_cross_entropy",
    "squared_error",
    "l1_loss",
    "huber_loss",
    "smooth_l1_loss",
    "sigmoid_binary_cross_entropy",
    "multiclass_hinge_loss",
    "kl_divergence",
]

_REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------- helpers


def _check_reduction(name: str, reduction: str, valid: tuple[str, ...] = _REDUCTIONS) -> None:
    if reduction not in valid:
        raise ValueError(
            f"{name}: reduction must be one of {', '.join(repr(v) for v in valid)}, "
            f"got {reduction!r}"
        )


def _float_dtype(*dtypes) -> jnp.dtype:
    """Compute dtype: at least float32 (half-precision inputs are upcast)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _check_same_shape(name: str, what: str, a, b, other: str = "target") -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name}: {what} shape {tuple(a.shape)} and {other} shape {tuple(b.shape)} differ; "
            "they must be equal (no broadcasting — reshape one of them)"
        )


def _check_weights(name: str, weights, loss_shape: tuple[int, ...]):
    if weights is None:
        return None
    w = jnp.asarray(weights)
    ok = w.ndim <= len(loss_shape)
    if ok:
        try:
            ok = tuple(jnp.broadcast_shapes(w.shape, loss_shape)) == tuple(loss_shape)
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(
            f"{name}: weights shape {tuple(w.shape)} does not broadcast to the per-example "
            f"loss shape {tuple(loss_shape)}"
        )
    return w


def _reduce(loss: jax.Array, weights, reduction: str) -> jax.Array:
    if weights is not None:
        loss = loss * weights.astype(loss.dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    if weights is None:
        return jnp.mean(loss)
    total = jnp.sum(jnp.broadcast_to(weights, loss.shape).astype(loss.dtype))
    nonzero = total != 0
    return jnp.where(nonzero, jnp.sum(loss) / jnp.where(nonzero, total, 1), 0.0)


def _check_real(name: str, what: str, value, lo: float, lo_inclusive: bool,
                hi: float | None = None) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = value >= lo if lo_inclusive else value > lo
        if hi is not None:
            ok = ok and value < hi
    if not ok:
        rng = f"{'>=' if lo_inclusive else '>'} {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{name}: {what} must be a real number {rng}, got {value!r}")
    return float(value)


def _class_axis(name: str, x, axis: int) -> int:
    if x.ndim < 1 or not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"{name}: class axis {axis} is out of range for input shape {tuple(x.shape)}"
        )
    return axis % x.ndim


def _without(shape, axis):
    return tuple(s for i, s in enumerate(shape) if i != axis)


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _first_invalid(name: str, labels, lo, hi, weights, what: str) -> None:
    """Raise ``ValueError`` for the first position of concrete ``labels`` outside
    ``[lo, hi]`` with nonzero weight (no-op under tracing)."""
    if not _is_concrete(labels, weights):
        return
    y = np.asarray(labels)
    bad = ~((y >= lo) & (y <= hi))
    if weights is not None:
        bad &= np.broadcast_to(np.asarray(weights) != 0, bad.shape)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        value = np.asarray(labels)[idx]
        at = idx[0] if len(idx) == 1 else idx
        raise ValueError(
            f"{name}: label {value} at index {at} is out of range: {what} "
            f"({int(bad.sum())} such label(s); give padding positions weight 0)"
        )


def _nan_where_invalid(loss, valid, weights):
    """``loss`` with NaN where the label is invalid and the weight is nonzero (0 where it
    is zero), so an out-of-range label under ``jit`` is never silently clamped."""
    bad = jnp.nan if weights is None else jnp.where(jnp.broadcast_to(weights, loss.shape) != 0,
                                                   jnp.nan, 0.0)
    return jnp.where(valid, loss, jnp.asarray(bad, loss.dtype))


def check_labels(labels, num_classes: int, *, weights=None, name: str = "check_labels"):
    """Check that integer ``labels`` lie in ``[0, num_classes)`` wherever ``weights`` (if
    given) is nonzero. Concrete arrays: raise ``ValueError`` naming the first bad label.
    Under ``jit``: a ``jax.experimental.checkify`` check, so the step must be wrapped::

        step = checkify.checkify(jax.jit(step))   # err, out = step(...); err.throw()

    Returns ``labels``."""
    labels = jnp.asarray(labels) if _is_concrete(labels) else labels
    valid = (labels >= 0) & (labels < num_classes)
    if weights is not None:
        valid = valid | (jnp.broadcast_to(weights, labels.shape) == 0)
    if _is_concrete(labels, weights):
        _first_invalid(name, labels, 0, num_classes - 1, weights,
                       f"expected 0 <= label < {num_classes}")
    else:
        from jax.experimental import checkify

        checkify.check(jnp.all(valid), f"{name}: a label is out of range [0, {num_classes})")
    return labels


# ----------------------------------------------------------------------------- classification


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def label_nll(logits: jax.Array, labels: jax.Array, axis: int = -1) -> jax.Array:
    """``-log softmax(logits)[label]`` along ``axis``: ``logsumexp(z) - z[label]``.

    ``logits (..., K, ...)`` floating, ``labels`` integer of ``logits.shape`` without ``axis``
    (no range check here: a label outside ``[0, K)`` picks the clipped class; the public losses
    check). Returns the per-example loss, shape of ``labels``.

    Its derivative is the closed form ``softmax(z) - onehot(label)`` (a custom JVP, so every
    order of ``grad``/``jvp`` works): the backward pass is one elementwise product with
    ``softmax - onehot``, saved by the forward pass, instead of the transpose of
    ``log_softmax`` and of the label gather (a zero-filled ``(..., K)`` array and a
    scatter-add into it), which dominated the MLM head of BERT's step.
    """
    z_max = lax.stop_gradient(jnp.max(logits, axis, keepdims=True))
    z_max = jnp.where(jnp.isfinite(z_max), z_max, 0)
    shifted = logits - z_max  # log_softmax's form: no cancellation between two large terms
    return jnp.log(jnp.sum(jnp.exp(shifted), axis)) - _picked(shifted, labels, axis)


def _picked(logits, labels, axis):
    idx = jnp.expand_dims(labels, axis)
    return jnp.squeeze(jnp.take_along_axis(logits, idx, axis=axis, mode="clip"), axis)


@label_nll.defjvp
def _label_nll_jvp(axis, primals, tangents):
    logits, labels = primals
    dlogits = tangents[0]
    z_max = lax.stop_gradient(jnp.max(logits, axis, keepdims=True))
    z_max = jnp.where(jnp.isfinite(z_max), z_max, 0)
    shifted = logits - z_max
    e = jnp.exp(shifted)
    total = jnp.sum(e, axis, keepdims=True)
    nll = jnp.squeeze(jnp.log(total), axis) - _picked(shifted, labels, axis)
    classes = lax.broadcasted_iota(labels.dtype, logits.shape, axis % logits.ndim)
    onehot = (classes == jnp.expand_dims(labels, axis)).astype(logits.dtype)
    coef = e / total - onehot
    return nll, jnp.sum(coef * dlogits, axis)


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    weights: jax.Array | None = None,
    reduction: str = "mean",
    axis: int = -1,
) -> jax.Array:
    """Cross-entropy of ``softmax(logits)`` against class labels, stable via log-sum-exp.

    ``logits``: ``(..., K, ...)`` with the classes on ``axis`` (default last). ``labels``:

    * integer class indices of shape ``logits.shape`` without ``axis`` (e.g. ``(N,)`` for
      ``(N, K)``, ``(N, T)`` for ``(N, T, K)``), or
    * floating probability targets (one-hot or soft) of exactly ``logits.shape``.

    The kind is decided by dtype; a floating array shaped like indices (or an integer array
    shaped like the logits) raises ``ValueError``. Integer labels outside ``[0, K)`` are
    refused (``ValueError``) on concrete arrays and give a NaN loss under ``jit`` (see the
    module docstring), except at positions of weight 0 (padding).

    ``label_smoothing`` ``eps`` in ``[0, 1]`` mixes the target with the uniform distribution,
    ``t' = (1 - eps) * t + eps / K`` (PyTorch's convention, for indices and probabilities).
    Per-example loss ``-sum_k t'_k log softmax(logits)_k``, shape ``logits.shape`` without
    ``axis``; ``weights``/``reduction`` as in the module docstring.
    """
    name = "softmax_cross_entropy"
    _check_reduction(name, reduction)
    eps = label_smoothing
    if (not isinstance(eps, numbers.Real) or isinstance(eps, bool)
            or not 0.0 <= eps <= 1.0):
        raise ValueError(f"{name}: label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    ax = _class_axis(name, logits, axis)
    example_shape = _without(logits.shape, ax)
    dt = _float_dtype(logits.dtype)

    if jnp.issubdtype(labels.dtype, jnp.integer):
        if tuple(labels.shape) != example_shape:
            raise ValueError(
                f"{name}: integer labels of shape {tuple(labels.shape)} do not match logits "
                f"shape {tuple(logits.shape)} without the class axis {axis}, i.e. "
                f"{example_shape}"
                + ("; for probability targets pass a floating array"
                   if tuple(labels.shape) == tuple(logits.shape) else "")
            )
        k = logits.shape[ax]
        valid = (labels >= 0) & (labels < k)
        w = _check_weights(name, weights, example_shape)
        _first_invalid(name, labels, 0, k - 1, w, f"expected 0 <= label < {k} (the class axis "
                                               f"{axis} of the logits has {k} classes)")
        z = logits.astype(dt)
        nll = label_nll(z, labels, ax)
        if eps > 0:  # mean_k log p_k = mean_k z_k - logsumexp(z)
            mean_logp = jnp.mean(z, axis=ax) - jax.nn.logsumexp(z, axis=ax)
            loss = (1.0 - eps) * nll - eps * mean_logp
        else:
            loss = nll
        return _reduce(_nan_where_invalid(loss, valid, w), w, reduction)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if tuple(labels.shape) != tuple(logits.shape):
            hint = (
                "; these look like class indices — cast them to an integer dtype"
                if tuple(labels.shape) == example_shape else ""
            )
            raise ValueError(
                f"{name}: probability targets of shape {tuple(labels.shape)} do not match "
                f"logits shape {tuple(logits.shape)}{hint}"
            )
        logp = jax.nn.log_softmax(logits.astype(dt), axis=ax)
        t = labels.astype(dt)
        if eps > 0:
            t = (1.0 - eps) * t + eps / logits.shape[ax]
        loss = -jnp.sum(t * logp, axis=ax)
    else:
        raise ValueError(
            f"{name}: labels must be integer class indices or floating probabilities, "
            f"got dtype {labels.dtype}"
        )
    w = _check_weights(name, weights, example_shape)
    return _reduce(loss, w, reduction)


# Rounding slack for binary targets (finite differences and soft targets may step just outside).
_BCE_SLACK = 1e-3


def sigmoid_binary_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Binary cross-entropy of ``sigmoid(logits)`` against targets in ``[0, 1]`` (PyTorch
    ``F.binary_cross_entropy_with_logits``), stable form
    ``log(1 + exp(x)) - x * z`` via ``logaddexp``.

    ``labels`` has exactly ``logits.shape`` (integer/bool labels are cast to float);
    per-element loss of that shape; ``weights``/``reduction`` as in the module docstring (note:
    with ``weights``, ``"mean"`` is ``sum(w * l) / sum(w)``, whereas PyTorch's ``weight=`` with
    ``reduction="mean"`` gives ``mean(w * l)``; ``"none"`` and ``"sum"`` agree).
    """
    name = "sigmoid_binary_cross_entropy"
    _check_reduction(name, reduction)
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _check_same_shape(name, "logits", logits, labels, "labels")
    dt = _float_dtype(logits.dtype)
    x = logits.astype(dt)
    z = labels.astype(dt)
    w = _check_weights(name, weights, logits.shape)
    valid = (z >= -_BCE_SLACK) & (z <= 1 + _BCE_SLACK)
    _first_invalid(name, labels, -_BCE_SLACK, 1 + _BCE_SLACK, w,
                   "binary targets must lie in [0, 1]")
    # softplus(x) - x * z; logaddexp is stable and, unlike the max/abs spelling, has the
    # right derivative at x == 0 (zero-initialised heads start exactly there).
    loss = jnp.logaddexp(x, 0.0) - x * z
    return _reduce(_nan_where_invalid(loss, valid, w), w, reduction)


def multiclass_hinge_loss(
    scores: jax.Array,
    labels: jax.Array,
    margin: float = 1.0,
    *,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Multiclass SVM hinge loss, PyTorch ``nn.MultiMarginLoss(p=1, margin)`` convention:

    ``loss = sum_{k != y} max(0, margin - s_y + s_k) / K``

    (note the division by the number of classes ``K``, as PyTorch; the Weston–Watkins / CS231n
    form is this times ``K``). ``scores``: ``(..., K)``; integer ``labels``: ``(...)``;
    per-example loss ``(...)``; ``weights``/``reduction`` as in the module docstring.
    """
    name = "multiclass_hinge_loss"
    _check_reduction(name, reduction)
    margin = _check_real(name, "margin", margin, 0.0, True)
    scores = jnp.asarray(scores)
    labels = jnp.asarray(labels)
    if scores.ndim < 1:
        raise ValueError(f"{name}: scores must have a class axis, got shape {scores.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name}: labels must be integer class indices, got {labels.dtype}")
    if tuple(labels.shape) != tuple(scores.shape[:-1]):
        raise ValueError(
            f"{name}: labels shape {tuple(labels.shape)} does not match scores shape "
            f"{tuple(scores.shape)} without the class axis, i.e. {tuple(scores.shape[:-1])}"
        )
    k = scores.shape[-1]
    w = _check_weights(name, weights, tuple(labels.shape))
    valid = (labels >= 0) & (labels < k)
    _first_invalid(name, labels, 0, k - 1, w, f"expected 0 <= label < {k} classes")
    s = scores.astype(_float_dtype(scores.dtype))
    true = jnp.take_along_axis(s, labels[..., None], axis=-1, mode="clip")
    hinge = jnp.maximum(margin - true + s, 0.0)
    not_true = jnp.arange(k) != labels[..., None]
    loss = jnp.sum(jnp.where(not_true, hinge, 0.0), axis=-1) / k
    return _reduce(_nan_where_invalid(loss, valid, w), w, reduction)


def kl_divergence(
    log_predictions: jax.Array,
    targets: jax.Array,
    *,
    log_target: bool = False,
    weights: jax.Array | None = None,
    reduction: str = "batchmean",
) -> jax.Array:
    """KL divergence ``KL(targets || predictions)``, PyTorch ``nn.KLDivLoss`` convention:
    the *input is log-probabilities*, the target probabilities (or log-probabilities with
    ``log_target=True``). Pointwise ``t * (log t - log_p)``, defined as 0 where ``t == 0``.

    Shapes must be equal, e.g. ``(N, K)``. Reductions: ``"none"`` (pointwise, same shape),
    ``"sum"``, ``"batchmean"`` (default: sum divided by ``N = shape[0]``, the true mean KL per
    example), ``"mean"`` (sum divided by the number of *elements*, PyTorch's default, which is
    KL/K rather than the KL). ``weights`` broadcast to the pointwise loss; with weights,
    ``"batchmean"`` is ``sum(w * l) / N`` and ``"mean"`` is ``sum(w * l) / sum(w)`` (broadcast).
    """
    name = "kl_divergence"
    _check_reduction(name, reduction, ("none", "mean", "sum", "batchmean"))
    log_predictions = jnp.asarray(log_predictions)
    targets = jnp.asarray(targets)
    _check_same_shape(name, "log_predictions", log_predictions, targets, "targets")
    dt = _float_dtype(log_predictions.dtype, targets.dtype)
    lp = log_predictions.astype(dt)
    t = targets.astype(dt)
    if log_target:
        loss = jnp.exp(t) * (t - lp)
    else:
        loss = jax.scipy.special.xlogy(t, t) - t * lp
    w = _check_weights(name, weights, loss.shape)
    if reduction == "batchmean":
        if loss.ndim == 0:
            raise ValueError(f"{name}: reduction 'batchmean' needs a batch axis, got a scalar")
        return _reduce(loss, w, "sum") / loss.shape[0]
    return _reduce(loss, w, reduction)


# ----------------------------------------------------------------------------- regression


def _regression_inputs(name, pred, target, reduction):
    _check_reduction(name, reduction)
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    _check_same_shape(name, "prediction", pred, target)
    dt = _float_dtype(pred.dtype, target.dtype)
    return pred.astype(dt), target.astype(dt)


def squared_error(
    pred: jax.Array,
    target: jax.Array,
    *,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """d2l's squared loss ``(pred - target)**2 / 2`` elementwise (half of PyTorch's
    ``MSELoss``). Shapes must be equal; ``weights``/``reduction`` as in the module docstring.
    """
    p, t = _regression_inputs("squared_error", pred, target, reduction)
    loss = 0.5 * lax.square(p - t)
    return _reduce(loss, _check_weights("squared_error", weights, loss.shape), reduction)


def l1_loss(
    pred: jax.Array,
    target: jax.Array,
    *,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """``|pred - target|`` elementwise (PyTorch ``L1Loss``). Shapes must be equal."""
    p, t = _regression_inputs("l1_loss", pred, target, reduction)
    loss = jnp.abs(p - t)
    return _reduce(loss, _check_weights("l1_loss", weights, loss.shape), reduction)


def huber_loss(
    pred: jax.Array,
    target: jax.Array,
    delta: float = 1.0,
    *,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """PyTorch ``HuberLoss(delta)``: with ``d = pred - target``,
    ``0.5 * d**2`` if ``|d| < delta`` else ``delta * (|d| - 0.5 * delta)``; ``delta > 0``.
    Equals ``delta * smooth_l1_loss(pred, target, beta=delta)``. Shapes must be equal.
    """
    name = "huber_loss"
    delta = _check_real(name, "delta", delta, 0.0, False)
    p, t = _regression_inputs(name, pred, target, reduction)
    a = jnp.abs(p - t)
    loss = jnp.where(a < delta, 0.5 * lax.square(p - t), delta * (a - 0.5 * delta))
    return _reduce(loss, _check_weights(name, weights, loss.shape), reduction)


def smooth_l1_loss(
    pred: jax.Array,
    target: jax.Array,
    beta: float = 1.0,
    *,
    weights: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """PyTorch ``SmoothL1Loss(beta)``: with ``d = pred - target``,
    ``0.5 * d**2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 * beta``; ``beta >= 0``
    (``beta = 0`` is the L1 loss). Shapes must be equal.
    """
    name = "smooth_l1_loss"
    beta = _check_real(name, "beta", beta, 0.0, True)
    p, t = _regression_inputs(name, pred, target, reduction)
    d = p - t
    a = jnp.abs(d)
    if beta == 0.0:
        loss = a
    else:
        loss = jnp.where(a < beta, 0.5 * lax.square(d) / beta, a - 0.5 * beta)
    return _reduce(loss, _check_weights(name, weights, loss.shape), reduction)
