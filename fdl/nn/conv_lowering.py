"""How ``conv2d`` is computed: one entry point, lowering chosen per call and per platform.

``conv2d_nhwc(x, w, stride, padding, dilation, groups)`` has exactly the semantics of
``lax.conv_general_dilated`` with NHWC inputs, HWIO kernels and explicit padding pairs.

Lowerings (see ``docs/performance.md`` for the measurements behind the choice):

- native: oneDNN's convolution (forward, backward-data, backward-weights) called as an XLA FFI
  custom call from fdl's native library (:mod:`fdl._ext`, built when fdl is installed), when
  lowering for the CPU. Used for float32 rank-4 inputs with non-negative padding.
- ``xla``: ``lax.conv_general_dilated`` (XLA's lowering; cuDNN's kernels on GPU). Used when
  lowering for any other platform, for every other dtype or configuration, and whenever the
  native library is unavailable (with a one-time warning).

The native path is three JAX primitives in one (``fdl_conv``, ``kind`` = forward,
backward-data, backward-weights), each bilinear in its two operands, with transpose rules that
are the other two: so ``grad`` (any order), ``jvp``/``jacfwd``, Hessian-vector products and
``vmap`` (an unbatched kernel folds the batch into N; a batched one maps sequentially) all stay
native. Each has a CPU lowering (the custom call) and a default lowering (XLA's convolution and
its transposes), so a jitted model lowers for GPU/TPU too (``jax.export`` with
``platforms=("cpu", "cuda", "tpu")``). Under a sharded ``jit`` on several devices the custom
call is partitioned over the batch axis (``custom_partitioning``: each device convolves its
shard; the weight gradient is summed over the batch axis), not all-gathered.

Selection: ``fdl.config.conv_backend`` (``auto`` | ``native`` | ``xla``), read when a function
is traced; ``fdl.kernels()`` reports what ``auto`` gives on this machine.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdl import config
from fdl.nn.conv_xla import conv_general

__all__ = ["conv2d_nhwc", "native_available"]

# (stride, padding, dilation, groups) as nested tuples of Python ints.
_Geom = tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]], tuple[int, int], int]

_TARGETS = {"fwd": "fdl_conv_fwd", "bwd_data": "fdl_conv_bwd_data",
            "bwd_weights": "fdl_conv_bwd_weights"}


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


# ----------------------------------------------------------------------------- the primitive
#
# fdl_conv(a, b; kind, geom, hw), bilinear in (a, b):
#   fwd:          a = x (N,H,W,C),  b = w (KH,KW,C/g,O)  -> y  (N,OH,OW,O)
#   bwd_data:     a = dy,           b = w; hw = (H, W)    -> dx (N,H,W,C)
#   bwd_weights:  a = x,            b = dy; hw = (KH, KW) -> dw (KH,KW,C/g,O)

_conv_p = Primitive("fdl_conv")


def _conv(kind: str, a, b, geom: _Geom, hw: tuple[int, int] | None = None) -> jax.Array:
    return _conv_p.bind(a, b, kind=kind, geom=geom, hw=hw)


def _out_shape(kind, a_shape, b_shape, geom, hw) -> tuple[int, ...]:
    if kind == "fwd":
        return (a_shape[0], *_out_hw(a_shape[1], a_shape[2], b_shape[0], b_shape[1], geom),
                b_shape[3])
    if kind == "bwd_data":
        return (a_shape[0], *hw, b_shape[2] * geom[3])
    return (*hw, a_shape[3] // geom[3], b_shape[3])


def _abstract_eval(a, b, *, kind, geom, hw):
    return jax.core.ShapedArray(_out_shape(kind, a.shape, b.shape, geom, hw), a.dtype)


def _xla_impl(a, b, *, kind, geom, hw):
    """The same computation with XLA's convolution and its transposes (the lowering for every
    platform but the CPU)."""
    (sh, sw), pads, dil, g = geom

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (sh, sw), pads, rhs_dilation=dil,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=g)

    if kind == "fwd":
        return conv(a, b)
    out = jax.ShapeDtypeStruct(_out_shape(kind, a.shape, b.shape, geom, hw), a.dtype)
    if kind == "bwd_data":
        return jax.linear_transpose(lambda x: conv(x, b), out)(a)[0]
    return jax.linear_transpose(lambda w: conv(a, w), out)(b)[0]


def _native_impl(a, b, *, kind, geom, hw, threads: int = 0):
    """The custom call. ``threads``: 0 runs it on every core, one convolution at a time in the
    process; ``k > 0`` on ``k`` OpenMP threads alongside other calls (one device's shard of a
    sharded ``jit``, see :func:`_shard_threads`)."""
    out = jax.ShapeDtypeStruct(_out_shape(kind, a.shape, b.shape, geom, hw), jnp.float32)
    return jax.ffi.ffi_call(_TARGETS[kind], out)(a, b, **_attrs(geom), threads=threads)


def _shard_threads(mesh) -> int:
    """OpenMP threads for one device's shard: the process's cores split between its devices in
    ``mesh`` (which run their shards at the same time), or 0 (every core, the single-device
    setting) when there is one such device."""
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if local <= 1:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local)


def _batch_spec(sharding) -> object:
    """The mesh axes the leading (batch) axis is split over, or ``None``."""
    spec = sharding.spec if isinstance(sharding, NamedSharding) else ()
    return spec[0] if len(spec) else None


@functools.cache
def _partitioned(kind: str, geom: _Geom, hw) -> custom_partitioning:
    """The custom call partitioned over the batch axis under a sharded ``jit``: forward and
    backward-data on each device's batch shard (the kernel replicated), backward-weights on the
    shards followed by a sum over the batch axes."""
    def impl(a, b):  # (custom_partitioning needs plain positional parameters)
        return _native_impl(a, b, kind=kind, geom=geom, hw=hw)

    fn = custom_partitioning(impl)

    def infer(mesh, arg_shapes, result_shape):
        axes = _batch_spec(arg_shapes[0].sharding)
        return NamedSharding(mesh, P() if kind == "bwd_weights" else P(axes))

    def partition(mesh, arg_shapes, result_shape):
        axes = _batch_spec(arg_shapes[0].sharding)
        local = functools.partial(_native_impl, kind=kind, geom=geom, hw=hw,
                                  threads=_shard_threads(mesh))
        if kind == "bwd_weights":
            def summed(a, b):
                out = local(a, b)
                return out if axes is None else lax.psum(out, axes)

            shard = NamedSharding(mesh, P(axes))
            return mesh, summed, NamedSharding(mesh, P()), (shard, shard)
        return (mesh, local, NamedSharding(mesh, P(axes)),
                (NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())))

    rule = {"fwd": "b h w c, k l i o -> b p q o", "bwd_data": "b p q o, k l i o -> b h w c",
            "bwd_weights": "b h w c, b p q o -> k l i o"}[kind]
    fn.def_partition(infer_sharding_from_operands=infer, partition=partition,
                     sharding_rule=rule)
    return fn


def _cpu_lowering(ctx, a, b, *, kind, geom, hw):
    from jax._src import sharding_impls

    axis_ctx = ctx.module_context.axis_context
    if isinstance(axis_ctx, sharding_impls.ShardingContext) and axis_ctx.num_devices > 1:
        fn = _partitioned(kind, geom, hw)
    else:
        fn = functools.partial(_native_impl, kind=kind, geom=geom, hw=hw)
    return mlir.lower_fun(fn, multiple_results=False)(ctx, a, b)


def _transpose_a(ct, a, b, *, kind, geom, hw):
    """Cotangent of ``a`` (linear) given the output's."""
    if kind == "fwd":
        return _conv("bwd_data", ct, b, geom, a.aval.shape[1:3])
    if kind == "bwd_data":
        return _conv("fwd", ct, b, geom)
    return _conv("bwd_data", b, ct, geom, a.aval.shape[1:3])


