"""XLA's convolution with derivatives that XLA's CPU backend runs as library calls.

XLA's CPU backend computes a convolution with Eigen's convolution kernel only when its operands
are in the canonical layout (input NHWC, kernel HWIO, output NHWC, as dimension numbers);
otherwise it emits a generic loop nest, many times slower. Its ``ConvCanonicalization`` pass
rewrites other convolutions into the canonical form with transposes, but **only in the entry
computation**. JAX's transpose rules for ``lax.conv_general_dilated`` express the input gradient
with a kernel in HWOI order and the weight gradient with batch and feature swapped
(``f01b_i01o->01bf``): fine at the top level of a jitted step, where the pass fixes them, but
inside a ``while`` loop body (``lax.fori_loop``, ``lax.scan``, ``fit``'s device loop) they stay
non-canonical and every backward convolution runs as a loop nest (ResNet-18: 20-28x slower
training steps; ``docs/results/training.md``).

:func:`conv_general` has exactly the semantics of ``lax.conv_general_dilated`` with NHWC
inputs, HWIO kernels and explicit padding, and a ``custom_jvp`` whose tangent convolutions are
written so that JAX's transpose rules produce canonical convolutions (with explicit transposes
around them: the ones XLA's pass would insert). Reverse mode (any order), forward mode and
``vmap`` all work; values and gradients are those of ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["conv_general"]

_Pairs = tuple[tuple[int, int], ...]


def conv_general(
    x: jax.Array,
    w: jax.Array,
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] = (1, 1),
    rhs_dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> jax.Array:
    """``lax.conv_general_dilated(x, w, ...)`` with ``x`` (N, H, W, C_in), ``w`` (KH, KW,
    C_in / groups, C_out), ``padding`` ((top, bottom), (left, right)); returns (N, H_out,
    W_out, C_out). Its gradients are canonical convolutions (see the module docstring)."""
    geom = (tuple(int(s) for s in stride), tuple((int(a), int(b)) for a, b in padding),
            tuple(int(d) for d in lhs_dilation), tuple(int(d) for d in rhs_dilation),
            int(groups))
    return _conv(x, w, geom)


def _lax_conv(x, w, geom, dims=("NHWC", "HWIO", "NHWC")):
    stride, padding, lhs_dilation, rhs_dilation, groups = geom
    return lax.conv_general_dilated(
        x, w, window_strides=stride, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dims, feature_group_count=groups)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv(x, w, geom):
    return _lax_conv(x, w, geom)


def _conv_jvp(geom, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _conv(x, w, geom)
    out = []
    if not isinstance(dx, SymbolicZero):
        # The kernel as (KH, KW, C_out, C_in), declared HWOI: the same convolution, and JAX's
        # input-transpose rule (which swaps the kernel's in/out dimensions) sees HWIO.
        out.append(_lax_conv(dx, jnp.transpose(w, (0, 1, 3, 2)), geom,
                             ("NHWC", "HWOI", "NHWC")))
    if not isinstance(dw, SymbolicZero):
        # Input as (C, H, W, N), kernel as (C_in, KH, KW, C_out), output as (H, W, N, C): the
        # same convolution, and JAX's kernel-transpose rule (which swaps batch and feature of
        # input and output) sees input NHWC, kernel HWIO and output NHWC.
        t = _lax_conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dw, (2, 0, 1, 3)), geom,
                      ("CHWN", "IHWO", "HWNC"))
        out.append(jnp.transpose(t, (2, 0, 1, 3)))
    if not out:
        return y, jnp.zeros_like(y)
    return y, out[0] if len(out) == 1 else out[0] + out[1]


_conv.defjvp(_conv_jvp, symbolic_zeros=True)
