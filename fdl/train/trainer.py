"""The epoch loop: :class:`Trainer` runs a training step over a data source for some epochs,
evaluates after each, keeps the history and calls the callbacks (:mod:`fdl.train.callbacks`).

Metrics stay on the device and are summed there; the host fetches them once per epoch (and
when a callback asks, e.g. a progress bar every ``log_every`` steps), so dispatch runs ahead of
the computation. With a :class:`~fdl.train.TrainStep` whose pure function is known and data
that can stay on the device, runs of steps are single compiled calls
(:mod:`fdl.train.device_loop`); a call ends at every step where a callback acts
(``every_steps``), so the numbers never depend on the call length. Other steps (data-parallel
ones, your own functions) get host batches, one call per step.

Step ``s`` uses the key ``fold_in(key, s)`` and the data order is a pure function of (data key,
epoch), so a run restored from a checkpoint computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdl.train.callbacks import Callback
from fdl.train.device_loop import (
    accumulate,
    calls,
    device_steps,
    epoch_table,
    evaluate_sums,
    host_steps,
)
from fdl.train.history import History
from fdl.train.metrics import summarize
from fdl.train.step import EvalStep, TrainStep

__all__ = ["Trainer", "prepare", "copy_arrays"]


@jax.jit
def _copy_leaves(leaves):
    return [jnp.copy(x) for x in leaves]


def copy_arrays(tree):
    """Fresh buffers for every array of ``tree`` (one dispatch), so donation never
    invalidates the caller's arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    for i, c in zip(idx, _copy_leaves([leaves[i] for i in idx]), strict=True):
        leaves[i] = c
    return jax.tree.unflatten(treedef, leaves)


@functools.lru_cache(maxsize=64)
def _jitted_prepare(init_fn):
    return jax.jit(lambda p, s: (jax.tree.map(jnp.copy, p), jax.tree.map(jnp.copy, s),
                                 init_fn(p)))


def prepare(optimizer, params, state, opt_state=None):
    """Fresh copies of ``params``, ``state`` and ``opt_state`` (default
    ``optimizer.init(params)``), in one compiled call where possible."""
    if opt_state is not None:
        return copy_arrays((params, state, opt_state))
    if all(isinstance(x, jax.Array) for x in jax.tree.leaves((params, state))):
        try:
            return _jitted_prepare(optimizer.init)(params, state)
        except TypeError:  # an unhashable init: below
            pass
    params, state = copy_arrays((params, state))
    return params, state, optimizer.init(params)


def _current_lr(opt_state):
    try:
        from fdl.optim import current_lr

        return current_lr(opt_state)
    except (ValueError, ImportError, TypeError):
        return None


@dataclasses.dataclass
class _EpochRecord:
    """What an epoch's row is made of, on the device until the trainer fetches it."""

    epoch: int
    step: int  # the global step count at the end of the epoch
    first: int  # the batch the epoch started at (> 0 when resumed mid-epoch)
    seen: int  # batches run in this call
    t0: float  # perf_counter when the epoch's steps were dispatched
    sums: Any  # the train metric sums (device) or None
    eval_sums: Any  # the evaluation metric sums (device) or None
    lr: Any  # the learning rate at the end of the epoch (device scalar, float or None)


