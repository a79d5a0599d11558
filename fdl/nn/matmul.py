"""How dense layers multiply: ``matmul(x, w)``, lowered per call and per platform.

``matmul(x, w)`` is ``x @ w`` for ``x (..., K)`` and ``w (K, N)``: ``(..., N)``. Dense
layers, attention projections and the MLM head call it.

Lowerings (measurements in ``docs/performance.md``):

- native: oneDNN's ``sgemm`` called as an XLA FFI custom call from fdl's ``dense`` library
  (:mod:`fdl._ext`, built when fdl is installed), when lowering for the CPU, for float32
  products of at least :data:`NATIVE_MIN_FLOPS` (docs/performance.md has the comparison with
  XLA:CPU's own dot).
- ``xla``: ``lax.dot_general``. Used when lowering for any other platform (GPU/TPU), for other
  dtypes, small products, under a sharded ``jit`` over several devices (XLA partitions its dot
  itself), and whenever the native library is unavailable (with a one-time warning).

The native path is one JAX primitive, ``fdl_matmul(a, b; ta, tb) = op(a) @ op(b)`` on 2-D
operands (``op``: identity or transpose), bilinear, whose transpose rules are the same
primitive with other flags: ``grad`` (any order), ``jvp``/``jacfwd``, Hessian-vector products
stay native; ``vmap`` folds a batched ``x`` into rows (other batchings use XLA's batched dot).
Every platform other than the CPU lowers it to ``lax.dot_general`` (``jax.export`` with
``platforms=("cpu", "cuda", "tpu")`` works).

Selection: ``fdl.config.dense_backend`` (``auto`` | ``native`` | ``xla``), read when a
function is traced; ``fdl.kernels()`` reports what ``auto`` gives on this machine.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["matmul", "native_available", "NATIVE_MIN_FLOPS"]

#: products smaller than this many multiply-adds (M*N*K) stay on XLA's dot, which fuses them
#: with their neighbours; a custom call's fixed cost only pays for larger ones.
NATIVE_MIN_FLOPS = 1 << 20


def native_available() -> bool:
    """Whether the native (oneDNN) matmul library is loaded or loads now."""
    from fdl._ext import loader

    return loader.load("dense").loaded


# ----------------------------------------------------------------------------- the primitive

_matmul_p = Primitive("fdl_matmul")


def _mm(a: jax.Array, b: jax.Array, ta: bool, tb: bool) -> jax.Array:
    return _matmul_p.bind(a, b, ta=bool(ta), tb=bool(tb))


def _dims(a_shape, b_shape, ta, tb) -> tuple[int, int, int, int]:
    m, k = (a_shape[1], a_shape[0]) if ta else a_shape
    kb, n = (b_shape[1], b_shape[0]) if tb else b_shape
    return m, k, kb, n


def _abstract_eval(a, b, *, ta, tb):
    m, k, kb, n = _dims(a.shape, b.shape, ta, tb)
    if a.ndim != 2 or b.ndim != 2 or k != kb:
        raise TypeError(f"fdl_matmul: op(a) {a.shape} (ta={ta}) and op(b) {b.shape} (tb={tb}) "
                        f"do not multiply")
    return jax.core.ShapedArray((m, n), a.dtype)


def _xla_impl(a, b, *, ta, tb):
    """``op(a) @ op(b)`` with XLA's dot (every platform but the CPU, and sharded modules)."""
    return lax.dot_general(a, b, (((0 if ta else 1,), (1 if tb else 0,)), ((), ())))


def _native_impl(a, b, *, ta, tb):
    m, _, _, n = _dims(a.shape, b.shape, ta, tb)
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call("fdl_matmul", out)(a, b, ta=int(ta), tb=int(tb))


