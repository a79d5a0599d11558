"""How training-mode batch norm is computed: :func:`batch_norm_train`.

``batch_norm_train(x, scale, offset, eps, relu)`` takes ``x`` of shape (rows, C) (channels last,
every other axis folded into rows) and returns ``(y, mean, var)``: ``y = (x - mean) /
sqrt(var + eps) * scale + offset`` (then ``max(y, 0)`` with ``relu``), with the batch's
per-channel ``mean`` and biased variance ``var``, each (C,).

Three primitives:

- ``batch_norm_train`` (the forward). Its JVP is the linear map ``batch_norm_train_jvp`` of
  the tangents of ``x``, ``scale``, ``offset``, so ``grad`` transposes that map:
- ``batch_norm_train_transpose``, its transpose (the backward; its own transpose is the JVP
  map).

On the CPU the forward and the backward are fdl's native two-pass loops (``fdl/_ext/
norm_cpu.cc``: 2 passes over the activations forward and 2 backward, where XLA's reductions
and loops make ~10), for float32 in a module that is not partitioned over several devices
(there the statistics need the global batch: XLA's form, partitioned by XLA). Everything else
-- other platforms, other dtypes, the JVP map (forward mode only) and ``vmap`` -- is the
same arithmetic as JAX operations, and the JVPs of the JVP map and the backward are those of
their JAX forms, so ``jvp``, Hessian-vector products and higher orders hold.

Selection: ``fdl.config.norm_backend`` (``auto`` | ``native`` | ``xla``), read when a function is
traced (:func:`use_native`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["MIN_CHANNELS", "MIN_ELEMENTS", "batch_norm_train", "use_native"]


# ----------------------------------------------------------------------------- JAX forms


def _affine(mean, var, scale, offset, eps):
    """``(rstd, inv, shift)`` with ``y = x * inv + shift`` (one multiply-add per element)."""
    rstd = lax.rsqrt(var + eps)
    inv = rstd * scale
    return rstd, inv, offset - mean * inv


def _forward_xla(x, scale, offset, *, eps, relu):
    mean = jnp.mean(x, axis=0)
    # two passes (the mean, then the mean squared deviation): see fdl.nn.norm._moments
    var = jnp.mean(lax.square(x - mean), axis=0)
    _, inv, shift = _affine(mean, var, scale, offset, eps)
    y = x * inv + shift
    return (jnp.maximum(y, 0) if relu else y), mean, var


def _jvp_xla(x, mean, var, scale, offset, dx, dscale, doffset, *, eps, relu):
    """Tangents ``(dy, dmean, dvar)`` of the forward at ``x`` (whose statistics are ``mean``,
    ``var``), linear in ``dx``, ``dscale``, ``doffset``."""
    n = x.shape[0]
    rstd, inv, shift = _affine(mean, var, scale, offset, eps)
    centred = x - mean
    xhat = centred * rstd
    dmean = jnp.sum(dx, axis=0) / n
    dvar = 2 * jnp.sum(centred * dx, axis=0) / n  # (sum(centred) = 0)
    dxhat = rstd * (dx - dmean) - (0.5 * rstd * rstd * dvar) * xhat
    dy = scale * dxhat + dscale * xhat + doffset
    if relu:
        dy = jnp.where(x * inv + shift > 0, dy, 0)
    return dy, dmean, dvar


def _bwd_xla(dy, x, mean, var, scale, offset, dmean, dvar, *, eps, relu):
    """Cotangents ``(dx, dscale, doffset)`` from those of ``(y, mean, var)``: the transpose
    of :func:`_jvp_xla`."""
    def jvp_map(dx, dscale, doffset):
        return _jvp_xla(x, mean, var, scale, offset, dx, dscale, doffset, eps=eps, relu=relu)

    return jax.linear_transpose(jvp_map, x, scale, offset)((dy, dmean, dvar))


# ----------------------------------------------------------------------------- primitives

_forward_p = Primitive("batch_norm_train")
_jvp_p = Primitive("batch_norm_train_jvp")
_bwd_p = Primitive("batch_norm_train_transpose")
for _p in (_forward_p, _jvp_p, _bwd_p):
    _p.multiple_results = True

_XLA = {_forward_p: _forward_xla, _jvp_p: _jvp_xla, _bwd_p: _bwd_xla}


def _forward_abstract(x, scale, offset, *, eps, relu):
    c = jax.core.ShapedArray((x.shape[1],), x.dtype)
    return [jax.core.ShapedArray(x.shape, x.dtype), c, c]


def _jvp_abstract(x, mean, var, scale, offset, dx, dscale, doffset, *, eps, relu):
    return _forward_abstract(x, scale, offset, eps=eps, relu=relu)


def _bwd_abstract(dy, x, mean, var, scale, offset, dmean, dvar, *, eps, relu):
    c = jax.core.ShapedArray((x.shape[1],), x.dtype)
    return [jax.core.ShapedArray(x.shape, x.dtype), c, c]


def _native_forward(x, scale, offset, *, eps, relu):
    c = jax.ShapeDtypeStruct((x.shape[1],), jnp.float32)
    outs = (jax.ShapeDtypeStruct(x.shape, jnp.float32), c, c)
    return jax.ffi.ffi_call("fdl_batch_norm_fwd", outs)(x, scale, offset, eps=np.float32(eps),
                                                        relu=relu)


def _native_bwd(dy, x, mean, var, scale, offset, dmean, dvar, *, eps, relu):
    c = jax.ShapeDtypeStruct((x.shape[1],), jnp.float32)
    outs = (jax.ShapeDtypeStruct(x.shape, jnp.float32), c, c)
    return jax.ffi.ffi_call("fdl_batch_norm_bwd", outs)(dy, x, mean, var, scale, offset, dmean,
                                                        dvar, eps=np.float32(eps), relu=relu)


def _library_loaded() -> bool:
    from fdl._ext import loader

    return loader.load("norm").loaded


def _cpu_lowering(prim, native):
    def lowering(ctx, *args, eps, relu):
        from jax._src import sharding_impls

        axis_ctx = ctx.module_context.axis_context
        sharded = (isinstance(axis_ctx, sharding_impls.ShardingContext)
                   and axis_ctx.num_devices > 1)
        f32 = all(a.dtype == jnp.float32 for a in ctx.avals_in)
        fn = native if f32 and not sharded and _library_loaded() else _XLA[prim]
        return mlir.lower_fun(functools.partial(fn, eps=eps, relu=relu),
                              multiple_results=True)(ctx, *args)

    return lowering


def _forward_jvp(primals, tangents, *, eps, relu):
    x, scale, offset = primals
    y, mean, var = _forward_p.bind(x, scale, offset, eps=eps, relu=relu)
    dx, dscale, doffset = (ad.instantiate_zeros(t) for t in tangents)
    dy, dmean, dvar = _jvp_p.bind(x, mean, var, scale, offset, dx, dscale, doffset,
                                  eps=eps, relu=relu)
    return [y, mean, var], [dy, dmean, dvar]


def _instantiated(cts, x) -> list:
    """The cotangents of an ``(x-shaped, (C,), (C,))`` triple, symbolic zeros made arrays."""
    shapes = (x.shape, (x.shape[1],), (x.shape[1],))
    return [jnp.zeros(shape, x.dtype) if type(ct) is ad.Zero else ct
            for ct, shape in zip(cts, shapes, strict=True)]


def _jvp_transpose(cts, x, mean, var, scale, offset, dx, dscale, doffset, *, eps, relu):
    """The backward: cotangents of ``dx``, ``dscale``, ``doffset`` (the linear operands)."""
    if any(ad.is_undefined_primal(a) for a in (x, mean, var, scale, offset)):
        raise NotImplementedError("batch_norm_train_jvp is linear in its tangents only")
    dy, dmean, dvar = _instantiated(cts, x)
    gx, gscale, goffset = _bwd_p.bind(dy, x, mean, var, scale, offset, dmean, dvar,
                                      eps=eps, relu=relu)
    return [None] * 5 + [gx if ad.is_undefined_primal(dx) else None,
                         gscale if ad.is_undefined_primal(dscale) else None,
                         goffset if ad.is_undefined_primal(doffset) else None]


def _bwd_transpose(cts, dy, x, mean, var, scale, offset, dmean, dvar, *, eps, relu):
    """The backward's transpose (in its cotangent operands): the JVP map."""
    if any(ad.is_undefined_primal(a) for a in (x, mean, var, scale, offset)):
        raise NotImplementedError("batch_norm_train_transpose is linear in its cotangents only")
    gx, gscale, goffset = _instantiated(cts, x)
    out = _jvp_p.bind(x, mean, var, scale, offset, gx, gscale, goffset, eps=eps, relu=relu)
    gdy, gdmean, gdvar = (o if ad.is_undefined_primal(a) else None
                          for o, a in zip(out, (dy, dmean, dvar), strict=True))
    return [gdy, None, None, None, None, None, gdmean, gdvar]


