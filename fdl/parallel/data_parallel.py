"""Data parallelism over local devices, in two forms with the ``train_step`` signature.

**Sharded jit** (primary): a 1-D mesh with a ``data`` axis; the batch is split along its first
axis, params / state / optimizer state are replicated, and XLA inserts the gradient all-reduce.
The step computes exactly the single-device step on the global batch (BatchNorm sees the global
batch: no ``axis_name`` needed). Batch-first state (a recurrent layer's carry, ``(batch, ...)``)
is gathered at the end of the step to stay replicated, as all state is (one small all-gather
of the final carry per step; every process holds the whole state, so checkpoints need no
gathering). The mesh is built with ``AxisType.Auto`` (``jax.make_mesh``
defaults to Explicit axes since JAX 0.7; with Auto, sharding is a layout decision made by
``in_shardings``/``out_shardings`` and model code needs no sharding annotations).
fdl's native CPU kernels (oneDNN convolutions) partition themselves over the batch axis under
a sharded ``jit`` (each device convolves its shard; see :mod:`fdl.nn.conv_lowering`), so the
sharded steps use the same kernels as single-device steps.

**pmap**: every device runs the step on its shard; gradients are averaged with ``lax.pmean``
over ``axis_name`` (weighted so that padded shards still give the global-batch gradient),
metrics are ``psum``-ed and float model state is ``pmean``-ed. For BatchNorm to use global
statistics (and so match the single-device step), build the model with
``batch_norm(axis_name="data")``. Params and states carry a leading device axis
(:func:`replicate`/:func:`unreplicate`); batches are split with :func:`split_batch`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fdl.distributed.placement import global_batch, put_global
from fdl.nn.core import Layer
from fdl.train.step import make_eval_step, make_train_step

__all__ = [
    "data_mesh",
    "batch_sharding",
    "replicated_sharding",
    "shard_batch",
    "replicate_on_mesh",
    "make_sharded_train_step",
    "make_sharded_eval_step",
    "make_pmap_train_step",
    "make_pmap_eval_step",
    "replicate",
    "unreplicate",
    "split_batch",
    "shard_local_batch",
]


def _devices(devices: int | Sequence[Any] | None):
    local = jax.local_devices()
    if devices is None:
        return local
    if isinstance(devices, int):
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"devices must be between 1 and the {len(local)} local devices, got {devices}"
            )
        return local[:devices]
    return list(devices)


def _check_joined() -> None:
    """A process started by ``fdl.launch`` must have joined its run before building a mesh:
    otherwise every process would train alone, each writing the same checkpoints."""
    from fdl.distributed.cluster import launched_processes

    n = launched_processes()
    if n > 1 and jax.process_count() == 1:
        raise RuntimeError(
            f"this process was started as one of {n} (FDL_NUM_PROCESSES) but has not joined "
            "the run: call fdl.distributed.initialize() first, before any JAX computation")


def _mesh_devices(devices: int | Sequence[Any] | None):
    """Every device of every process (None), the first ``n`` (one process only), or a list."""
    _check_joined()
    if jax.process_count() == 1 or not isinstance(devices, int):
        return _devices(devices) if devices is not None else jax.devices()
    if devices != jax.device_count():
        raise ValueError(
            f"in a run of {jax.process_count()} processes the data mesh spans all "
            f"{jax.device_count()} devices; got devices={devices} (pass None)")
    return jax.devices()


def _per_process(n: int) -> list:
    """The first ``n`` devices of every process, process by process."""
    out = []
    for p in range(jax.process_count()):
        mine = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        if len(mine) < n:
            raise ValueError(f"per_process={n}, but process {p} has {len(mine)} devices")
        out += mine[:n]
    return out


def data_mesh(devices: int | Sequence[Any] | None = None, axis_name: str = "data", *,
              per_process: int | None = None):
    """A 1-D ``Mesh`` named ``axis_name`` over ``devices``, with ``AxisType.Auto``.

    Default: every device of every process (``jax.devices()``: the local devices in a
    single-process run; in a multi-process run, each process's devices one block after the
    other, so each process holds a contiguous block of every batch). An int takes the first
    ``n`` devices (single process); a list gives them explicitly; ``per_process=n`` takes the
    first ``n`` devices of every process."""
    if per_process is not None:
        if devices is not None:
            raise ValueError("data_mesh: pass devices or per_process, not both")
        devices = _per_process(per_process)
    devs = _mesh_devices(devices)
    return jax.make_mesh((len(devs),), (axis_name,), axis_types=(AxisType.Auto,), devices=devs)


def batch_sharding(mesh) -> NamedSharding:
    """Split the leading (batch) axis over the mesh's axis."""
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicated_sharding(mesh) -> NamedSharding:
    """Replicate on every device of the mesh."""
    return NamedSharding(mesh, P())


def _check_divisible(batch, n: int) -> None:
    for leaf in jax.tree.leaves(batch):
        if leaf.shape[0] % n:
            raise ValueError(
                f"the batch size {leaf.shape[0]} is not divisible by the {n} devices; use a "
                f"multiple of {n} (or pad the batch with a mask: ArrayLoader(last_batch='pad'))"
            )


def shard_batch(batch, mesh):
    """``device_put`` every array of the global ``batch`` split along axis 0 (size divisible
    by the devices). In a multi-process run every process passes the whole global batch; to
    pass only this process's rows use :func:`shard_local_batch`."""
    _check_divisible(batch, mesh.devices.size)
    return put_global(batch, batch_sharding(mesh))


