"""Mixed precision: compute in bfloat16 (or float16) with float32 master weights.

``mixed_precision(model, "bfloat16")`` is a layer with ``model``'s params and state (float32, as
``init`` made them: the *master* weights the optimizer updates). On ``apply`` it casts the
floating inputs and params to the compute dtype, runs ``model``, and casts the floating outputs
to ``output_dtype`` (float32), so the loss is computed in float32. Kept in float32:

- normalisation params (leaves named ``scale`` / ``offset``, ``keep_float32``), which
  BatchNorm and LayerNorm apply in float32 anyway;
- BatchNorm's batch statistics and running statistics: :func:`fdl.nn.batch_norm` and
  :func:`fdl.nn.layer_norm` compute their moments in float32 for lower-precision inputs and
  keep their state in float32 (the state is never cast);
- the gradients of the params: the cast's transpose brings them back to float32.

bfloat16 has float32's exponent range and needs no loss scaling. float16 does (its smallest
normal number is 6e-5, so small gradients underflow): pair it with
:func:`fdl.optim.dynamic_loss_scale` and multiply the loss by :func:`fdl.optim.loss_scale`
of the optimizer state before differentiating (``fdl.train.make_train_step`` does this when
the optimizer state holds a loss scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fdl.nn.core import Layer
from fdl.tree import map_with_path

__all__ = ["mixed_precision", "cast_floating", "NORM_PARAM_NAMES"]

NORM_PARAM_NAMES = ("scale", "offset")

_ALLOWED = ("bfloat16", "float16", "float32", "float64")


def _dtype(name: str, value: Any) -> jnp.dtype:
    try:
        dt = jnp.dtype(value)
    except TypeError:
        dt = None
    if dt is None or dt.name not in _ALLOWED:
        raise ValueError(f"mixed_precision: {name} must be one of {_ALLOWED}, got {value!r}")
    return dt


def cast_floating(tree: Any, dtype) -> Any:
    """``tree`` with every floating-point array leaf cast to ``dtype`` (others unchanged)."""

    def leaf(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map(leaf, tree)


def mixed_precision(
    model: Layer,
    compute_dtype: Any = "bfloat16",
    *,
    output_dtype: Any = "float32",
    keep_float32: Sequence[str] = NORM_PARAM_NAMES,
) -> Layer:
    """``model`` computed in ``compute_dtype`` with float32 params, state and outputs.

    Params and state are ``model``'s (same paths, float32); inputs and params (except the
    leaves whose last path segment is in ``keep_float32``) are cast to ``compute_dtype`` on
    every ``apply``; floating outputs are cast to ``output_dtype``. Integer inputs (token ids,
    labels) pass unchanged. See the module docstring for what stays in float32 and why.
    """
    if not isinstance(model, Layer):
        raise TypeError(f"mixed_precision: expected a Layer, got {type(model).__name__}")
    cdt = _dtype("compute_dtype", compute_dtype)
    odt = _dtype("output_dtype", output_dtype)
    keep = frozenset(keep_float32)

    def cast_params(params):
        def leaf(path, x):
            if path.rsplit("/", 1)[-1] in keep or not jnp.issubdtype(x.dtype, jnp.floating):
                return x
            return x.astype(cdt)

        return map_with_path(leaf, params)

    def apply(params, state, x, *, key=None, train=False, **kwargs):
        y, new_state = model.apply(cast_params(params), state, cast_floating(x, cdt), key=key,
                                   train=train, **kwargs)
        return cast_floating(y, odt), new_state

    return Layer(model.init, apply, name=model.name, children=model.children,
                 config={**model.config, "compute_dtype": cdt.name, "output_dtype": odt.name})
