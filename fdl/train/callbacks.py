"""Callbacks: one protocol for everything that watches or steers a training run.

A :class:`Callback` gets the :class:`~fdl.train.Trainer` (``params``, ``state``,
``opt_state``, ``key``, ``step``, ``epoch``, ``history``, ``epoch_sums``, ``stop``) at these
points:

- ``on_train_begin(trainer)`` / ``on_train_end(trainer)`` (the latter also after an error);
- ``on_epoch_begin(trainer)``: it may replace ``trainer.state`` (e.g. reset a recurrent carry);
- ``on_steps_end(trainer, metrics, n)``: after each compiled call of ``n`` steps, with the
  last step's metric sums (device arrays); ``trainer.step`` is the global step count;
- ``on_epoch_end(trainer, row)``: ``row`` is the epoch's history record; add entries to it
  (they land in the history, the log and the printed line when the callback comes before those
  in the list) or set ``trainer.stop = True`` to end training.

Scheduling hints (fit's device loop runs many steps per call): ``every_steps`` (calls end at
its multiples: the callback sees exactly those steps), ``steps_per_call(steps_per_epoch)`` (a
preferred maximum call length) and ``needs_state_at_epoch_end(epoch)``: ``False`` lets the
trainer finish an epoch's record after the next epoch's first call is dispatched (when the
callback reads no params at epoch end), so the device does not idle while the host prints.

Built-ins: :class:`ProgressBar`, :class:`PrintEpochs`, :class:`JsonLog`, :class:`PlotCurves`,
:class:`Checkpoint`, :class:`EarlyStopping`, :class:`EvalHook`, :class:`ResetState`,
:class:`StepCallback`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from fdl.train import checkpoint as ckpt
from fdl.train.history import History, format_row
from fdl.train.plots import plot_history

__all__ = [
    "Callback", "ProgressBar", "PrintEpochs", "JsonLog", "PlotCurves", "Checkpoint",
    "EarlyStopping", "EvalHook", "ResetState", "StepCallback", "restore",
]


class Callback:
    """Base class: every hook does nothing (see the module docstring)."""

    every_steps: int | None = None

    def on_train_begin(self, trainer) -> None: ...

    def on_epoch_begin(self, trainer) -> None: ...

    def on_steps_end(self, trainer, metrics, n: int) -> None: ...

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer) -> None: ...

    def steps_per_call(self, steps_per_epoch: int | None) -> int | None:
        return None

    def needs_state_at_epoch_end(self, epoch: int) -> bool:
        return True  # safe default: a callback may read trainer.params at epoch end


class ProgressBar(Callback):
    """A tqdm bar per epoch on ``file`` (stderr), with the running train loss/accuracy every
    ``log_every`` steps; nothing when ``file`` is not a terminal or tqdm is not installed."""

    def __init__(self, log_every: int = 50, file=None):
        self.every_steps = log_every
        self.file = file or sys.stderr
        self.bar, self.bar_epoch = None, None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        isatty = getattr(self.file, "isatty", None)
        self.tqdm = tqdm if isatty is not None and isatty() else None

    def steps_per_call(self, steps_per_epoch):
        return None if self.tqdm is None else max(1, (steps_per_epoch or 20) // 20)

    def needs_state_at_epoch_end(self, epoch):
        return False

    def on_steps_end(self, trainer, metrics, n):
        if self.tqdm is None:
            return
        if self.bar_epoch != trainer.epoch:
            self._close()
            try:
                total = len(trainer.data)
            except TypeError:
                total = None
            self.bar = self.tqdm(total=total, initial=trainer.batch - n, leave=False,
                                 desc=f"epoch {trainer.epoch + 1}/{trainer.epochs}",
                                 file=self.file, dynamic_ncols=True)
            self.bar_epoch = trainer.epoch
        self.bar.update(n)
        if trainer.step % self.every_steps == 0:
            s = trainer.summarize(trainer.epoch_sums, "")
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in s.items() if k in ("loss", "acc")})

    def on_epoch_end(self, trainer, row):
        if self.bar_epoch == row["epoch"] - 1:
            self._close()

    def on_train_end(self, trainer):
        self._close()

    def _close(self):
        if self.bar is not None:
            self.bar.close()
        self.bar, self.bar_epoch = None, None


class PrintEpochs(Callback):
    """One line per epoch (:func:`~fdl.train.history.format_row`) through ``print_fn``."""

    def __init__(self, print_fn: Callable[[str], None] = print):
        self.print_fn = print_fn

    def needs_state_at_epoch_end(self, epoch):
        return False

    def on_epoch_end(self, trainer, row):
        self.print_fn(format_row(row))


class JsonLog(Callback):
    """Append JSON lines to ``path``: ``{"type": "step", ...}`` with the epoch's running train
    metrics every ``log_every`` steps, ``{"type": "epoch", ...row}`` after each epoch."""

    def __init__(self, path: str, log_every: int = 50):
        self.path, self.every_steps, self.fh = path, log_every, None

    def needs_state_at_epoch_end(self, epoch):
        return False

    def on_train_begin(self, trainer):
        self.fh = open(self.path, "a")  # noqa: SIM115 - closed in on_train_end

    def _write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def on_steps_end(self, trainer, metrics, n):
        if trainer.step % self.every_steps == 0:
            self._write({"type": "step", "step": trainer.step, "epoch": trainer.epoch + 1,
                         **trainer.summarize(trainer.epoch_sums, "train_")})

    def on_epoch_end(self, trainer, row):
        self._write({"type": "epoch", **row})

    def on_train_end(self, trainer):
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class PlotCurves(Callback):
    """Save the training curve (:func:`~fdl.train.plot_history`) to ``path`` after each
    epoch."""

    def __init__(self, path: str, title: str | None = None):
        self.path, self.title = path, title

    def needs_state_at_epoch_end(self, epoch):
        return False

    def on_epoch_end(self, trainer, row):
        plot_history(trainer.history, self.path, title=self.title)


class Checkpoint(Callback):
    """Save ``{params, state, opt_state, key, step, loader position, epoch metric sums}`` (and
    the history as metadata) to ``directory`` every ``every_epochs`` epochs and/or every
    ``every_steps`` steps, keeping the newest ``keep``; :meth:`restore` continues a run from
    one bitwise (see :mod:`fdl.train.loop`). ``last`` is the newest path written or
    restored."""

    def __init__(self, directory: str, *, every_epochs: int | None = 1,
                 every_steps: int | None = None, keep: int = 3,
                 metadata: dict[str, Any] | None = None):
        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise ValueError(f"Checkpoint: every_steps must be an integer >= 1 or None, got "
                             f"{every_steps!r}")
        self.manager = ckpt.CheckpointManager(directory, keep=keep)
        self.directory, self.every_epochs, self.every_steps = directory, every_epochs, every_steps
        self.metadata = metadata or {}
        self.last: str | None = None

    def _at_epoch_end(self, epoch: int) -> bool:
        return bool(self.every_epochs) and (epoch + 1) % self.every_epochs == 0

    def needs_state_at_epoch_end(self, epoch):
        return self._at_epoch_end(epoch)

    def save(self, trainer) -> str:
        tree = {"params": trainer.params, "state": trainer.state,
                "opt_state": trainer.opt_state, "key": trainer.key, "step": trainer.step,
                "loader": trainer.data.state()}
        fit_meta: dict[str, Any] = {"history": trainer.history.to_json()}
        if trainer.epoch_sums is not None:
            tree["epoch_sums"] = trainer.epoch_sums
            fit_meta["epoch_sums"] = sorted(trainer.epoch_sums)
        self.last = self.manager.save(trainer.step, tree, {**self.metadata, "fdl_fit": fit_meta})
        return self.last

    def on_steps_end(self, trainer, metrics, n):
        if self.every_steps and trainer.step % self.every_steps == 0:
            self.save(trainer)

    def on_epoch_end(self, trainer, row):
        if self._at_epoch_end(row["epoch"] - 1):
            self.save(trainer)

    def latest(self, on_skip: Callable[[str, str], None] | None = None) -> str | None:
        """The newest checkpoint in ``directory`` that verifies (newer corrupt ones reported
        with ``on_skip(path, reason)``, default a warning)."""
        return self.manager.latest_valid(on_skip)

    def restore(self, trainer, path: str) -> None:
        """:func:`restore` ``path`` into ``trainer``; it becomes ``last``."""
        restore(trainer, path)
        self.last = path


def restore(trainer, path: str) -> None:
    """Load a checkpoint written by :class:`Checkpoint` into ``trainer``: params, state,
    optimizer state, key, step, data position, the epoch's metric sums and the history."""
    template = {"params": trainer.params, "state": trainer.state,
                "opt_state": trainer.opt_state, "key": trainer.key, "step": 0,
                "loader": {"epoch": 0, "batch": 0}}
    meta = ckpt.load_metadata(path).get("fdl_fit", {})
    if "epoch_sums" in meta:  # local zeros, uncommitted (placed like the step's metrics)
        template["epoch_sums"] = {k: jnp.zeros((), jnp.float32) for k in meta["epoch_sums"]}
    tree = ckpt.load(path, template)
    trainer.params, trainer.state = tree["params"], tree["state"]
    trainer.opt_state, trainer.step = tree["opt_state"], int(tree["step"])
    trainer.set_key(tree["key"])
    trainer.data.set_state(tree["loader"])
    trainer.epoch_sums = tree.get("epoch_sums")
    trainer.history = History.from_json(meta.get("history", "[]"))


