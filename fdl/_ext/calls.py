"""A native CPU custom call that ``vmap`` and sharded ``jit`` understand: :func:`native_call`.

``jax.ffi.ffi_call`` alone is opaque to the SPMD partitioner: under a sharded ``jit`` XLA
all-gathers its operands and every device computes the whole batch. :func:`native_call` binds
one primitive per call whose CPU lowering is the FFI call, wrapped, when the module is
partitioned over several devices, in a ``custom_partitioning`` rule over the batch axis: each
device runs the call on its batch shard, results without a batch axis (weight gradients) are
summed over the batch's mesh axes. Under ``vmap`` the call runs once per example (like
``vmap_method="sequential"``). It is a CPU kernel: callers dispatch with
``lax.platform_dependent`` (e.g. :mod:`fdl.nn.recurrent.fused`) so that other platforms run
something else.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["native_call"]

_call_p = Primitive("fdl_native_call")
_call_p.multiple_results = True


def native_call(target: str, out_shapes: Sequence[tuple[int, ...]], *args: jax.Array,
                batch_in: Sequence[int | None], batch_out: Sequence[int | None],
                aliases: tuple[tuple[int, int], ...] = ()) -> list[jax.Array]:
    """Call FFI ``target`` (float32 results of ``out_shapes``) on ``args``. ``batch_in`` /
    ``batch_out``: each operand's / result's batch axis (``None``: no batch axis; for a result,
    a sum over the batch). ``aliases``: ``(operand, result)`` pairs updated in place."""
    return _call_p.bind(*args, target=target, out_shapes=tuple(tuple(s) for s in out_shapes),
                        batch_in=tuple(batch_in), batch_out=tuple(batch_out),
                        aliases=tuple(aliases))


def _abstract_eval(*args, target, out_shapes, batch_in, batch_out, aliases):
    return [jax.core.ShapedArray(s, jnp.float32) for s in out_shapes]


def _ffi(args, target, out_shapes, aliases):
    outs = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes)
    return jax.ffi.ffi_call(target, outs, input_output_aliases=dict(aliases))(*args)


def _spec(axis, ndim, mesh_axes):
    parts = [None] * ndim
    if axis is not None:
        parts[axis] = mesh_axes
    return P(*parts)


@functools.cache
def _partitioned(target, out_shapes, in_ranks, batch_in, batch_out, aliases
                 ) -> custom_partitioning:
    first = next(i for i, b in enumerate(batch_in) if b is not None)

    def mesh_axes(arg_shapes):
        s = arg_shapes[first].sharding
        spec = s.spec if isinstance(s, NamedSharding) else ()
        axis = batch_in[first]
        return spec[axis] if len(spec) > axis else None

    def local(axes, shapes):
        def run(*args):
            out = list(_ffi(args, target, shapes, aliases))
            if axes is not None:
                out = [o if b is not None else lax.psum(o, axes)
                       for o, b in zip(out, batch_out, strict=True)]
            return tuple(out)

        return run

    def out_shardings(mesh, axes):
        return tuple(NamedSharding(mesh, _spec(b, len(s), axes))
                     for b, s in zip(batch_out, out_shapes, strict=True))

    def infer(mesh, arg_shapes, result_shape):
        return out_shardings(mesh, mesh_axes(arg_shapes))

    def partition(mesh, arg_shapes, result_shape):
        axes = mesh_axes(arg_shapes)
        n = 1 if axes is None else math.prod(
            mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        shapes = tuple(tuple(d // n if i == b else d for i, d in enumerate(s)) if b is not None
                       else s for s, b in zip(out_shapes, batch_out, strict=True))
        arg_sh = tuple(NamedSharding(mesh, _spec(b, len(a.shape), axes))
                       for b, a in zip(batch_in, arg_shapes, strict=True))
        return mesh, local(axes, shapes), out_shardings(mesh, axes), arg_sh

    def run(*args):
        return tuple(_ffi(args, target, out_shapes, aliases))

    fn = custom_partitioning(run)
    fn.def_partition(infer_sharding_from_operands=infer, partition=partition,
                     sharding_rule=_rule(in_ranks, batch_in, out_shapes, batch_out))
    return fn


def _rule(in_ranks, batch_in, out_shapes, batch_out) -> str:
    """A Shardy rule in which only the batch factor ``b`` is shared: every other dimension has
    a factor of its own (results without ``b`` are sums over it)."""
    names = iter(f"d{i}" for i in range(10_000))

    def mapping(axis, ndim):
        return " ".join("b" if i == axis else next(names) for i in range(ndim))

    ins = ", ".join(mapping(b, r) for b, r in zip(batch_in, in_ranks, strict=True))
    outs = ", ".join(mapping(b, len(s)) for b, s in zip(batch_out, out_shapes, strict=True))
    return f"{ins} -> {outs}"


def _cpu_lowering(ctx, *args, target, out_shapes, batch_in, batch_out, aliases):
    from jax._src import sharding_impls

    axis_ctx = ctx.module_context.axis_context
    if isinstance(axis_ctx, sharding_impls.ShardingContext) and axis_ctx.num_devices > 1:
        in_ranks = tuple(len(a.shape) for a in ctx.avals_in)
        fn = _partitioned(target, out_shapes, in_ranks, batch_in, batch_out, aliases)
    else:
        def fn(*a):
            return tuple(_ffi(a, target, out_shapes, aliases))
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


def _batch(args, dims, *, target, out_shapes, batch_in, batch_out, aliases):
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims, strict=True)]
    outs = lax.map(lambda xs: tuple(native_call(target, out_shapes, *xs, batch_in=batch_in,
                                                batch_out=batch_out, aliases=aliases)),
                   tuple(args))
    return list(outs), [0] * len(outs)


def _register() -> None:
    from jax._src import dispatch

    _call_p.def_abstract_eval(_abstract_eval)
    _call_p.def_impl(functools.partial(dispatch.apply_primitive, _call_p))
    batching.primitive_batchers[_call_p] = _batch
    mlir.register_lowering(_call_p, _cpu_lowering, platform="cpu")
    # Other platforms never run it (callers dispatch with lax.platform_dependent, and a module
    # for one platform drops the other branches), but a module lowered for several platforms
    # at once lowers every branch for all of them: there it is the plain custom call.
    mlir.register_lowering(_call_p, mlir.lower_fun(
        lambda *a, target, out_shapes, batch_in, batch_out, aliases: _ffi(
            a, target, out_shapes, aliases), multiple_results=True))
    dispatch.prim_requires_devices_during_lowering.add(_call_p)


_register()
