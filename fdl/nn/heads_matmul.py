"""Attention's per-(batch, head) products on head-split arrays, lowered per platform.

:func:`scores` ``(q (B, Tq, H, D), k (B, Tk, H, D)) -> (B, H, Tq, Tk)`` (``q_bh k_bh^T``) and
:func:`apply_weights` ``(w (B, H, Tq, Tk), v (B, Tk, H, D)) -> (B, Tq, H, D)`` (``w_bh v_bh``):
the two products of multi-head attention, with the heads left in place (no transposes to
heads-first and back).

Native lowering (CPU, float32, ``fdl.config.dense_backend`` not ``xla``, the native ``dense``
library loaded): one oneDNN batched matmul over ``(B, H)`` on strided views of the operands
(docs/performance.md compares it with XLA:CPU's batched dot and its transposes). Everywhere
else -- other platforms, other dtypes, a sharded ``jit`` over several devices -- the same
``jnp.einsum`` as before.

One primitive, ``fdl_heads_matmul(a, b; kind)`` with three kinds (scores, apply, apply with
the weights transposed) closed under transposition, like :mod:`fdl.nn.matmul`: ``grad`` of
any order, ``jvp`` and Hessian-vector products stay native; ``vmap`` folds the mapped axis into
``B``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from fdl.nn.matmul import dense_library_enabled, native_or_xla_lowering

__all__ = ["scores", "apply_weights"]

SCORES, APPLY, APPLY_T = 0, 1, 2
_EINSUM = {SCORES: "bqhd,bkhd->bhqk", APPLY: "bhqk,bkhd->bqhd", APPLY_T: "bhqk,bqhd->bkhd"}

_heads_p = Primitive("fdl_heads_matmul")


def _hm(kind: int, a: jax.Array, b: jax.Array) -> jax.Array:
    return _heads_p.bind(a, b, kind=kind)


def _out_shape(kind, a, b):
    if kind == SCORES:  # a (B, T1, H, D), b (B, T2, H, D)
        return (a[0], a[2], a[1], b[1])
    if kind == APPLY:  # a (B, H, T1, T2), b (B, T2, H, D)
        return (a[0], a[2], a[1], b[3])
    return (a[0], a[3], a[1], b[3])  # APPLY_T: a (B, H, T1, T2), b (B, T1, H, D)


def _abstract_eval(a, b, *, kind):
    return jax.core.ShapedArray(_out_shape(kind, a.shape, b.shape), a.dtype)


def _xla_impl(a, b, *, kind):
    return jnp.einsum(_EINSUM[kind], a, b)


def _native_impl(a, b, *, kind):
    out = jax.ShapeDtypeStruct(_out_shape(kind, a.shape, b.shape), jnp.float32)
    return jax.ffi.ffi_call("fdl_heads_matmul", out)(a, b, kind=kind)


# scores S = Q K^T:      dQ = apply(dS, K)        dK = apply_T(dS, Q)
# apply  O = W V:        dW = scores(dO, V)       dV = apply_T(W, dO)
# apply_T Y = W^T X:     dW = scores(X, dY)       dX = apply(W, dY)
def _transpose_a(ct, a, b, *, kind):
    if kind == SCORES:
        return _hm(APPLY, ct, b)
    if kind == APPLY:
        return _hm(SCORES, ct, b)
    return _hm(SCORES, b, ct)


def _transpose_b(ct, a, b, *, kind):
    if kind == SCORES:
        return _hm(APPLY_T, ct, a)
    if kind == APPLY:
        return _hm(APPLY_T, a, ct)
    return _hm(APPLY, a, ct)


def _batch(args, dims, *, kind):
    (a, b), (da, db) = args, dims
    size = a.shape[da] if da is not None else b.shape[db]
    a = batching.bdim_at_front(a, da, size)
    b = batching.bdim_at_front(b, db, size)
    out = _hm(kind, a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]))
    return out.reshape(size, -1, *out.shape[1:]), 0


def _register() -> None:
    from jax._src import dispatch

    _heads_p.def_abstract_eval(_abstract_eval)
    _heads_p.def_impl(functools.partial(dispatch.apply_primitive, _heads_p))
    ad.defbilinear(_heads_p, _transpose_a, _transpose_b)
    batching.primitive_batchers[_heads_p] = _batch
    mlir.register_lowering(_heads_p, mlir.lower_fun(_xla_impl, multiple_results=False))
    mlir.register_lowering(_heads_p, native_or_xla_lowering(_native_impl, _xla_impl),
                           platform="cpu")


_register()


def _use_native(a: jax.Array, b: jax.Array) -> bool:
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        return False
    return a.ndim == b.ndim == 4 and bool(a.size) and bool(b.size) and dense_library_enabled()


def scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """``q (B, Tq, H, D)``, ``k (B, Tk, H, D)`` -> ``(B, H, Tq, Tk)``: ``q_bh @ k_bh.T``."""
    if _use_native(q, k):
        return _hm(SCORES, q, k)
    return jnp.einsum(_EINSUM[SCORES], q, k)


def apply_weights(w: jax.Array, v: jax.Array) -> jax.Array:
    """``w (B, H, Tq, Tk)``, ``v (B, Tk, H, D)`` -> ``(B, Tq, H, D)``: ``w_bh @ v_bh``."""
    if _use_native(w, v):
        return _hm(APPLY, w, v)
    return jnp.einsum(_EINSUM[APPLY], w, v)
