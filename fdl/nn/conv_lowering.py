"""How ``conv2d`` is computed: one entry point, lowering chosen per shape.

``conv2d_nhwc(x, w, stride, padding, dilation, groups)`` has exactly the semantics of
``lax.conv_general_dilated`` with NHWC inputs, HWIO kernels and explicit padding pairs.

Lowerings (see ``docs/performance.md`` for the measurements behind the choice):

- ``"onednn"``: oneDNN's convolution (forward, backward-data, backward-weights) called as an XLA
  FFI custom call from the optional C++ extension :mod:`fdl._ext` (compiled lazily on first use,
  or ahead of time with ``python -m fdl._ext.build``). Used for float32 NHWC inputs with
  non-negative padding. Reverse-mode (``grad``, ``vjp``, any order) and ``vmap`` work (under
  ``vmap`` an unbatched kernel folds the batch into N; a batched kernel loops per example).
  Forward-mode (``jvp``/``jacfwd``) is not supported by this lowering: use
  ``FDL_CONV_BACKEND=xla`` for it.
- ``"xla"``: ``lax.conv_general_dilated`` (XLA's CPU lowering). Used for every other dtype or
  configuration, and whenever the extension is unavailable (no compiler / no oneDNN).

Selection: the environment variable ``FDL_CONV_BACKEND`` = ``auto`` (default) | ``onednn`` |
``xla``, read when a function is traced. ``auto`` picks oneDNN when eligible and the extension
loads, else XLA.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from fdl.nn.conv_xla import conv_general

__all__ = ["conv2d_nhwc", "conv_backend", "onednn_available", "BACKENDS"]

log = logging.getLogger("fdl.nn.conv_lowering")

BACKENDS = ("auto", "onednn", "xla")

# (stride, padding, dilation, groups) as nested tuples of Python ints.
_Geom = tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]], tuple[int, int], int]


_BACKEND_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fdl_conv_backend", default=None)


@contextlib.contextmanager
def use_conv_backend(backend: str) -> Iterator[None]:
    """Trace the convolutions inside the ``with`` block with ``backend`` (``auto`` | ``onednn``
    | ``xla``), overriding ``FDL_CONV_BACKEND``. The choice is made at trace time, so wrap
    the code that *traces* (e.g. the body of a jitted function)."""
    if backend not in BACKENDS:
        raise ValueError(f"conv backend must be one of {BACKENDS}, got {backend!r}")
    token = _BACKEND_OVERRIDE.set(backend)
    try:
        yield
    finally:
        _BACKEND_OVERRIDE.reset(token)


def conv_backend() -> str:
    """The requested backend: :func:`use_conv_backend`'s, else ``FDL_CONV_BACKEND`` (``auto``
    if unset)."""
    override = _BACKEND_OVERRIDE.get()
    if override is not None:
        return override
    b = os.environ.get("FDL_CONV_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS:
        raise ValueError(f"FDL_CONV_BACKEND must be one of {BACKENDS}, got {b!r}")
    return b


def onednn_available() -> bool:
    """Whether the oneDNN extension is (or can be) built and loaded in this process."""
    from fdl._ext import build

    return build.load()


def _xla_conv(x, w, stride, padding, dilation, groups):
    # lax.conv_general_dilated whose gradients stay on XLA's fast (Eigen) convolution inside
    # loop bodies too (fdl.nn.conv_xla)
    return conv_general(x, w, stride, padding, rhs_dilation=dilation, groups=groups)


def _out_hw(ih: int, iw: int, kh: int, kw: int, geom: _Geom) -> tuple[int, int]:
    (sh, sw), ((pt, pb), (pl, pr)), (dh, dw), _ = geom
    oh = (ih + pt + pb - (dh * (kh - 1) + 1)) // sh + 1
    ow = (iw + pl + pr - (dw * (kw - 1) + 1)) // sw + 1
    return oh, ow


def _attrs(geom: _Geom) -> dict:
    (sh, sw), ((pt, pb), (pl, pr)), (dh, dw), g = geom
    return dict(sh=sh, sw=sw, pt=pt, pb=pb, pl=pl, pr=pr, dh=dh, dw=dw, groups=g)



def _call(target: str, a: jax.Array, b: jax.Array, out_shape, geom: _Geom, *extra) -> jax.Array:
    return jax.ffi.ffi_call(
        target,
        jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32),
        vmap_method="expand_dims",
    )(a, b, *extra, **_attrs(geom))


# Three mutually-differentiating custom_vjp functions: each is bilinear, and the cotangents of
# each are expressed with the other two, so derivatives of any order stay on oneDNN.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dnnl_fwd(x: jax.Array, w: jax.Array, geom: _Geom) -> jax.Array:
    n, ih, iw, _ = x.shape
    kh, kw, _, oc = w.shape
    oh, ow = _out_hw(ih, iw, kh, kw, geom)
    return _call("fdl_conv_fwd", x, w, (n, oh, ow, oc), geom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dnnl_bwd_data(dy: jax.Array, w: jax.Array, geom: _Geom, x_hw: tuple[int, int]) -> jax.Array:
    kh, kw, icg, _ = w.shape
    target = "fdl_conv_bwd_data"
    if FLIP_NATIVE and _flip_geometry(w.shape, geom, x_hw) is not None:
        target = "fdl_conv_bwd_data_flip"
    return _call(target, dy, w, (dy.shape[0], *x_hw, icg * geom[3]), geom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dnnl_bwd_weights(x: jax.Array, dy: jax.Array, geom: _Geom, k_hw: tuple[int, int]) -> jax.Array:
    return _dnnl_bwd_weights_after(x, dy, dy, geom, k_hw)


def _dnnl_bwd_weights_after(x, dy, after, geom: _Geom, k_hw: tuple[int, int]) -> jax.Array:
    """The weight gradient, computed after ``after`` exists (a third operand the extension does
    not read: a data dependency that orders the call)."""
    ic, oc = x.shape[3], dy.shape[3]
    return _call("fdl_conv_bwd_weights", x, dy, (*k_hw, ic // geom[3], oc), geom, after)


# The input gradient of a stride-1 convolution is a forward convolution of ``dy`` with the
# spatially flipped, in/out-transposed kernel and padding ``k - 1 - p``. oneDNN 2.6's forward
# kernel (brgconv) is faster than its backward-data kernel for these layers (ResNet-18 3x3
# layers at 8x8 to 32x32: 10-20% less CPU time, docs/performance.md), except on tiny images
# (<= 16 pixels), where the backward-data kernel wins. Set to False to always use backward-data.
BWD_DATA_VIA_FWD = True
# Where the kernel is flipped for that: True: inside the extension (a memcpy of the taps, the
# in/out swap folded into oneDNN's weight reorder); False: an XLA reverse+transpose before the
# call.
FLIP_NATIVE = True
# Make the weight gradient of each convolution wait for its input gradient (a data dependency:
# dx is an unread operand of the backward-weights call), so the optimizer's in-place update of a
# donated kernel is ordered after the backward-data call that reads it and XLA needs no copy of
# the kernel (41 -> 22 copies per ResNet-18 step). Off: the forced order made the ResNet-18
# step 1.5-3% slower than the copies it saves (docs/performance.md, 2026-11-30); an
# optimization_barrier on (dx, dw) instead left all copies in place.
ORDER_BWD = False
# Inexact geometries (rows/columns no output reads, e.g. a 1x1 stride-2 convolution of an even
# image): True: negative bottom/right padding for oneDNN; False: crop the input (a copy).
NEG_PAD = True


def _flip_geometry(w_shape, geom: _Geom, x_hw) -> _Geom | None:
    """The forward geometry that computes this stride-1 convolution's input gradient, or None
    when the rewrite does not apply (or is not expected to be faster)."""
    (sh, sw), ((pt, pb), (pl, pr)), (dh, dw), g = geom
    kh, kw = w_shape[0], w_shape[1]
    if not BWD_DATA_VIA_FWD or (sh, sw, dh, dw, g) != (1, 1, 1, 1, 1):
        return None
    if x_hw[0] * x_hw[1] <= 16:
        return None
    pads = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
    if min(min(p) for p in pads) < 0:
        return None
    return ((1, 1), pads, (1, 1), 1)


def _bwd_data(dy: jax.Array, w: jax.Array, geom: _Geom, x_hw: tuple[int, int]) -> jax.Array:
    """Gradient w.r.t. the input of ``_dnnl_fwd(x, w, geom)`` with ``x`` of spatial size x_hw."""
    flip = _flip_geometry(w.shape, geom, x_hw)
    if flip is None or FLIP_NATIVE:
        return _dnnl_bwd_data(dy, w, geom, x_hw)
    return _dnnl_fwd(dy, jnp.swapaxes(w[::-1, ::-1], 2, 3), flip)


def _fwd_fwd(x, w, geom):
    return _dnnl_fwd(x, w, geom), (x, w)


def _fwd_bwd(geom, res, dy):
    x, w = res
    dx = _bwd_data(dy, w, geom, x.shape[1:3])
    if ORDER_BWD:
        # The optimizer's update of w (a donated buffer, updated in place) depends on dw; making
        # dw depend on dx orders it after the backward-data call that reads w, so XLA's copy
        # insertion can prove the in-place update safe and drops its copy of w. dw keeps
        # _dnnl_bwd_weights' derivative rules (the extra operand gets no cotangent).
        dw = _bwd_weights_ordered(x, dy, dx, geom, w.shape[:2])
    else:
        dw = _dnnl_bwd_weights(x, dy, geom, w.shape[:2])
    return dx, dw


def _bd_fwd(dy, w, geom, x_hw):
    return _dnnl_bwd_data(dy, w, geom, x_hw), (dy, w)


def _bd_bwd(geom, x_hw, res, ddx):
    dy, w = res
    return _dnnl_fwd(ddx, w, geom), _dnnl_bwd_weights(ddx, dy, geom, w.shape[:2])


def _bw_fwd(x, dy, geom, k_hw):
    return _dnnl_bwd_weights(x, dy, geom, k_hw), (x, dy)


def _bw_bwd(geom, k_hw, res, ddw):
    x, dy = res
    return _bwd_data(dy, ddw, geom, x.shape[1:3]), _dnnl_fwd(x, ddw, geom)


_dnnl_fwd.defvjp(_fwd_fwd, _fwd_bwd)
_dnnl_bwd_data.defvjp(_bd_fwd, _bd_bwd)
_dnnl_bwd_weights.defvjp(_bw_fwd, _bw_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bwd_weights_ordered(x, dy, after, geom: _Geom, k_hw: tuple[int, int]) -> jax.Array:
    return _dnnl_bwd_weights_after(x, dy, after, geom, k_hw)


def _bwo_fwd(x, dy, after, geom, k_hw):
    return _bwd_weights_ordered(x, dy, after, geom, k_hw), (x, dy, after)


def _bwo_bwd(geom, k_hw, res, ddw):
    x, dy, after = res
    ddx, ddy = _bw_bwd(geom, k_hw, (x, dy), ddw)
    return ddx, ddy, jnp.zeros_like(after)


_bwd_weights_ordered.defvjp(_bwo_fwd, _bwo_bwd)


def _onednn_eligible(x: jax.Array, w: jax.Array, geom: _Geom) -> str:
    """'' if the oneDNN lowering can compute this convolution, else the reason it cannot."""
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return f"dtype {x.dtype}/{w.dtype} (oneDNN path is float32 only)"
    if x.ndim != 4 or w.ndim != 4:
        return "rank"
    (sh, sw), ((pt, pb), (pl, pr)), (dh, dw), g = geom
    if min(pt, pb, pl, pr) < 0:
        return "negative padding"
    if min(sh, sw, dh, dw, g) < 1:
        return "non-positive stride/dilation/groups"
    oh, ow = _out_hw(x.shape[1], x.shape[2], w.shape[0], w.shape[1], geom)
    if oh < 1 or ow < 1 or x.shape[0] == 0 or w.shape[3] == 0 or x.shape[3] == 0:
        return "empty"
    if x.shape[3] != w.shape[2] * g or w.shape[3] % g:
        return "channel/groups mismatch"
    return ""


def _exact_geometry(x: jax.Array, kh: int, kw: int, geom: _Geom) -> tuple[jax.Array, _Geom]:
    """Drop the bottom/right padding (and input rows/columns) that no output reads, so the
    geometry handed to oneDNN is exact: ``(H + pt + pb - eff_kh) % sh == 0``. Unread input
    rows/columns become negative bottom/right padding (oneDNN reads around them and its
    backward-data writes zeros there) with ``NEG_PAD``; otherwise ``x`` is cropped (a slice
    that XLA materialises: a copy of the activation before e.g. every 1x1 stride-2 shortcut)."""
    (sh, sw), ((pt, pb), (pl, pr)), (dh, dw), g = geom
    pads, crop = [], []
    axes = ((x.shape[1], kh, sh, dh, pt, pb), (x.shape[2], kw, sw, dw, pl, pr))
    for size, k, s, d, lo, hi in axes:
        eff = d * (k - 1) + 1
        excess = (size + lo + hi - eff) % s
        cut_pad = excess if NEG_PAD else min(excess, hi)
        pads.append((lo, hi - cut_pad))
        crop.append(size - (excess - cut_pad))
    if crop[0] != x.shape[1] or crop[1] != x.shape[2]:
        x = x[:, : crop[0], : crop[1], :]
    return x, ((sh, sw), (pads[0], pads[1]), (dh, dw), g)


def conv2d_nhwc(
    x: jax.Array,
    w: jax.Array,
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> jax.Array:
    """2-D convolution. ``x``: (N, H, W, C_in), ``w``: (KH, KW, C_in/groups, C_out);
    ``padding``: ((top, bottom), (left, right)). Returns (N, H_out, W_out, C_out).

    Computed by oneDNN or XLA (see the module docstring and ``FDL_CONV_BACKEND``)."""
    backend = conv_backend()
    if backend != "xla":
        geom: _Geom = (
            (int(stride[0]), int(stride[1])),
            tuple((int(p[0]), int(p[1])) for p in padding),  # type: ignore[assignment]
            (int(dilation[0]), int(dilation[1])),
            int(groups),
        )
        why = _onednn_eligible(x, w, geom)
        if not why and not onednn_available():
            why = "extension unavailable"
        if not why:
            x, geom = _exact_geometry(x, w.shape[0], w.shape[1], geom)
            return _dnnl_fwd(x, w, geom)
        log.debug("conv2d_nhwc: using XLA (%s)", why)
    return _xla_conv(x, w, stride, padding, dilation, groups)