@dataclasses.dataclass
class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    ``mode="min"`` for losses, ``"max"`` for accuracies; ``restore_best`` returns the params and
    state of the best epoch instead of the last."""

    monitor: str = "test_loss"
    patience: int = 5
    mode: str = "min"
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {self.mode!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"EarlyStopping: patience must be an integer >= 1, got "
                             f"{self.patience!r}")
        self.on_train_begin(None)

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def on_train_begin(self, trainer):
        self.best, self.best_tree, self.bad_epochs, self.stopped = None, None, 0, False

    def on_epoch_end(self, trainer, row):
        value = row.get(self.monitor)
        if value is None:
            raise ValueError(f"EarlyStopping: monitor {self.monitor!r} not in the epoch record; "
                             f"available: {sorted(row)}")
        if self.improved(value, self.best):
            self.best, self.bad_epochs = value, 0
            if self.restore_best:
                self.best_tree = trainer.copy((trainer.params, trainer.state))
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            trainer.say(f"early stopping: {self.monitor} has not improved for "
                        f"{self.bad_epochs} epochs (best {self.best:.4f})")
            self.stopped = trainer.stop = True

    def on_train_end(self, trainer):
        if self.stopped and self.best_tree is not None:
            trainer.params, trainer.state = self.best_tree


class EvalHook(Callback):
    """Add ``fn(params, state)`` (a number, or a dict of them) to the epoch's record as
    ``name`` every ``every`` epochs: host-side evaluation such as BLEU of decoded held-out
    sentences. Put it before the output callbacks so its value is logged and printed."""

    def __init__(self, name: str, fn: Callable[[Any, Any], Any], every: int = 1):
        self.name, self.fn, self.every = name, fn, every

    def on_epoch_end(self, trainer, row):
        if row["epoch"] % self.every == 0:
            value = self.fn(trainer.params, trainer.state)
            if isinstance(value, dict):
                row.update({f"{self.name}_{k}": float(v) for k, v in value.items()})
            else:
                row[self.name] = float(value)


class ResetState(Callback):
    """Reset the state at the start of every epoch and for every evaluation (the book's fresh
    recurrent state per epoch with the sequential sampler): ``paths`` are state paths zeroed
    with ``fdl.nn.reset_state``, or a function ``state -> state``."""

    def __init__(self, paths: str | Sequence[str] | Callable[[Any], Any]):
        self.paths = paths

    def needs_state_at_epoch_end(self, epoch):
        return False

    def reset(self, state):
        if callable(self.paths):
            return self.paths(state)
        from fdl.nn import reset_state

        return reset_state(state, self.paths)

    def on_epoch_begin(self, trainer):
        trainer.state = self.reset(trainer.state)


class StepCallback(Callback):
    """``fn(step, metrics)`` after every call (one step per call unless ``steps_per_call`` is
    set); raising ``StopIteration`` ends training."""

    def __init__(self, fn: Callable[[int, Any], None]):
        self.fn = fn

    def steps_per_call(self, steps_per_epoch):
        return 1

    def needs_state_at_epoch_end(self, epoch):
        return False

    def on_steps_end(self, trainer, metrics, n):
        try:
            self.fn(trainer.step, metrics)
        except StopIteration:
            trainer.stop = True

