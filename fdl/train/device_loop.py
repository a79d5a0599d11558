"""Steps in compiled calls: runs of training steps, and whole evaluations, looped on the device.

When the data can stay on the device (``ArrayLoader.indexable_on_device``) and the step's pure
function is known (:class:`~fdl.train.TrainStep` from ``make_train_step``), a run of steps is
one compiled call (:class:`DeviceSteps`): each step gathers its batch from the device-resident
data by the epoch's index table, trains with the key ``fold_in(key, step)`` and adds its
metrics to the epoch's sums. The trip count is a run-time value, so one executable serves
every call length: a call of one step and a call of a whole epoch compute bitwise the same
steps, and resuming mid-epoch compiles nothing new. :class:`DeviceEval` sums an evaluation
step's metrics over every batch of an eval set in one call (bitwise the per-batch sums).

Measurements (``docs/results/training.md``): on LeNet/digits one call per epoch took 0.94-0.95
of the bare Python loop over the same compiled step, against 1.03 for one call per step; a
device-resident evaluation of 10,000 LeNet examples 111 vs 157 ms.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fdl.data.loader import ArrayLoader
from fdl.train.step import EvalStep, TrainStep

__all__ = ["DeviceSteps", "DeviceEval", "HostSteps", "device_steps", "device_eval", "host_steps",
           "evaluate_sums", "epoch_table", "calls", "table_batch"]


def table_batch(data, table, masks, i):
    """Batch ``i`` of an index table (traced): row ``table[i]`` of every array of ``data`` (a
    tuple of arrays or pytrees of them), with ``masks[i]`` appended when ``masks`` is not
    ``None``."""
    rows = lax.dynamic_index_in_dim(table, i, keepdims=False)

    def gather(a):  # rows of a 2-D view, in bounds by construction: a plain row copy
        return (a.reshape(a.shape[0], -1).at[rows].get(mode="promise_in_bounds")
                .reshape((rows.shape[0], *a.shape[1:])))

    batch = tuple(jax.tree.map(gather, data))
    if masks is not None:
        batch = (*batch, lax.dynamic_index_in_dim(masks, i, keepdims=False))
    return batch


def _zeros(shapes):
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def _signature(loader: ArrayLoader) -> tuple:
    return (loader.batch_size, loader.last_batch == "pad", loader.structure,
            tuple((a.shape[1:], a.dtype.str) for a in loader.arrays))


class DeviceSteps:
    """Runs of ``step.fn`` in one compiled call each (see the module docstring)."""

    def __init__(self, step: TrainStep):
        fn = step.fn

        def run(params, state, opt_state, sums, counter, data, table, masks, lo, n, key):
            def body(i, carry):
                params, state, opt_state, sums, _, counter = carry
                batch = table_batch(data, table, masks, i)
                params, state, opt_state, metrics = fn(params, state, opt_state, batch,
                                                       jax.random.fold_in(key, counter))
                sums = jax.tree.map(jnp.add, sums, metrics)
                return params, state, opt_state, sums, metrics, counter + 1

            carry = (params, state, opt_state, sums, sums, counter)
            return lax.fori_loop(lo, lo + n, body, carry)

        self.fn = fn
        self.run = jax.jit(run, donate_argnums=(0, 1, 2) if step.donate else ())
        self._zeros: dict = {}

    def __call__(self, params, state, opt_state, sums, counter, data, table, masks, lo, n,
                 key):
        """Steps ``lo .. lo+n-1`` of an epoch's index table: ``(params, state, opt_state,
        sums, last step's metrics, counter + n)``; ``counter`` is the global step."""
        return self.run(params, state, opt_state, sums, counter, data, table, masks, lo, n, key)

    def zeros(self, params, state, opt_state, key, loader: ArrayLoader):
        """Zero sums with the structure of the step's metrics (cached per batch signature;
        never donated, so they can be reused)."""
        sig = _signature(loader)
        if sig not in self._zeros:
            bs = loader.batch_size
            leaves = [jax.ShapeDtypeStruct((bs, *a.shape[1:]), a.dtype) for a in loader.arrays]
            batch = tuple(jax.tree.unflatten(loader.structure, leaves))
            if sig[1]:
                batch = (*batch, jax.ShapeDtypeStruct((bs,), jnp.float32))
            out = jax.eval_shape(self.fn, params, state, opt_state, batch, key)
            self._zeros[sig] = _zeros(out[3])
        return self._zeros[sig]