def _xla_jvp(prim):
    """JVP (in every operand) of the primitive's JAX form."""
    def rule(primals, tangents, *, eps, relu):
        tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
        out, out_dot = jax.jvp(functools.partial(_XLA[prim], eps=eps, relu=relu),
                               tuple(primals), tangents)
        return list(out), list(out_dot)

    return rule


def _xla_batch(prim):
    """``vmap``: the primitive's JAX form, vectorised."""
    def rule(args, dims, *, eps, relu):
        size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
        args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims, strict=True)]
        out = jax.vmap(functools.partial(_XLA[prim], eps=eps, relu=relu))(*args)
        return list(out), [0] * len(out)

    return rule


def _register() -> None:
    from jax._src import dispatch

    _forward_p.def_abstract_eval(_forward_abstract)
    _jvp_p.def_abstract_eval(_jvp_abstract)
    _bwd_p.def_abstract_eval(_bwd_abstract)
    for prim in (_forward_p, _jvp_p, _bwd_p):
        prim.def_impl(functools.partial(dispatch.apply_primitive, prim))
        batching.primitive_batchers[prim] = _xla_batch(prim)
        mlir.register_lowering(prim, mlir.lower_fun(_XLA[prim], multiple_results=True))
    ad.primitive_jvps[_forward_p] = _forward_jvp
    ad.primitive_jvps[_jvp_p] = _xla_jvp(_jvp_p)
    ad.primitive_jvps[_bwd_p] = _xla_jvp(_bwd_p)
    ad.primitive_transposes[_jvp_p] = _jvp_transpose
    ad.primitive_transposes[_bwd_p] = _bwd_transpose
    mlir.register_lowering(_forward_p, _cpu_lowering(_forward_p, _native_forward),
                           platform="cpu")
    mlir.register_lowering(_bwd_p, _cpu_lowering(_bwd_p, _native_bwd), platform="cpu")