def _transpose_b(ct, a, b, *, kind, geom, hw):
    """Cotangent of ``b`` (linear) given the output's."""
    if kind == "fwd":
        return _conv("bwd_weights", a, ct, geom, b.aval.shape[:2])
    if kind == "bwd_data":
        return _conv("bwd_weights", ct, a, geom, b.aval.shape[:2])
    return _conv("fwd", a, ct, geom)


def _batch(args, dims, *, kind, geom, hw):
    (a, b), (da, db) = args, dims
    if db is None and kind != "bwd_weights":  # one kernel for all: fold the batch into N
        a = jnp.moveaxis(a, da, 0)
        out = _conv(kind, a.reshape(-1, *a.shape[2:]), b, geom, hw)
        return out.reshape(a.shape[0], -1, *out.shape[1:]), 0
    size = a.shape[da] if da is not None else b.shape[db]
    a = batching.bdim_at_front(a, da, size)
    b = batching.bdim_at_front(b, db, size)
    return lax.map(lambda ab: _conv(kind, ab[0], ab[1], geom, hw), (a, b)), 0


def _register() -> None:
    from jax._src import dispatch

    _conv_p.def_abstract_eval(_abstract_eval)
    _conv_p.def_impl(functools.partial(dispatch.apply_primitive, _conv_p))
    ad.defbilinear(_conv_p, _transpose_a, _transpose_b)
    batching.primitive_batchers[_conv_p] = _batch
    mlir.register_lowering(_conv_p, mlir.lower_fun(_xla_impl, multiple_results=False))
    mlir.register_lowering(_conv_p, _cpu_lowering, platform="cpu")
    # its CPU lowering may partition (custom_partitioning), which needs the devices
    dispatch.prim_requires_devices_during_lowering.add(_conv_p)


_register()


# ----------------------------------------------------------------------------- dispatch


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
    if config.get("conv_backend") == "xla" or _native_eligible(x, w, geom):
        return False
    from fdl._ext import loader

    return loader.enabled("conv", "conv_backend")


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
        return _conv("fwd", x, w, _exact_geometry(x, w.shape[0], w.shape[1], geom))
    return _xla_conv(x, w, stride, padding, dilation, groups)