def shard_local_batch(local_batch, mesh, global_size: int):
    """The global batch of ``global_size`` rows split over ``mesh``, from this process's rows
    (``fdl.parallel.process_rows(batch_sharding(mesh), global_size)``; every row with one
    process)."""
    return global_batch(local_batch, batch_sharding(mesh), global_size)


def replicate_on_mesh(tree, mesh):
    """``device_put`` ``tree`` replicated over the mesh (all processes pass the same values;
    typed PRNG keys allowed)."""
    return put_global(tree, replicated_sharding(mesh))


def make_sharded_train_step(
    model: Layer | Callable,
    optimizer,
    loss: str | Callable = "cross_entropy",
    *,
    mesh=None,
    top_k: Sequence[int] = (),
    donate: bool = True,
) -> Callable:
    """``train_step(params, state, opt_state, batch, key)`` as one ``jit`` over ``mesh``
    (default :func:`data_mesh`): batch sharded on ``data``, everything else replicated."""
    mesh = mesh if mesh is not None else data_mesh()
    rep, bat = replicated_sharding(mesh), batch_sharding(mesh)
    step = make_train_step(model, optimizer, loss, top_k=top_k, jit=False)
    jitted = jax.jit(
        step,
        in_shardings=(rep, rep, rep, bat, rep),
        out_shardings=(rep, rep, rep, rep),
        donate_argnums=(0, 1, 2) if donate else (),
    )
    jitted.mesh = mesh  # type: ignore[attr-defined]
    return jitted


def make_sharded_eval_step(model: Layer | Callable, loss: str | Callable = "cross_entropy", *,
                           mesh=None, top_k: Sequence[int] = ()) -> Callable:
    """``eval_step(params, state, batch) -> metrics`` sharded like the train step."""
    mesh = mesh if mesh is not None else data_mesh()
    rep, bat = replicated_sharding(mesh), batch_sharding(mesh)
    step = make_eval_step(model, loss, top_k=top_k, jit=False)
    return jax.jit(step, in_shardings=(rep, rep, bat), out_shardings=rep)


# ----------------------------------------------------------------------------- pmap


def _pmap_devices(devices: int | Sequence[Any] | None):
    """``jax.pmap``'s ``devices``: ``None`` keeps pmap's default (this process's devices, with
    collectives over the devices of *every* process); an explicit list limits the collectives
    to those devices, which in a multi-process run would train each process alone."""
    if devices is None:
        return None
    if jax.process_count() > 1:
        raise ValueError("in a multi-process run the pmap steps use every device (devices=None): "
                         "with explicit devices their collectives would not cross processes")
    return _devices(devices)


def replicate(tree, n: int | None = None):
    """Stack ``n`` (default: local device count) copies along a new leading axis for ``pmap``."""
    n = n or jax.local_device_count()
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n, *jnp.shape(x))), tree)


def unreplicate(tree):
    """The first device's copy of a ``pmap``-ed tree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch, n: int | None = None):
    """Reshape every array ``(B, ...) -> (n, B // n, ...)`` for ``pmap``."""
    n = n or jax.local_device_count()

    def split(x):
        if x.shape[0] % n:
            raise ValueError(
                f"the batch size {x.shape[0]} is not divisible by the {n} devices; use a "
                f"multiple of {n}"
            )
        return jnp.reshape(x, (n, x.shape[0] // n, *x.shape[1:]))

    return jax.tree.map(split, batch)


def make_pmap_train_step(
    model: Layer | Callable,
    optimizer,
    loss: str | Callable = "cross_entropy",
    *,
    axis_name: str = "data",
    devices: int | Sequence[Any] | None = None,
    top_k: Sequence[int] = (),
    donate: bool = True,
) -> Callable:
    """``train_step(params, state, opt_state, batch, key)`` under ``jax.pmap``.

    ``params``/``state``/``opt_state`` carry a leading device axis (:func:`replicate`), the
    batch is ``(devices, per_device, ...)`` (:func:`split_batch`), ``key`` is one key shared by
    all devices (each device folds in its index, so dropout masks differ per device). Metrics
    come back per device, all equal to the global sums. In a multi-process run each process
    passes its own rows (split over its local devices) and the collectives span every
    process's devices.
    """
    devs = _pmap_devices(devices)
    inner = make_train_step(model, optimizer, loss, top_k=top_k, axis_name=axis_name, jit=False)

    def step(params, state, opt_state, batch, key):
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
        return inner(params, state, opt_state, batch, key)

    return jax.pmap(step, axis_name=axis_name, in_axes=(0, 0, 0, 0, None), devices=devs,
                    donate_argnums=(0, 1, 2) if donate else ())


def make_pmap_eval_step(model: Layer | Callable, loss: str | Callable = "cross_entropy", *,
                        axis_name: str = "data", devices: int | Sequence[Any] | None = None,
                        top_k: Sequence[int] = ()) -> Callable:
    """``eval_step(params, state, batch)`` under ``pmap``; metrics are global sums."""
    devs = _pmap_devices(devices)
    inner = make_eval_step(model, loss, top_k=top_k, axis_name=axis_name, jit=False)
    return jax.pmap(inner, axis_name=axis_name, devices=devs)