_register()


# ----------------------------------------------------------------------------- entry point


#: the native kernels vectorise over channels: fewer, or a count that is not a multiple of 8,
#: leaves vector lanes idle and XLA's loops are faster (docs/performance.md, session 6).
MIN_CHANNELS = 16
#: smaller inputs stay in XLA, which fuses them with their neighbours (a custom call's fixed
#: cost is not repaid).
MIN_ELEMENTS = 1 << 16


def use_native(dtype, shape: tuple[int, ...]) -> bool:
    """Whether a training-mode batch norm of an input of ``dtype`` and ``shape`` (channels
    last) traced now takes the primitives (with their native CPU lowering): float32, at least
    :data:`MIN_CHANNELS` channels, a multiple of 8, at least :data:`MIN_ELEMENTS` values, and
    ``fdl.config.norm_backend`` allows the native library and it loads."""
    channels = shape[-1]
    if (jnp.dtype(dtype) != jnp.float32 or channels < MIN_CHANNELS or channels % 8
            or math.prod(shape) < MIN_ELEMENTS):
        return False
    from fdl._ext import loader

    return loader.enabled("norm", "norm_backend")


def batch_norm_train(x: jax.Array, scale: jax.Array, offset: jax.Array, eps: float,
                     relu: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, mean, var)`` of a training-mode batch norm of ``x`` (rows, C) with ``scale`` and
    ``offset`` (C,): ``y`` (rows, C), the batch ``mean`` and biased variance ``var`` (C,).
    ``relu``: ``y`` is ``max(y, 0)``. The primitives (native on CPU, see the module docstring)."""
    return tuple(_forward_p.bind(x, scale, offset, eps=float(eps), relu=bool(relu)))
