"""Putting host data on a mesh that may span several processes.

In a multi-process run (``jax.distributed``) a sharding over the global mesh is not *fully
addressable*: each process holds only its devices' shards. Two ways to build a global array:

- every process has the whole value (params, a key, a small batch): :func:`put_global`
  (``jax.device_put``; typed PRNG keys go through their key data, which ``device_put``
  needs for a non-addressable sharding);
- every process has only its rows (a data loader reading its shard):
  :func:`process_rows` says which rows of a ``(n, ...)`` batch this process holds under a
  sharding, and :func:`global_batch` assembles the global array from them
  (``jax.make_array_from_process_local_data``).

With one process these are ``jax.device_put`` and "all rows". :func:`to_host` is the way
back: a NumPy copy of any array, gathering the shards of other processes when it has to.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["is_multiprocess", "process_rows", "global_batch", "put_global", "to_host",
           "place_like"]


def is_multiprocess(sharding) -> bool:
    """True when ``sharding`` spans devices of other processes."""
    return isinstance(sharding, jax.sharding.Sharding) and not sharding.is_fully_addressable


def process_rows(sharding, n: int) -> np.ndarray | None:
    """The rows of an ``(n, ...)`` array, split on axis 0 by ``sharding``, that this process's
    devices hold, ascending; ``None`` when it holds all of them. Raises ``ValueError`` when
    ``n`` does not split evenly over the devices of the batch axis, or when this process's
    rows are not one contiguous block (a mesh that interleaves processes)."""
    ndev = _batch_devices(sharding)
    if n % ndev:
        raise ValueError(
            f"a batch of {n} rows does not split over the {ndev} devices of the batch axis "
            f"({jax.process_count()} process(es)); use a batch size that is a multiple of "
            f"{ndev}")
    if not is_multiprocess(sharding):
        return None
    starts = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else n)
                     for s in sharding.addressable_devices_indices_map((n,)).values()})
    rows = np.concatenate([np.arange(a, b) for a, b in starts])
    if len(rows) and (np.diff(rows) != 1).any():
        raise ValueError("this process's devices do not hold one contiguous block of the batch "
                         "axis; build the mesh with fdl.parallel.data_mesh()")
    return rows


def _batch_devices(sharding) -> int:
    """How many ways ``sharding`` splits axis 0 of an array."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = sharding.spec
        axes = spec[0] if len(spec) else None
        if axes is None:
            return 1
        axes = axes if isinstance(axes, tuple) else (axes,)
        return int(np.prod([sharding.mesh.shape[a] for a in axes]))
    return 1  # other shardings: jax checks the split itself


def global_batch(local: Any, sharding, n: int) -> Any:
    """The global ``(n, ...)`` arrays (split by ``sharding``) of which this process holds the
    rows :func:`process_rows` names, given as ``local`` (a pytree of arrays of that many
    rows)."""
    if not is_multiprocess(sharding):
        return jax.device_put(local, sharding)
    process_rows(sharding, n)  # the divisibility and layout checks, with their messages
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a),
                                                         (n, *np.shape(a)[1:])), local)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def put_global(tree: Any, sharding) -> Any:
    """``jax.device_put(tree, sharding)`` that also takes typed PRNG keys to a sharding over
    several processes. Every process must pass the same values."""
    def put(x):
        if _is_key(x):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), sharding),
                                            impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def to_host(x) -> np.ndarray:
    """A NumPy copy of ``x``. An array split over several processes is gathered from all of
    them (a collective: every process must call this for it, in the same order); a replicated
    one is read from this process's copy."""
    if (isinstance(x, jax.Array) and not x.is_fully_addressable
            and not x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def place_like(value, template):
    """``value`` put where ``template`` (a ``jax.Array``) lives when that is more than one
    device (a sharding, possibly over several processes); otherwise ``value`` as is (an
    uncommitted array follows the arrays it meets)."""
    sharding = getattr(template, "sharding", None)
    if not isinstance(template, jax.Array) or sharding is None or len(sharding.device_set) < 2:
        return value
    return put_global(value, sharding)
