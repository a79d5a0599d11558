"""Normalisation layers: batch norm (with running statistics as state), layer, group,
instance and RMS norm.

Momentum convention of :func:`batch_norm` (one number, named ``decay``)::

    running_mean = decay * running_mean + (1 - decay) * batch_mean
    running_var  = decay * running_var  + (1 - decay) * batch_var_unbiased

``decay`` is the weight of the *old* value. PyTorch's ``momentum`` is the weight of the *new*
value, so PyTorch ``momentum = 1 - decay`` (PyTorch's default 0.1 is ``decay=0.9``). Gluon's
(MXNet's) ``momentum`` is the weight of the old value, so Gluon ``momentum = decay`` (Gluon's
default 0.9 is ``decay=0.9``). Flax's ``momentum`` is also ``decay``. The normalisation itself
uses the biased batch variance; the running variance accumulates the unbiased one
(``batch_var * n / (n - 1)``, ``n`` = values per channel), exactly as PyTorch does.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from fdl.nn import norm_lowering
from fdl.nn.core import Layer, ShapeError, check_positive_int

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]


def _check_eps(layer: str, eps) -> float:
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{layer}: eps must be a real number > 0, got {eps!r}")
    return float(eps)


def _stat_dtype(dtype) -> jnp.dtype:
    """float32 for float16/bfloat16/float32 inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def _moments(x: jax.Array, axes: tuple[int, ...], axis_name) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance over ``axes`` (of ``x`` already in stat dtype).

    Two passes: the mean, then the mean of the squared deviations from it. The one-pass form
    ``mean(x**2) - mean**2`` loses precision to cancellation, forward and backward, when a
    channel's ``|mean|`` is large against its std (post-ReLU activations, raw pixel values):
    in float32 its input gradient is ~1e-5 off at mean/std = 30 and ~6e-4 at 100, against
    ~1e-7 for this form (and ~4e-7 for PyTorch's), for a few percent on a ResNet-18 step
    (``scripts/bn_numerics.py``; numbers in docs/results/bn_numerics.md). With ``axis_name``
    both means are ``pmean``-ed, which gives the statistics of the global (all-device) batch.
    """
    mean = jnp.mean(x, axis=axes)
    if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
    var = jnp.mean(lax.square(x - mean), axis=axes)
    if axis_name is not None:
        var = lax.pmean(var, axis_name)
    return mean, var


def _check_count(n: int, shape) -> None:
    if n < 2:
        raise ShapeError(
            "batch_norm", f"training needs more than 1 value per channel, got input shape {shape}"
        )


def _running(state, mean, var, n, decay: float) -> dict:
    """The new running statistics from the batch's ``mean`` and biased ``var`` over ``n``."""
    old_mean, old_var = state["mean"], state["var"]
    unbiased = var * (n / (n - 1))
    return {
        "mean": (decay * old_mean + (1.0 - decay) * mean).astype(old_mean.dtype),
        "var": (decay * old_var + (1.0 - decay) * unbiased).astype(old_var.dtype),
    }


def _native_train(scale, offset, state, x, *, eps: float, decay: float, relu: bool):
    """Training-mode batch norm of float32 ``x`` (N, ..., C) on the native kernels
    (:func:`fdl.nn.norm_lowering.batch_norm_train`): ``(y, new_state)``."""
    c, n = x.shape[-1], math.prod(x.shape[:-1])
    _check_count(n, x.shape)
    y, mean, var = norm_lowering.batch_norm_train(x.reshape(n, c), scale, offset, eps, relu)
    return y.reshape(x.shape), _running(state, mean, var, n, decay)


def batch_norm(
    *,
    decay: float = 0.9,
    eps: float = 1e-5,
    axis_name=None,
    use_scale: bool = True,
    use_offset: bool = True,
    relu: bool = False,
) -> Layer:
    """Batch normalisation over every axis but the last (channels last).

    Input ``(N, C)`` (after dense) or ``(N, ..., C)`` (NHWC after conv); output the same shape
    and dtype. Params ``{"scale": (C,), "offset": (C,)}`` (float32, initialised to 1 and 0;
    either may be switched off); state ``{"mean": (C,), "var": (C,)}`` (float32, 0 and 1).

    ``train=True``: normalise with the batch mean and *biased* batch variance and return the new
    state ``running = decay * running + (1 - decay) * batch_stat`` (unbiased batch variance for
    ``var``). PyTorch's ``momentum`` equals ``1 - decay``; Gluon's ``momentum`` equals ``decay``
    (see the module docstring). ``train=False``: normalise with the running statistics; state
    returned unchanged. Statistics are computed in float32 even for float16/bfloat16 inputs.

    ``axis_name``: under ``shard_map``/``pmap`` with the batch split over that mapped axis, the
    batch statistics are averaged across devices (``lax.pmean`` of the mean, then of the mean
    squared deviation from it), so every device normalises with, and stores, the statistics of
    the global batch.
    Not needed under sharded ``jit`` (the batch is one logical array there).

    ``relu``: the output is ``max(y, 0)``, computed in the same passes as the normalisation
    (``batch_norm(relu=True)`` equals ``serial(batch_norm(), relu())`` with one fewer pass
    over the activations forward and backward).

    Training mode on float32 with a channel count that is a multiple of 8 (at least 16) and
    at least 65536 values runs fdl's native two-pass loops on CPU when
    ``fdl.config.norm_backend`` allows (:mod:`fdl.nn.norm_lowering`), XLA otherwise.
    """
    eps = _check_eps("batch_norm", eps)
    if (
        not isinstance(decay, numbers.Real)
        or isinstance(decay, bool)
        or not 0.0 <= decay < 1.0
    ):
        raise ValueError(
            f"batch_norm: decay must satisfy 0 <= decay < 1 (weight of the old running value; "
            f"PyTorch momentum = 1 - decay), got {decay!r}"
        )
    decay = float(decay)
    if not isinstance(relu, bool):
        raise ValueError(f"batch_norm: relu must be True or False, got {relu!r}")

    def init(key, in_shape):
        if len(in_shape) < 2:
            raise ShapeError(
                "batch_norm", f"expected input of rank >= 2 (N, ..., C), got shape {in_shape}"
            )
        c = in_shape[-1]
        params = {}
        if use_scale:
            params["scale"] = jnp.ones((c,), jnp.float32)
        if use_offset:
            params["offset"] = jnp.zeros((c,), jnp.float32)
        state = {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}
        return tuple(in_shape), params, state

    def apply(params, state, x, *, key=None, train=False):
        c = state["mean"].shape[0]
        if x.ndim < 2 or x.shape[-1] != c:
            raise ShapeError(
                "batch_norm", f"expected input of rank >= 2 (N, ..., {c}), got shape {x.shape}"
            )
        sdt = _stat_dtype(x.dtype)
        xs = x.astype(sdt)
        if train and axis_name is None and norm_lowering.use_native(x.dtype, x.shape):
            scale = params["scale"] if use_scale else jnp.ones((c,), jnp.float32)
            offset = params["offset"] if use_offset else jnp.zeros((c,), jnp.float32)
            return _native_train(scale, offset, state, x, eps=eps, decay=decay, relu=relu)
        if train:
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            if axis_name is not None:
                n = n * lax.psum(1, axis_name)
            if isinstance(n, int):
                _check_count(n, x.shape)
            mean, var = _moments(xs, axes, axis_name)
            new_state = _running(state, mean, var, n, decay)
        else:
            mean, var = state["mean"].astype(sdt), state["var"].astype(sdt)
            new_state = state
        # y = (x - mean) * scale / sqrt(var + eps) + offset, folded into one per-channel
        # multiply-add so XLA fuses it with the reduction's consumers.
        inv = lax.rsqrt(var + eps)
        if use_scale:
            inv = inv * params["scale"].astype(sdt)
        shift = -mean * inv
        if use_offset:
            shift = shift + params["offset"].astype(sdt)
        y = xs * inv + shift
        if relu:
            y = jnp.maximum(y, 0)
        return y.astype(x.dtype), new_state

    return Layer(
        init,
        apply,
        name="batch_norm",
        config={"decay": decay, "eps": eps, "axis_name": axis_name, "use_scale": use_scale,
                "use_offset": use_offset, "relu": relu},
    )


def layer_norm(*, eps: float = 1e-5, use_scale: bool = True, use_offset: bool = True) -> Layer:
    """Layer normalisation over the last axis (PyTorch ``nn.LayerNorm(C)``).

    Input ``(..., C)``; output the same shape and dtype. Params ``{"scale": (C,), "offset":
    (C,)}`` (float32, 1 and 0). Uses the biased variance, computed in float32 for
    lower-precision inputs: ``y = (x - mean) / sqrt(var + eps) * scale + offset``. No state.
    """
    eps = _check_eps("layer_norm", eps)

    def init(key, in_shape):
        if len(in_shape) < 1:
            raise ShapeError("layer_norm", f"expected input of rank >= 1 (..., C), got {in_shape}")
        c = in_shape[-1]
        params = {}
        if use_scale:
            params["scale"] = jnp.ones((c,), jnp.float32)
        if use_offset:
            params["offset"] = jnp.zeros((c,), jnp.float32)
        return tuple(in_shape), params, {}

    def apply(params, state, x, *, key=None, train=False):
        c = None
        if "scale" in params:
            c = params["scale"].shape[0]
        elif "offset" in params:
            c = params["offset"].shape[0]
        if x.ndim < 1 or (c is not None and x.shape[-1] != c):
            raise ShapeError(
                "layer_norm", f"expected input (..., {c}), got shape {x.shape}"
            )
        sdt = _stat_dtype(x.dtype)
        xs = x.astype(sdt)
        mean = jnp.mean(xs, axis=-1, keepdims=True)
        centred = xs - mean
        var = jnp.mean(lax.square(centred), axis=-1, keepdims=True)
        y = centred * lax.rsqrt(var + eps)
        if use_scale:
            y = y * params["scale"].astype(sdt)
        if use_offset:
            y = y + params["offset"].astype(sdt)
        return y.astype(x.dtype), state

    return Layer(
        init,
        apply,
        name="layer_norm",
        config={"eps": eps, "use_scale": use_scale, "use_offset": use_offset},
    )


def _affine_params(c: int, use_scale: bool, use_offset: bool) -> dict:
    params = {}
    if use_scale:
        params["scale"] = jnp.ones((c,), jnp.float32)
    if use_offset:
        params["offset"] = jnp.zeros((c,), jnp.float32)
    return params


def _param_channels(params) -> int | None:
    for name in ("scale", "offset"):
        if name in params:
            return params[name].shape[0]
    return None


def _normalise(xs, mean, var, eps, params, sdt, shape):
    """``(x - mean) / sqrt(var + eps)`` reshaped to ``shape``, then the per-channel affine."""
    y = ((xs - mean) * lax.rsqrt(var + eps)).reshape(shape)
    if "scale" in params:
        y = y * params["scale"].astype(sdt)
    if "offset" in params:
        y = y + params["offset"].astype(sdt)
    return y


def group_norm(num_groups: int, *, eps: float = 1e-5, use_scale: bool = True,
               use_offset: bool = True) -> Layer:
    """Group normalisation (Wu & He; PyTorch ``nn.GroupNorm(num_groups, C)``), channels last.

    Input ``(N, ..., C)`` with ``num_groups`` dividing ``C``; output the same shape and dtype.
    Each example's channels are split into ``num_groups`` consecutive groups; every group is
    normalised with the mean and *biased* variance over its channels and all spatial
    positions, then a per-channel affine (params ``{"scale": (C,), "offset": (C,)}``, float32,
    1 and 0) is applied. The same in training and evaluation; no state. Statistics in float32
    for lower-precision inputs. ``num_groups=1`` normalises over everything but the batch
    (LayerNorm over ``(..., C)``), ``num_groups=C`` is :func:`instance_norm` with an affine.
    """
    check_positive_int("group_norm", "num_groups", num_groups)
    eps = _check_eps("group_norm", eps)
    return _group_norm_layer("group_norm", num_groups, eps, use_scale, use_offset, min_rank=2)


def instance_norm(*, eps: float = 1e-5, use_scale: bool = False, use_offset: bool = False
                  ) -> Layer:
    """Instance normalisation (PyTorch ``nn.InstanceNorm1d/2d/3d`` with its defaults
    ``affine=False, track_running_stats=False``), channels last.

    Input ``(N, *spatial, C)`` (at least one spatial axis and more than one spatial position);
    each example's channels are normalised over the spatial positions with the biased
    variance. ``use_scale``/``use_offset`` add PyTorch's ``affine=True`` params. No running
    statistics: training and evaluation compute the same thing.
    """
    eps = _check_eps("instance_norm", eps)
    return _group_norm_layer("instance_norm", None, eps, use_scale, use_offset, min_rank=3)


def _group_norm_layer(layer: str, groups: int | None, eps: float, use_scale: bool,
                      use_offset: bool, min_rank: int) -> Layer:
    layout = "(N, ..., C)" if min_rank == 2 else "(N, *spatial, C)"

    def check(shape, c=None):
        shape = tuple(shape)
        if len(shape) < min_rank or (c is not None and shape[-1] != c):
            want = layout if c is None else layout.replace("C)", f"{c})")
            raise ShapeError(layer, f"expected input of rank >= {min_rank} {want}, got shape "
                                    f"{shape}")
        g = shape[-1] if groups is None else groups
        if shape[-1] % g:
            raise ShapeError(layer, f"num_groups={g} must divide the {shape[-1]} channels "
                                    f"(input shape {shape})")
        if groups is None and math.prod(shape[1:-1]) < 2:
            raise ShapeError(layer, f"needs more than one spatial position per channel, got "
                                    f"input shape {shape}")
        return g

    def init(key, in_shape):
        check(in_shape)
        return tuple(in_shape), _affine_params(in_shape[-1], use_scale, use_offset), {}

    def apply(params, state, x, *, key=None, train=False):
        g = check(jnp.shape(x), _param_channels(params))
        sdt = _stat_dtype(x.dtype)
        xs = x.astype(sdt).reshape(*x.shape[:-1], g, x.shape[-1] // g)
        axes = (*range(1, x.ndim - 1), x.ndim)  # spatial axes and the channels in a group
        mean = jnp.mean(xs, axis=axes, keepdims=True)
        var = jnp.mean(lax.square(xs - mean), axis=axes, keepdims=True)
        return _normalise(xs, mean, var, eps, params, sdt, x.shape).astype(x.dtype), state

    cfg = {"eps": eps, "use_scale": use_scale, "use_offset": use_offset}
    if groups is not None:
        cfg["num_groups"] = groups
    return Layer(init, apply, name=layer, config=cfg)


def rms_norm(*, eps: float | None = None, use_scale: bool = True) -> Layer:
    """Root-mean-square normalisation over the last axis (PyTorch ``nn.RMSNorm(C)``; Zhang &
    Sennrich): ``y = x / sqrt(mean(x^2) + eps) * scale``.

    Input ``(..., C)``; output the same shape and dtype. Params ``{"scale": (C,)}`` (float32,
    ones). ``eps=None`` is PyTorch's default, the machine epsilon of the input's dtype. No
    mean subtraction, no offset, no state. Computed in float32 for lower-precision inputs.
    """
    if eps is not None:
        eps = _check_eps("rms_norm", eps)

    def init(key, in_shape):
        if len(in_shape) < 1:
            raise ShapeError("rms_norm", f"expected input of rank >= 1 (..., C), got {in_shape}")
        return tuple(in_shape), _affine_params(in_shape[-1], use_scale, False), {}

    def apply(params, state, x, *, key=None, train=False):
        c = _param_channels(params)
        if x.ndim < 1 or (c is not None and x.shape[-1] != c):
            raise ShapeError("rms_norm", f"expected input (..., {c}), got shape {x.shape}")
        sdt = _stat_dtype(x.dtype)
        e = float(jnp.finfo(x.dtype).eps) if eps is None else eps
        xs = x.astype(sdt)
        ms = jnp.mean(lax.square(xs), axis=-1, keepdims=True)
        y = xs * lax.rsqrt(ms + e)
        if use_scale:
            y = y * params["scale"].astype(sdt)
        return y.astype(x.dtype), state

    return Layer(init, apply, name="rms_norm", config={"eps": eps, "use_scale": use_scale})