class DeviceEval:
    """The sum of an eval step's metrics over every batch of an index table, in one compiled
    call (with ``carry_state``, the state passes from batch to batch)."""

    def __init__(self, step: EvalStep):
        fn, carry = step.fn, step.carry_state

        def run(params, state, data, table, masks, zeros):
            def body(i, c):
                sums, st = c
                metrics, new_state = fn(params, st, table_batch(data, table, masks, i))
                return jax.tree.map(jnp.add, sums, metrics), (new_state if carry else st)

            return lax.fori_loop(0, table.shape[0], body, (zeros, state))[0]

        self.fn = fn
        self.run = jax.jit(run)
        self._zeros: dict = {}

    def __call__(self, params, state, loader: ArrayLoader):
        """The summed metrics over ``loader`` (device arrays, not waited for)."""
        table, masks = jax.device_put(loader.index_table(0))
        sig = (table.shape, jax.tree.structure((params, state)), _signature(loader))
        if sig not in self._zeros:
            batch = jax.eval_shape(lambda d, t, m: table_batch(d, t, m, 0),
                                   loader.device_arrays(), table, masks)
            self._zeros[sig] = _zeros(jax.eval_shape(self.fn, params, state, batch)[0])
        return self.run(params, state, loader.device_arrays(), table, masks, self._zeros[sig])


class HostSteps:
    """One step on a host batch in one compiled call, with its key ``fold_in(key, counter)``
    and the running sum of the epoch's metrics (``sums`` ``None`` for an epoch's first step):
    one dispatch per step instead of three."""

    def __init__(self, step: TrainStep):
        fn = step.fn

        def run(params, state, opt_state, sums, counter, batch, key):
            params, state, opt_state, metrics = fn(params, state, opt_state, batch,
                                                   jax.random.fold_in(key, counter))
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            return params, state, opt_state, sums, metrics, counter + 1

        self.run = jax.jit(run, donate_argnums=(0, 1, 2) if step.donate else ())

    def __call__(self, params, state, opt_state, sums, counter, batch, key):
        """``(params, state, opt_state, sums + metrics, metrics, counter + 1)``."""
        return self.run(params, state, opt_state, sums, counter, batch, key)


_CACHES: dict[type, weakref.WeakKeyDictionary] = {}


def _cached(kind: type, step):
    """``kind(step)``, built once per step object; ``None`` when its pure function is
    unknown."""
    if step.fn is None:
        return None
    cache = _CACHES.setdefault(kind, weakref.WeakKeyDictionary())
    if step not in cache:
        cache[step] = kind(step)
    return cache[step]


def device_steps(step: TrainStep) -> DeviceSteps | None:
    """The :class:`DeviceSteps` of ``step`` (built once per step), or ``None``."""
    return _cached(DeviceSteps, step)


def host_steps(step: TrainStep) -> HostSteps | None:
    """The :class:`HostSteps` of ``step`` (built once per step), or ``None``."""
    return _cached(HostSteps, step)


def device_eval(step: EvalStep) -> DeviceEval | None:
    """The :class:`DeviceEval` of ``step`` (built once per step), or ``None``."""
    return _cached(DeviceEval, step)


@jax.jit
def accumulate(acc, metrics):
    """``acc + metrics`` leaf by leaf (one compiled call)."""
    return jax.tree.map(jnp.add, acc, metrics)


def evaluate_sums(params, state, data: Any, step: EvalStep):
    """The summed metrics of ``step`` over ``data`` (device arrays, not waited for): one
    compiled call when ``data`` can stay on the device, else one call per batch."""
    run = device_eval(step) if getattr(data, "indexable_on_device", False) else None
    if run is not None and len(data):
        return run(params, state, data)
    acc = None
    for batch in data.epoch_batches(0):
        if step.carry_state:
            m, state = step.with_state(params, state, batch)
        else:
            m = step(params, state, batch)
        acc = m if acc is None else accumulate(acc, m)
    return acc


def epoch_table(loader: ArrayLoader, epoch: int, start: int):
    """``((epoch, start), table, masks)``: the loader's index table for batches ``start, ...``
    of ``epoch`` (and its pad masks or ``None``), on the device."""
    idx, mask = loader.index_table(epoch, start)
    table, masks = jax.device_put((idx, mask))
    return (epoch, start), table, masks


def calls(step: int, n: int, per_call: int, every: Sequence[int]) -> list[int]:
    """Lengths of the compiled calls that run ``n`` steps from global step ``step``: at most
    ``per_call`` each, and a call ends at every multiple of each of ``every`` (the steps at
    which callbacks log or checkpoint), so those happen at exactly the same steps for any
    ``per_call``."""
    out = []
    while n > 0:
        k = min(n, per_call)
        for e in every:
            k = min(k, e - step % e)
        out.append(k)
        step += k
        n -= k
    return out

