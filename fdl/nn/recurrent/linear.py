"""A linear map with a hand-written transpose that stays differentiable at every order:
:func:`linear_call`. The fused recurrent direction (:mod:`fdl.nn.recurrent.fused`) uses it for
its JVP's tangent, so that forward mode works and reverse mode (the tangent transposed) still
runs the hand-written (native or XLA) backward loop.

JAX's own ``jax.custom_derivatives.linear_call`` has the same transposition but refuses a
perturbed residual (so no ``jvp`` of ``grad``) and has no batching rule (no ``vmap``/
``jacfwd``). Here the derivative with respect to the residuals comes from autodiff of the
tangent function itself, and ``vmap`` runs the tangent function (or, once transposed, the
transpose function) under ``jax.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["linear_call"]

_linear_p = Primitive("fdl_linear_call")
_linear_p.multiple_results = True


def linear_call(fun: Callable, fun_transpose: Callable, residuals: Any, linear_args: Any) -> Any:
    """``fun(residuals, linear_args)``, a function linear in ``linear_args``, whose transpose
    (with respect to ``linear_args``) is ``fun_transpose(residuals, cotangents)``.

    ``fun`` must be an ordinary JAX function (its autodiff gives the derivative with respect to
    the residuals, and ``vmap`` runs it); ``fun_transpose`` must return cotangents with the
    structure, shapes and dtypes of ``linear_args`` and be differentiable itself (e.g. a
    ``jax.custom_jvp``) if derivatives of the transposed map are taken. ``fun`` and
    ``fun_transpose`` should be module-level functions (or ``functools.partial`` of them with
    hashable arguments): they key JAX's caches."""
    res_flat, res_tree = jax.tree_util.tree_flatten(residuals)
    lin_flat, lin_tree = jax.tree_util.tree_flatten(linear_args)
    out_shape = jax.eval_shape(fun, residuals, linear_args)
    out_tree = jax.tree_util.tree_structure(out_shape)
    out_avals = tuple(jax.core.ShapedArray(o.shape, o.dtype)
                      for o in jax.tree_util.tree_leaves(out_shape))
    outs = _linear_p.bind(*res_flat, *lin_flat, fun=fun, fun_transpose=fun_transpose,
                          res_tree=res_tree, lin_tree=lin_tree, out_tree=out_tree,
                          out_avals=out_avals)
    return jax.tree_util.tree_unflatten(out_tree, outs)


def _split(args, res_tree):
    n_res = res_tree.num_leaves
    return list(args[:n_res]), list(args[n_res:])


def _impl(*args, fun, res_tree, lin_tree, out_tree, **_):
    res, lin = _split(args, res_tree)
    out = fun(jax.tree_util.tree_unflatten(res_tree, res),
              jax.tree_util.tree_unflatten(lin_tree, lin))
    if jax.tree_util.tree_structure(out) != out_tree:
        raise TypeError(f"linear_call: fun returned {jax.tree_util.tree_structure(out)}, "
                        f"expected {out_tree}")
    return jax.tree_util.tree_leaves(out)


def _abstract_eval(*args, out_avals, **_):
    return list(out_avals)


def _jvp(primals, tangents, **params):
    res_tree = params["res_tree"]
    res, lin = _split(primals, res_tree)
    d_res, d_lin = _split(tangents, res_tree)
    out = _linear_p.bind(*primals, **params)
    d_lin = [ad.instantiate_zeros(t) for t in d_lin]
    if all(type(t) is ad.Zero for t in d_res):  # linear in ``lin``: the same map
        return out, _linear_p.bind(*res, *d_lin, **params)
    # a perturbed residual (higher-order derivatives): autodiff of ``fun`` in both arguments
    d_res = [ad.instantiate_zeros(t) for t in d_res]
    _, d_out = jax.jvp(lambda *a: _impl(*a, **params), (*res, *lin), (*d_res, *d_lin))
    return out, d_out


def _transpose(cts, *args, fun_transpose, res_tree, lin_tree, out_tree, out_avals, **_):
    res, lin = _split(args, res_tree)
    if any(ad.is_undefined_primal(r) for r in res):
        raise ValueError("linear_call: transposed with respect to a residual (not linear)")
    cts = [ad.instantiate_zeros(c) if type(c) is ad.Zero else c for c in cts]
    d_lin = fun_transpose(jax.tree_util.tree_unflatten(res_tree, res),
                          jax.tree_util.tree_unflatten(out_tree, cts))
    d_flat, d_tree = jax.tree_util.tree_flatten(d_lin)
    if d_tree != lin_tree:
        raise TypeError(f"linear_call: fun_transpose returned {d_tree}, expected {lin_tree}")
    return [None] * len(res) + [d if ad.is_undefined_primal(a) else None
                                for a, d in zip(lin, d_flat, strict=True)]


def _batch(args, dims, **params):
    outs = jax.vmap(lambda *a: _impl(*a, **params), in_axes=tuple(dims))(*args)
    return outs, [0] * len(outs)


_linear_p.def_impl(_impl)
_linear_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[_linear_p] = _jvp
ad.primitive_transposes[_linear_p] = _transpose
batching.primitive_batchers[_linear_p] = _batch
mlir.register_lowering(_linear_p, mlir.lower_fun(_impl, multiple_results=True))
