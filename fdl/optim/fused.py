"""Fused optimizer steps: ``(grads, state, params) -> (params, state)`` in one pass per element.

``update`` followed by :func:`~fdl.optim.apply_updates` is what XLA sees as a chain of
elementwise operations, and XLA:CPU runs it as several loops per leaf (Adam: the first moment,
the second moment, then the parameter from both), reading the gradient twice and the new
moments again. :func:`step` computes the same values in one loop over every leaf: on the CPU
a native kernel (``fdl/_ext/optim_cpu.cc``) reads each element of params, grads and state once
and writes params and state once, in place when the caller donates them (Adam: 7 array passes
instead of 10). Elsewhere (GPU/TPU, modules sharded over several devices, without the native
library, ``fdl.config.optim_backend = "xla"``) it is the same arithmetic in XLA.

The optimizers that have a fused form carry it (``GradientTransformation.step``):
:func:`~fdl.optim.adam`, :func:`~fdl.optim.adamw` (without ``mask``/``amsgrad``) and
:func:`~fdl.optim.sgd` with PyTorch-form momentum (no dampening), with Python-number
hyperparameters (the learning rate may be a schedule). Every leaf must be float32 for the
native kernel; other dtypes take the XLA form. :func:`apply_gradients` uses the fused form when
there is one and ``update`` + ``apply_updates`` otherwise: the results are the same.

``jax.grad``/``jvp`` through a step (meta-learning) use the XLA form's derivatives; ``vmap``
runs the XLA form.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from fdl.optim.adaptive import ScaleByAdamState, adam_direction, adam_moments, bias_corrections
from fdl.optim.base import (
    GradientTransformation,
    apply_updates,
    check_same_structure,
    safe_increment,
)
from fdl.optim.momentum import TraceState
from fdl.optim.scaling import ScaleByLearningRateState

__all__ = ["apply_gradients", "adam_step", "momentum_step", "native_available"]


def apply_gradients(optimizer: GradientTransformation, grads: Any, opt_state: Any,
                    params: Any) -> tuple[Any, Any]:
    """One optimizer step: ``(new_params, new_opt_state)``.

    The optimizer's fused ``step`` when it has one (see the module docstring), else
    ``optimizer.update`` then :func:`~fdl.optim.apply_updates`; both give the same values.
    """
    fused = getattr(optimizer, "step", None)
    if fused is not None:
        return fused(grads, opt_state, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return apply_updates(params, updates), opt_state


def native_available() -> bool:
    """Whether ``fdl.config.optim_backend`` allows the native step and its library loads
    (``native``: an unavailable library is an error). Read when a step is traced."""
    from fdl._ext import loader

    return loader.enabled("optim", "optim_backend")


# ----------------------------------------------------------------------------- the arithmetic
# Each rule maps (scalars, params, grads, *states) -> (params, *states), over lists of leaves;
# ``scalars`` is f32[3]: the learning rate and, for Adam, the two bias corrections.


def _adam_leaves(scalars, params, grads, mu, nu, *, b1, b2, eps, weight_decay, decoupled):
    lr, inv_bc1, inv_sqrt_bc2 = scalars[0], scalars[1], scalars[2]
    out_p, out_m, out_v = [], [], []
    for p, g, m, v in zip(params, grads, mu, nu, strict=True):
        if weight_decay and not decoupled:
            g = g + weight_decay * p
        m, v = adam_moments(g, m, v, b1, b2)
        u = adam_direction(m, v, inv_bc1.astype(g.dtype), inv_sqrt_bc2.astype(g.dtype), eps)
        if weight_decay and decoupled:
            u = u + weight_decay * p
        out_p.append((p + u * (-lr).astype(g.dtype)).astype(p.dtype))
        out_m.append(m)
        out_v.append(v)
    return out_p + out_m + out_v


def _momentum_leaves(scalars, params, grads, buf, *, momentum, weight_decay, nesterov):
    lr = scalars[0]
    out_p, out_b = [], []
    for p, g, b in zip(params, grads, buf, strict=True):
        if weight_decay:
            g = g + weight_decay * p
        b = momentum * b + g
        u = g + momentum * b if nesterov else b
        out_p.append((p + u * (-lr).astype(g.dtype)).astype(p.dtype))
        out_b.append(b)
    return out_p + out_b


_RULES = {"adam": (_adam_leaves, "fdl_adam_step", 2), "momentum": (_momentum_leaves,
                                                                  "fdl_momentum_step", 1)}


def _xla(*args, rule, n, hyper):
    fn, _, n_states = _RULES[rule]
    scalars, leaves = args[0], args[1:]
    groups = [list(leaves[k * n:(k + 1) * n]) for k in range(2 + n_states)]
    return fn(scalars, *groups, **dict(hyper))


# ----------------------------------------------------------------------------- the primitive

_step_p = Primitive("fdl_optim_step")
_step_p.multiple_results = True


def _abstract_eval(*args, rule, n, hyper):
    _, _, n_states = _RULES[rule]
    leaves = args[1:]
    params, states = leaves[:n], leaves[2 * n:]
    return [jax.core.ShapedArray(a.shape, a.dtype) for a in (*params, *states)]


def _native(*args, rule, n, hyper):
    _, target, n_states = _RULES[rule]
    leaves = args[1:]
    outs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*leaves[:n], *leaves[2 * n:])]
    # params (operands 1..n) and each state group update in place
    aliases = {1 + i: i for i in range(n)}
    aliases.update({1 + (2 + k) * n + i: (1 + k) * n + i for k in range(n_states)
                    for i in range(n)})
    attrs = dict(hyper)
    if rule == "adam":  # (1 - b) rounded from the Python float, as JAX rounds it
        b1 = attrs.pop("b1")
        attrs.update(one_minus_b1=1 - b1, one_minus_b2=1 - attrs["b2"])
    attrs = {k: (np.float32(v) if isinstance(v, float) else v) for k, v in attrs.items()}
    return jax.ffi.ffi_call(target, outs, input_output_aliases=aliases)(*args, **attrs)


def _cpu_lowering(ctx, *args, rule, n, hyper):
    from jax._src import sharding_impls

    axis_ctx = ctx.module_context.axis_context
    sharded = isinstance(axis_ctx, sharding_impls.ShardingContext) and axis_ctx.num_devices > 1
    # A sharded module keeps XLA's elementwise form: it follows any sharding of the params,
    # where the custom call would be replicated on every device.
    fn = _xla if sharded else _native
    return mlir.lower_fun(functools.partial(fn, rule=rule, n=n, hyper=hyper),
                          multiple_results=True)(ctx, *args)


def _jvp(primals, tangents, *, rule, n, hyper):
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    out, out_dot = jax.jvp(functools.partial(_xla, rule=rule, n=n, hyper=hyper),
                           tuple(primals), tangents)
    return list(out), list(out_dot)


def _batch(args, dims, *, rule, n, hyper):
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims, strict=True)]
    out = jax.vmap(functools.partial(_xla, rule=rule, n=n, hyper=hyper))(*args)
    return out, [0] * len(out)


def _register() -> None:
    from jax._src import dispatch

    _step_p.def_abstract_eval(_abstract_eval)
    _step_p.def_impl(functools.partial(dispatch.apply_primitive, _step_p))
    ad.primitive_jvps[_step_p] = _jvp
    batching.primitive_batchers[_step_p] = _batch
    mlir.register_lowering(_step_p, mlir.lower_fun(_xla, multiple_results=True))
    mlir.register_lowering(_step_p, _cpu_lowering, platform="cpu")


_register()


def _run(rule: str, hyper: dict, scalars, params: list, grads: list, *states: list) -> list:
    """The new leaves ``params + states`` (flat), natively when every leaf is float32."""
    n = len(params)
    leaves = [*params, *grads, *(s for group in states for s in group)]
    hyper_t = tuple(sorted(hyper.items()))
    scalars = jnp.asarray(scalars, jnp.float32)
    if n and all(jnp.result_type(x) == jnp.float32 for x in leaves) and native_available():
        return _step_p.bind(scalars, *leaves, rule=rule, n=n, hyper=hyper_t)
    return _xla(scalars, *leaves, rule=rule, n=n, hyper=hyper_t)


def _lr_value(lr, count):
    """``(value recorded in the state, value applied)`` as :func:`scale_by_learning_rate`."""
    if callable(lr):
        v = jnp.asarray(lr(count), dtype=float)
        return v, v
    return None, lr


# ----------------------------------------------------------------------------- the steps


def adam_step(lr, b1: float, b2: float, eps: float, weight_decay: float, decoupled: bool):
    """The fused step of ``adam`` (``decoupled=False``: the chain ``add_decayed_weights``,
    ``scale_by_adam``, ``scale_by_learning_rate``) or ``adamw`` (``decoupled=True``:
    ``scale_by_adam``, ``add_decayed_weights``, ``scale_by_learning_rate``), on their states."""
    hyper = {"b1": float(b1), "b2": float(b2), "eps": float(eps),
             "weight_decay": float(weight_decay), "decoupled": bool(decoupled)}

    def step(grads, state, params):
        check_same_structure(grads, params)
        if decoupled:
            adam_state, wd_state, lr_state = state
        else:
            wd_state, adam_state, lr_state = state
        check_same_structure(grads, adam_state.mu, "grads", "optimizer state")
        count = safe_increment(adam_state.count)
        inv_bc1, inv_sqrt_bc2 = bias_corrections(count, b1, b2)
        recorded, applied = _lr_value(lr, lr_state.count)
        treedef = jax.tree_util.tree_structure(params)
        flat = [treedef.flatten_up_to(t) for t in (params, grads, adam_state.mu, adam_state.nu)]
        out = _run("adam", hyper, jnp.stack([jnp.asarray(applied, jnp.float32),
                                             inv_bc1.astype(jnp.float32),
                                             inv_sqrt_bc2.astype(jnp.float32)]), *flat)
        n = len(flat[0])
        new_p, mu, nu = (jax.tree_util.tree_unflatten(treedef, out[k * n:(k + 1) * n])
                         for k in range(3))
        adam_state = ScaleByAdamState(count, mu, nu, None)
        lr_state = ScaleByLearningRateState(
            safe_increment(lr_state.count), lr_state.lr if recorded is None else recorded)
        state = ((adam_state, wd_state, lr_state) if decoupled
                 else (wd_state, adam_state, lr_state))
        return new_p, state

    return step


def momentum_step(lr, momentum: float, weight_decay: float, nesterov: bool):
    """The fused step of ``sgd`` with PyTorch-form momentum and no dampening (the chain
    ``add_decayed_weights``, ``trace``, ``scale_by_learning_rate``), on its state."""
    hyper = {"momentum": float(momentum), "weight_decay": float(weight_decay),
             "nesterov": bool(nesterov)}

    def step(grads, state, params):
        check_same_structure(grads, params)
        wd_state, trace_state, lr_state = state
        check_same_structure(grads, trace_state.momentum, "grads", "momentum buffer")
        recorded, applied = _lr_value(lr, lr_state.count)
        treedef = jax.tree_util.tree_structure(params)
        flat = [treedef.flatten_up_to(t) for t in (params, grads, trace_state.momentum)]
        zero = jnp.zeros([], jnp.float32)
        out = _run("momentum", hyper, jnp.stack([jnp.asarray(applied, jnp.float32), zero, zero]),
                   *flat)
        n = len(flat[0])
        new_p, buf = (jax.tree_util.tree_unflatten(treedef, out[k * n:(k + 1) * n])
                      for k in range(2))
        lr_state = ScaleByLearningRateState(
            safe_increment(lr_state.count), lr_state.lr if recorded is None else recorded)
        return new_p, (wd_state, TraceState(buf), lr_state)

    return step


def with_step(opt: GradientTransformation, step) -> GradientTransformation:
    """``opt`` carrying the fused ``step``."""
    return opt._replace(step=step)

