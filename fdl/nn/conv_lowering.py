"""How ``conv2d`` is computed: one entry point, lowering chosen per call.

``conv2d_nhwc(x, w, stride, padding, dilation, groups)`` has exactly the semantics of
``lax.conv_general_dilated`` with NHWC inputs, HWIO kernels and explicit padding pairs.

Lowerings (see ``docs/performance.md`` for the measurements behind the choice):

- native: oneDNN's convolution (forward, backward-data, backward-weights) called as an XLA FFI
  custom call from fdl's native library (:mod:`fdl._ext`, built when fdl is installed). Used
  for float32 rank-4 inputs with non-negative padding. Reverse-mode (``grad``, ``vjp``, any
  order) and ``vmap`` work (under ``vmap`` an unbatched kernel folds the batch into N; a batched
  kernel loops per example).
- ``xla``: ``lax.conv_general_dilated`` (XLA's CPU lowering). Used for every other dtype or
  configuration, and whenever the native library is unavailable (with a one-time warning).

Selection: ``fdl.config.conv_backend`` (``auto`` | ``native`` | ``xla``), read when a function
is traced; ``fdl.kernels()`` reports what ``auto`` gives on this machine.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fdl import config
from fdl.nn.conv_xla import conv_general

__all__ = ["conv2d_nhwc", "native_available"]

# (stride, padding, dilation, groups) as nested tuples of Python ints.
_Geom = tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]], tuple[int, int], int]


def native_available() -> bool:
    """Whether the native (oneDNN) convolution library is loaded or loads now."""
    from fdl._ext import loader

    return loader.load("conv").loaded


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


def _call(target: str, a: jax.Array, b: jax.Array, out_shape, geom: _Geom) -> jax.Array:
    return jax.ffi.ffi_call(
        target,
        jax.ShapeDtypeStruct(tuple(out_shape), jnp.float32),
        vmap_method="expand_dims",
    )(a, b, **_attrs(geom))


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
    """Gradient w.r.t. the input of ``_dnnl_fwd(x, w, geom)`` with ``x`` of spatial size x_hw."""
    return _call("fdl_conv_bwd_data", dy, w, (dy.shape[0], *x_hw, w.shape[2] * geom[3]), geom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dnnl_bwd_weights(x: jax.Array, dy: jax.Array, geom: _Geom, k_hw: tuple[int, int]) -> jax.Array:
    ic, oc = x.shape[3], dy.shape[3]
    return _call("fdl_conv_bwd_weights", x, dy, (*k_hw, ic // geom[3], oc), geom)


def _fwd_fwd(x, w, geom):
    return _dnnl_fwd(x, w, geom), (x, w)


def _fwd_bwd(geom, res, dy):
    x, w = res
    return _dnnl_bwd_data(dy, w, geom, x.shape[1:3]), _dnnl_bwd_weights(x, dy, geom, w.shape[:2])


def _bd_fwd(dy, w, geom, x_hw):
    return _dnnl_bwd_data(dy, w, geom, x_hw), (dy, w)


def _bd_bwd(geom, x_hw, res, ddx):
    dy, w = res
    return _dnnl_fwd(ddx, w, geom), _dnnl_bwd_weights(ddx, dy, geom, w.shape[:2])


def _bw_fwd(x, dy, geom, k_hw):
    return _dnnl_bwd_weights(x, dy, geom, k_hw), (x, dy)


def _bw_bwd(geom, k_hw, res, ddw):
    x, dy = res
    return _dnnl_bwd_data(dy, ddw, geom, x.shape[1:3]), _dnnl_fwd(x, ddw, geom)


_dnnl_fwd.defvjp(_fwd_fwd, _fwd_bwd)
_dnnl_bwd_data.defvjp(_bd_fwd, _bd_bwd)
_dnnl_bwd_weights.defvjp(_bw_fwd, _bw_bwd)


def _native_eligible(x: jax.Array, w: jax.Array, geom: _Geom) -> str:
    """'' if the native lowering can compute this convolution, else the reason it cannot."""
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return f"dtype {x.dtype}/{w.dtype} (the native path is float32 only)"
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


def _exact_geometry(x: jax.Array, kh: int, kw: int, geom: _Geom) -> _Geom:
    """The geometry with the bottom/right padding that no output reads dropped, so that oneDNN
    gets an exact one: ``(H + pt + pb - eff_kh) % sh == 0``. Input rows/columns that no output
    reads become negative bottom/right padding (oneDNN reads around them and its backward-data
    writes zeros there; cropping the input instead would be a copy)."""
    (sh, sw), ((pt, pb), (pl, pr)), (dh, dw), g = geom
    pads = []
    for size, k, s, d, lo, hi in ((x.shape[1], kh, sh, dh, pt, pb),
                                  (x.shape[2], kw, sw, dw, pl, pr)):
        pads.append((lo, hi - (size + lo + hi - (d * (k - 1) + 1)) % s))
    return ((sh, sw), (pads[0], pads[1]), (dh, dw), g)


def _use_native(x: jax.Array, w: jax.Array, geom: _Geom) -> bool:
    backend = config.get("conv_backend")
    if backend == "xla" or _native_eligible(x, w, geom):
        return False
    from fdl._ext import loader

    st = loader.load("conv")
    if not st.loaded and backend == "native":
        raise RuntimeError(f"fdl.config.conv_backend is 'native' but the native convolution is "
                           f"unavailable: {st.reason}. Fix: {st.fix}")
    return st.loaded


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

    Computed by oneDNN or XLA (see the module docstring and ``fdl.config.conv_backend``)."""
    geom: _Geom = (
        (int(stride[0]), int(stride[1])),
        tuple((int(p[0]), int(p[1])) for p in padding),  # type: ignore[assignment]
        (int(dilation[0]), int(dilation[1])),
        int(groups),
    )
    if _use_native(x, w, geom):
        return _dnnl_fwd(x, w, _exact_geometry(x, w.shape[0], w.shape[1], geom))
    return _xla_conv(x, w, stride, padding, dilation, groups)
