"""How ``conv2d`` is computed: one entry point, lowering chosen per shape.

``conv2d_nhwc(x, w, stride, padding, dilation, groups)`` has exactly the semantics of
``lax.conv_general_dilated`` with NHWC inputs, HWIO kernels and explicit padding pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax import lax

__all__ = ["conv2d_nhwc"]


def conv2d_nhwc(
    x: jax.Array,
    w: jax.Array,
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> jax.Array:
    """2-D convolution. ``x``: (N, H, W, C_in), ``w``: (KH, KW, C_in/groups, C_out);
    ``padding``: ((top, bottom), (left, right)). Returns (N, H_out, W_out, C_out)."""
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=tuple(stride),
        padding=tuple(tuple(p) for p in padding),
        rhs_dilation=tuple(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