class Trainer:
    """Train ``train_step`` on ``data`` (an ``ArrayLoader`` or :class:`~fdl.train.data.
    IterableBatches`, which also hold the position), evaluating ``eval_step`` on ``eval_data``
    after each epoch; see the module docstring.

    ``params``/``state``/``opt_state`` are donated to the step (pass copies:
    :func:`prepare`); the trained values are the attributes of the same names. ``run(epochs)``
    trains up to epoch ``epochs`` from the data's position and returns the trainer.
    ``eval_state(state)`` gives the state evaluation starts from (default: ``state``).
    ``steps_per_call`` caps the steps per compiled call (default: the callbacks' preference,
    else a whole epoch). ``say`` prints messages (early stopping), default silent.
    """

    def __init__(self, train_step: Callable, data, params, state, opt_state, key, *,
                 eval_step: Callable | None = None, eval_data=None,
                 eval_state: Callable | None = None, callbacks: Sequence[Callback] = (),
                 steps_per_call: int | None = None, say: Callable[[str], None] | None = None,
                 data_key_from: Callable | None = None):
        self.train_step = TrainStep.of(train_step)
        self.eval_step = None if eval_step is None else EvalStep.of(eval_step)
        self.data, self.eval_data, self.eval_state = data, eval_data, eval_state
        self.params, self.state, self.opt_state, self.key = params, state, opt_state, key
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fdl.train.Callback instances (subclass it "
                                f"and override the hooks you need), got {cb!r}")
        self.steps_per_call_cap = steps_per_call
        self.say = say or (lambda *_: None)
        self._data_key_from = data_key_from
        self.step, self.epochs, self.stop = 0, 0, False
        self.history = History()
        self.epoch_sums = None
        on_device = getattr(data, "indexable_on_device", False)
        self._device = device_steps(self.train_step) if on_device else None
        self._counter = None  # the device copy of ``step`` the compiled calls return
        self._ahead = None  # the next epoch's index table, moved to the device early
        self._pending: _EpochRecord | None = None  # an epoch whose row is finished late
        self._last_done = 0.0

    # ------------------------------------------------------------------ accessors
    @property
    def epoch(self) -> int:
        """The epoch being trained (the data's position)."""
        return self.data.epoch

    @property
    def batch(self) -> int:
        """The next batch of the current epoch (the data's position)."""
        return self.data.batch

    def set_key(self, key) -> None:
        """Use ``key`` for the steps (and, for data fit built, the shuffling derived from it)."""
        self.key = key
        self._counter = None
        if self._data_key_from is not None:
            self.data.key = self._data_key_from(key)

    def summarize(self, sums, prefix: str = "train_") -> dict[str, float]:
        """Host means of train metric sums (see :func:`~fdl.train.summarize`)."""
        return summarize(sums, prefix, perplexity=self.train_step.perplexity)

    @staticmethod
    def copy(tree):
        """Fresh device buffers of ``tree`` (they survive the next step's donation)."""
        return copy_arrays(tree)

    # ------------------------------------------------------------------ the loop
    def run(self, epochs: int) -> Trainer:
        """Train until the data's position reaches epoch ``epochs`` or a callback stops."""
        self.epochs, self.stop = epochs, False
        for cb in self.callbacks:
            cb.on_train_begin(self)
        try:
            while self.data.epoch < epochs and not self.stop:
                rec = self._train_epoch()
                if rec is None:  # stopped mid-epoch
                    break
                if self._lag(rec.epoch):
                    self._pending = rec
                else:
                    self._finish(rec)
            if self._pending is not None:  # stopped before the next epoch's first step
                rec, self._pending = self._pending, None
                self._finish(rec)
        finally:
            for cb in self.callbacks:
                cb.on_train_end(self)
        return self

    def _lag(self, epoch: int) -> bool:
        """Whether the epoch's row can be finished after the next epoch's first call."""
        return epoch + 1 < self.epochs and not any(
            cb.needs_state_at_epoch_end(epoch) for cb in self.callbacks)

    def _steps_per_call(self) -> tuple[int, list[int]]:
        """``(steps per call, steps at whose multiples a call ends)``."""
        try:
            nb = len(self.data)
        except TypeError:
            nb = None
        wanted = [cb.steps_per_call(nb) for cb in self.callbacks]
        wanted = [w for w in wanted if w is not None]
        per_call = self.steps_per_call_cap or min(wanted, default=nb or 1)
        cuts = [cb.every_steps for cb in self.callbacks if cb.every_steps]
        return per_call, cuts

    def _train_epoch(self) -> _EpochRecord | None:
        epoch, first = self.data.epoch, self.data.batch
        if first == 0:
            self.epoch_sums = None
        for cb in self.callbacks:
            cb.on_epoch_begin(self)
        t0 = time.perf_counter()
        run = self._device_epoch if self._device is not None else self._host_epoch
        seen = run(epoch, first)
        if self.stop:
            return None
        self.data.epoch, self.data.batch = epoch + 1, 0
        rec = self._record(epoch, first, seen, t0)
        self.epoch_sums = None
        return rec

    def _after_call(self, metrics, n: int) -> None:
        if self._pending is not None:
            rec, self._pending = self._pending, None
            self._finish(rec)
        for cb in self.callbacks:
            cb.on_steps_end(self, metrics, n)

    def _device_epoch(self, epoch: int, first: int) -> int:
        """The epoch's steps from batch ``first``, in compiled calls (``device_loop``)."""
        run, data, nb = self._device, self.data, len(self.data)
        if self._ahead is None or self._ahead[0] != (epoch, first):
            self._ahead = epoch_table(data, epoch, first)
        (_, table, masks), self._ahead = self._ahead, None
        if self._counter is None:
            self._counter = np.uint32(self.step)
        sums = self.epoch_sums
        if sums is None and first < nb:
            sums = run.zeros(self.params, self.state, self.opt_state, self.key, data)
        per_call, cuts = self._steps_per_call()
        lo = seen = 0
        for n in calls(self.step, nb - first, per_call, cuts):
            self.params, self.state, self.opt_state, sums, metrics, self._counter = run(
                self.params, self.state, self.opt_state, sums, self._counter,
                data.device_arrays(), table, masks, np.int32(lo), np.int32(n), self.key)
            lo, seen, self.step, data.batch = lo + n, seen + n, self.step + n, data.batch + n
            self.epoch_sums = sums
            self._after_call(metrics, n)
            if self.stop:
                return seen
        if epoch + 1 < self.epochs:  # before the epoch's fetch waits for its steps
            self._ahead = epoch_table(data, epoch + 1, 0)
        return seen

    def _host_step(self, batch):
        """One step on a host batch: one compiled call with the key and the metric sum when
        the step's pure function is known (``HostSteps``), else the step, ``fold_in`` and a
        jitted sum."""
        run = host_steps(self.train_step)
        if run is not None:
            if self._counter is None:
                self._counter = np.uint32(self.step)
            (self.params, self.state, self.opt_state, self.epoch_sums, metrics,
             self._counter) = run(self.params, self.state, self.opt_state, self.epoch_sums,
                                  self._counter, batch, self.key)
            return metrics
        self.params, self.state, self.opt_state, metrics = self.train_step(
            self.params, self.state, self.opt_state, batch,
            jax.random.fold_in(self.key, self.step))
        self.epoch_sums = (metrics if self.epoch_sums is None
                           else accumulate(self.epoch_sums, metrics))
        return metrics

    def _host_epoch(self, epoch: int, first: int) -> int:
        """The epoch's steps from batch ``first``, one compiled call per host batch."""
        seen = 0
        for batch in self.data.epoch_batches(epoch, first):
            metrics = self._host_step(batch)
            self.step, seen, self.data.batch = self.step + 1, seen + 1, self.data.batch + 1
            self._after_call(metrics, 1)
            if self.stop:
                break
        return seen

    def _record(self, epoch: int, first: int, seen: int, t0: float) -> _EpochRecord:
        """Dispatch what the epoch's row needs from the device (evaluation, learning rate)
        without waiting for it."""
        eval_sums = None
        if self.eval_step is not None and self.eval_data is not None:
            state = self.state if self.eval_state is None else self.eval_state(self.state)
            eval_sums = evaluate_sums(self.params, state, self.eval_data, self.eval_step)
        lr = _current_lr(self.opt_state)
        if self._lag(epoch) and isinstance(lr, jax.Array):
            lr = jnp.copy(lr)  # the next step donates opt_state
        return _EpochRecord(epoch, self.step, first, seen, t0, self.epoch_sums, eval_sums, lr)

    def _finish(self, rec: _EpochRecord) -> None:
        """Fetch the epoch's metrics, append its row to the history, run the callbacks."""
        row: dict[str, Any] = {"epoch": rec.epoch + 1, "step": rec.step}
        host_sums = lr = None
        if rec.sums is not None:  # one fetch: waits for the epoch's steps
            host_sums, lr = jax.device_get((rec.sums, rec.lr))
        t_done = time.perf_counter()
        t0 = max(rec.t0, self._last_done)  # a lagged epoch's steps start when the last end
        self._last_done = t_done
        if host_sums is not None:
            row.update(self.summarize(host_sums))
        if rec.eval_sums is not None:
            row.update(summarize(rec.eval_sums, "test_", perplexity=self.eval_step.perplexity))
        if rec.seen and host_sums is not None and rec.first == 0:
            row["examples_per_sec"] = float(host_sums["count"]) / max(t_done - t0, 1e-9)
        row["time"] = time.perf_counter() - t0
        if lr is None and rec.lr is not None:
            lr = jax.device_get(rec.lr)
        if lr is not None:
            row["lr"] = float(lr)
        row = self.history.append(row)
        for cb in self.callbacks:
            cb.on_epoch_end(self, row)