def native_or_xla_lowering(native_impl, xla_impl):
    """A CPU lowering rule ``(ctx, a, b, **params)``: ``native_impl`` (the custom call), or
    ``xla_impl`` when the module is partitioned over several devices (XLA splits its own dots;
    the custom call would be all-gathered)."""
    def rule(ctx, a, b, **params):
        from jax._src import sharding_impls

        axis_ctx = ctx.module_context.axis_context
        sharded = (isinstance(axis_ctx, sharding_impls.ShardingContext)
                   and axis_ctx.num_devices > 1)
        fn = functools.partial(xla_impl if sharded else native_impl, **params)
        return mlir.lower_fun(fn, multiple_results=False)(ctx, a, b)

    return rule


# C = op(A) op(B). Cotangents (G = dC):
#   dA = G op(B)^T            (ta = 0)      dA = op(B) G^T  (ta = 1)
#   dB = op(A)^T G            (tb = 0)      dB = G^T op(A)  (tb = 1)
def _transpose_a(ct, a, b, *, ta, tb):
    if ta:
        return _mm(b, ct, tb, True)
    return _mm(ct, b, False, not tb)


def _transpose_b(ct, a, b, *, ta, tb):
    if tb:
        return _mm(ct, a, True, ta)
    return _mm(a, ct, not ta, False)


def _batch(args, dims, *, ta, tb):
    (a, b), (da, db) = args, dims
    if db is None and not ta:  # one weight for all: fold the batch into the rows of a
        a = jnp.moveaxis(a, da, 0)
        out = _mm(a.reshape(-1, a.shape[-1]), b, False, tb)
        return out.reshape(a.shape[0], a.shape[1], -1), 0
    size = a.shape[da] if da is not None else b.shape[db]
    a = batching.bdim_at_front(a, da, size)
    b = batching.bdim_at_front(b, db, size)
    return jax.vmap(functools.partial(_xla_impl, ta=ta, tb=tb))(a, b), 0


def _register() -> None:
    from jax._src import dispatch

    _matmul_p.def_abstract_eval(_abstract_eval)
    _matmul_p.def_impl(functools.partial(dispatch.apply_primitive, _matmul_p))
    ad.defbilinear(_matmul_p, _transpose_a, _transpose_b)
    batching.primitive_batchers[_matmul_p] = _batch
    mlir.register_lowering(_matmul_p, mlir.lower_fun(_xla_impl, multiple_results=False))
    mlir.register_lowering(_matmul_p, native_or_xla_lowering(_native_impl, _xla_impl),
                           platform="cpu")


_register()


# ----------------------------------------------------------------------------- dispatch


def dense_library_enabled() -> bool:
    """Whether ``fdl.config.dense_backend`` allows the native ``dense`` library and it loads
    (``native``: an unavailable library is an error). Read when a function is traced."""
    from fdl._ext import loader

    return loader.enabled("dense", "dense_backend")


def _use_native(x: jax.Array, w: jax.Array) -> bool:
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return False
    if math.prod(x.shape[:-1]) * w.shape[0] * w.shape[1] < NATIVE_MIN_FLOPS:
        return False
    return dense_library_enabled()


def matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False) -> jax.Array:
    """``x @ w``: ``x (..., K)``, ``w (K, N)`` -> ``(..., N)`` (``transpose_w``: ``w`` is
    ``(N, K)`` and the product is ``x @ w.T``, e.g. a decoder tied to an embedding table).

    Computed by oneDNN or XLA (module docstring, ``fdl.config.dense_backend``); the result's
    dtype is that of ``x @ w``."""
    x = jnp.asarray(x)
    w = jnp.asarray(w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1 if transpose_w else 0]:
        raise ValueError(f"matmul: x {x.shape} and w {w.shape} (transpose_w={transpose_w}) do "
                         f"not multiply")
    if x.ndim >= 2 and x.size and w.size and _use_native(x, w):
        y = _mm(x.reshape(-1, x.shape[-1]), w, False, transpose_w)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return x @ (w.T if transpose_w else w)
