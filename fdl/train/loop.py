"""The ``fit`` loop: epochs, evaluation, metrics, progress, history, plots, checkpoints, resume.

``fit`` drives a jitted ``train_step`` (built by :func:`~fdl.train.make_train_step` unless you
pass one) over an :class:`~fdl.data.ArrayLoader`. Metrics stay on the device and are summed on
the device; they are fetched only every ``log_every`` steps and at the end of an epoch, so
dispatch runs ahead of the computation.

No host work per batch: when the step comes from ``make_train_step`` (single device) and the
loader can keep its data on the device (``ArrayLoader.indexable_on_device``: the default for
datasets up to 1 GiB), the dataset is transferred once and a whole run of steps is one compiled
call (a loop on the device): each step gathers its batch from the device-resident data by the
epoch's index table, trains with the key ``fold_in(key, step)`` and adds its metrics to the
epoch's sums. By default a call runs the whole epoch; with a progress bar, about a twentieth of
it; with a ``callback``, one step (``steps_per_call`` overrides this). A call always ends at the
steps where fit logs or checkpoints, and every call length runs the same executable, so the
numbers do not depend on the call length (bitwise on CPU). Evaluation (``eval_data``,
:func:`evaluate`) with a step from ``make_eval_step`` is likewise one call over the whole eval
set. Other steps (data-parallel ones, your own functions) get host batches from the loader, a
``fold_in`` and a jitted metric sum per step, as a Python loop would.

Resume: with ``checkpoint_dir`` set, fit saves ``{params, state, opt_state, key, step, loader
position, epoch metric sums}`` (and the history, as JSON metadata) every ``checkpoint_every``
epochs and/or ``checkpoint_every_steps`` steps. ``resume=True`` restores the newest checkpoint
and continues: every step uses the key ``fold_in(key, step)`` and the loader's order is a pure
function of ``(data key, epoch)``, so a resumed run computes exactly what an uninterrupted run
computes (bitwise on CPU).

Ctrl-C: the loop stops between steps (between calls on the device path), leaves the newest
checkpoint as it was (checkpoint writes are atomic) and prints how to resume, then re-raises
``KeyboardInterrupt``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdl.data.loader import ArrayLoader
from fdl.nn.core import Layer
from fdl.train import checkpoint as ckpt
from fdl.train.metrics import summarize
from fdl.train.step import make_eval_step, make_train_step

__all__ = ["fit", "evaluate", "History", "EarlyStopping", "FitResult", "plot_history"]


@dataclasses.dataclass
class History:
    """Per-epoch records: ``history.rows`` is a list of dicts (``epoch``, ``step``,
    ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``examples_per_sec``, ``time``,
    ``lr`` ... whichever apply); ``history["test_acc"]`` is that column as a list."""

    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))

    def __getitem__(self, name: str) -> list[Any]:
        return [r.get(name) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    def to_json(self) -> str:
        return json.dumps(self.rows)

    @classmethod
    def from_json(cls, text: str) -> History:
        return cls(list(json.loads(text)))


@dataclasses.dataclass
class EarlyStopping:
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

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the trained ``params``, ``state``, ``opt_state``, the
    :class:`History`, the number of ``steps`` run in total and the last checkpoint path."""

    params: Any
    state: Any
    opt_state: Any
    history: History
    steps: int
    checkpoint: str | None = None
    stopped_early: bool = False


def _as_loader(data, batch_size, key, shuffle, name) -> ArrayLoader:
    if isinstance(data, ArrayLoader):
        return data
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        if batch_size is None:
            raise ValueError(f"fit: {name} is a tuple of arrays; pass batch_size=")
        if not shuffle:  # evaluation: a smaller set than one batch is fine
            batch_size = min(batch_size, len(data[0]))
        return ArrayLoader(tuple(data), batch_size, key=key if shuffle else None,
                           last_batch="pad")
    raise TypeError(f"fit: {name} must be an ArrayLoader or a tuple (x, y), got "
                    f"{type(data).__name__}")


@jax.jit
def _accumulate(acc, metrics):
    return jax.tree.map(jnp.add, acc, metrics)


def _zeros_like_metrics(metrics_shape) -> dict:
    return {k: jnp.zeros((), jnp.float32) for k in metrics_shape}


def _table_batch(data, table, masks, i):
    """Batch ``i`` of an index table (traced): row ``table[i]`` of every array of ``data``,
    with ``masks[i]`` appended when ``masks`` is not ``None``."""
    rows = lax.dynamic_index_in_dim(table, i, keepdims=False)
    # rows of a 2-D view, in bounds by construction (the loader's index table): a plain row
    # copy, without the clamping of ``a[rows]``
    batch = tuple(a.reshape(a.shape[0], -1).at[rows].get(mode="promise_in_bounds")
                  .reshape((rows.shape[0], *a.shape[1:])) for a in data)
    if masks is not None:
        batch = (*batch, lax.dynamic_index_in_dim(masks, i, keepdims=False))
    return batch


def _cached_loop(step, fn_attr: str, cache_attr: str, build):
    """``(build(pure_fn, step), zeros_cache)``, cached on ``step`` as ``cache_attr``; ``None``
    when ``step`` does not expose its pure function as ``fn_attr``."""
    fn = getattr(step, fn_attr, None)
    if fn is None:
        return None
    cached = getattr(step, cache_attr, None)
    if cached is None:
        cached = (build(fn, step), {})
        try:
            setattr(step, cache_attr, cached)
        except AttributeError:
            pass
    return cached


def _device_steps(train_step):
    """``(run, zeros_cache)``: ``train_step``'s pure function looped on the device, cached on
    ``train_step``; ``None`` for a step that does not expose its pure function
    (``make_train_step(..., jit=True)`` does).

    ``run(params, state, opt_state, sums, step, data, table, masks, lo, n, key)`` runs the
    ``n`` steps ``lo, lo+1, ...`` of an epoch in one compiled call: step ``i`` gathers its
    batch, row ``table[i]`` (``(batches, batch)`` int32) of every array of the
    device-resident ``data`` (with ``masks[i]`` appended when ``masks`` is not ``None``),
    trains on it with the key ``fold_in(key, step)`` and adds its metrics to ``sums``. It
    returns ``(params, state, opt_state, sums, last_metrics, step + n)``.

    ``lo`` and ``n`` are traced (a ``while`` loop with a run-time trip count), so one
    executable serves every chunk length: a call of 1 step and a call of a whole epoch compute
    bitwise the same steps, and resuming mid-epoch compiles nothing new.

    One call per epoch rather than one per step: on the 2-core machine the LeNet/digits epoch
    (7 steps) took 0.94-0.95 of the bare Python loop over the same compiled step with
    pre-gathered batches, against 1.03 for one call per step with the gather inside and
    1.04-1.06 for the former one-gather-call-per-epoch design (2026-11-30, 25 interleaved
    rounds of 5; the per-step gather inside the loop also beat gathering the epoch in one
    copy first)."""
    return _cached_loop(train_step, "fdl_step_fn", "_fdl_device_steps", _steps_loop)


def _steps_loop(fn, jitted_step):
    def run(params, state, opt_state, sums, step, data, table, masks, lo, n, key):
        def body(i, carry):
            params, state, opt_state, sums, _, step = carry
            batch = _table_batch(data, table, masks, i)
            params, state, opt_state, metrics = fn(params, state, opt_state, batch,
                                                   jax.random.fold_in(key, step))
            sums = jax.tree.map(jnp.add, sums, metrics)
            return params, state, opt_state, sums, metrics, step + 1

        carry = (params, state, opt_state, sums, sums, step)
        return lax.fori_loop(lo, lo + n, body, carry)

    donate = (0, 1, 2) if getattr(jitted_step, "fdl_donate", True) else ()
    return jax.jit(run, donate_argnums=donate)


def _epoch_table(loader: ArrayLoader, epoch: int, start: int):
    """``((epoch, start), table, masks)``: the loader's index table for batches ``start, ...``
    of ``epoch`` (and its pad masks or ``None``), on the device."""
    idx, mask = loader.index_table(epoch, start)
    table, masks = jax.device_put((idx, mask))
    return (epoch, start), table, masks


def _calls(step: int, n: int, per_call: int, every: Sequence[int]) -> list[int]:
    """Lengths of the compiled calls that run ``n`` steps from global step ``step``: at most
    ``per_call`` each, and a call ends at every multiple of each of ``every`` (the steps at
    which fit logs or checkpoints), so those happen at exactly the same steps for any
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


def _metric_zeros(train_step, zeros_cache, params, state, opt_state, key, loader):
    """Zero sums with the structure of ``train_step``'s metrics (device arrays, cached per
    batch signature; never donated, so they can be reused)."""
    sig = (loader.batch_size, loader.last_batch == "pad",
           tuple((a.shape[1:], a.dtype.str) for a in loader.arrays))
    zeros = zeros_cache.get(sig)
    if zeros is None:
        bs = loader.batch_size
        batch = tuple(jax.ShapeDtypeStruct((bs, *a.shape[1:]), a.dtype) for a in loader.arrays)
        if sig[1]:
            batch = (*batch, jax.ShapeDtypeStruct((bs,), jnp.float32))
        shapes = jax.eval_shape(train_step.fdl_step_fn, params, state, opt_state, batch, key)[3]
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        zeros_cache[sig] = zeros
    return zeros


def _device_eval(eval_step):
    """``run(params, state, data, table, masks, zeros)``: the sum of ``eval_step``'s metrics
    over every batch of an index table, in one compiled call (a loop on the device; the sums
    start from ``zeros``), cached on ``eval_step``; ``None`` for a step that does not expose
    its pure function (``make_eval_step(..., jit=True)`` does). The sums are bitwise those of
    adding the batches' metrics one call at a time (``0 + x == x``). For 10,000 examples of
    LeNet in batches of 256: 111 vs 157 ms per evaluation (2026-11-30)."""
    return _cached_loop(eval_step, "fdl_eval_fn", "_fdl_device_eval", _eval_loop)


def _eval_loop(fn, _jitted_step):
    def run(params, state, data, table, masks, zeros):
        def body(i, sums):
            metrics = fn(params, state, _table_batch(data, table, masks, i))
            return jax.tree.map(jnp.add, sums, metrics)

        return lax.fori_loop(0, table.shape[0], body, zeros)

    return jax.jit(run)


def _evaluate_sums(params, state, loader: ArrayLoader, eval_step):
    """The summed metrics of ``eval_step`` over ``loader`` (device arrays, not waited for):
    one compiled call when the loader's data can stay on the device, else one per batch."""
    device_eval = _device_eval(eval_step) if loader.indexable_on_device else None
    if device_eval is not None and len(loader):
        run, zeros_cache = device_eval
        table, masks = jax.device_put(loader.index_table(0))
        sig = (table.shape, masks is not None, jax.tree.structure((params, state)),
               tuple((a.shape[1:], a.dtype.str) for a in loader.arrays))
        zeros = zeros_cache.get(sig)
        if zeros is None:
            batch = jax.eval_shape(lambda d, t, m: _table_batch(d, t, m, 0),
                                   loader.device_arrays(), table, masks)
            shapes = jax.eval_shape(eval_step.fdl_eval_fn, params, state, batch)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            zeros_cache[sig] = zeros
        return run(params, state, loader.device_arrays(), table, masks, zeros)
    acc = None
    for batch in loader.epoch_batches(0):
        m = eval_step(params, state, batch)
        acc = m if acc is None else _accumulate(acc, m)
    return acc


def evaluate(
    params, state, data, *, model: Layer | Callable | None = None, eval_step=None,
    loss: str | Callable = "cross_entropy", batch_size: int = 256, top_k: Sequence[int] = (),
) -> dict[str, float]:
    """Mean loss / accuracy / top-k / perplexity of ``model`` over ``data`` (``ArrayLoader``
    or ``(x, y)``), in evaluation mode."""
    if eval_step is None:
        if model is None:
            raise ValueError("evaluate: pass model= or eval_step=")
        eval_step = make_eval_step(model, loss, top_k=top_k)
    if isinstance(data, (tuple, list)):
        data = ArrayLoader(tuple(data), min(batch_size, len(data[0])), last_batch="pad")
    return summarize(_evaluate_sums(params, state, data, eval_step))


@dataclasses.dataclass
class _EpochRecord:
    """What an epoch's row is made of, on the device until :func:`fit` fetches it."""

    epoch: int
    step: int  # the global step count at the end of the epoch
    first: int  # the batch the epoch started at (> 0 when resumed mid-epoch)
    seen: int  # batches run in this call
    t0: float  # perf_counter when the epoch's steps were dispatched
    sums: Any  # the train metric sums (device) or None
    eval_sums: Any  # the evaluation metric sums (device) or None
    lr: Any  # the learning rate at the end of the epoch (device scalar, float or None)


@jax.jit
def _copy_arrays(tree):
    return jax.tree.map(jnp.copy, tree)


def _copy(tree):
    """Fresh buffers for every array of ``tree`` (one dispatch), so donation inside ``fit``
    never invalidates the caller's arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    copied = _copy_arrays([leaves[i] for i in idx])
    for i, c in zip(idx, copied, strict=True):
        leaves[i] = c
    return jax.tree.unflatten(treedef, leaves)


@functools.lru_cache(maxsize=64)
def _jitted_init(init_fn):
    return jax.jit(init_fn)


def _fresh_copies(init_fn, params, state):
    """``(params, state, init_fn(params))`` with params and state in fresh buffers (traced)."""
    return jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state), init_fn(params)


@functools.lru_cache(maxsize=64)
def _jitted_prepare(init_fn):
    return jax.jit(functools.partial(_fresh_copies, init_fn))


def _prepare(optimizer, params, state, opt_state):
    """Fresh copies of ``params``, ``state`` (and ``opt_state``, or ``optimizer.init(params)``)
    in one compiled call where possible."""
    if opt_state is not None:
        return _copy((params, state, opt_state))
    if all(isinstance(x, jax.Array) for x in jax.tree.leaves((params, state))):
        try:
            return _jitted_prepare(optimizer.init)(params, state)
        except TypeError:  # unhashable init: below
            pass
    params, state = _copy((params, state))
    return params, state, _opt_init(optimizer, params)


def _opt_init(optimizer, params):
    """``optimizer.init(params)`` as one compiled call (cached per optimizer)."""
    try:
        return _jitted_init(optimizer.init)(params)
    except TypeError:  # unhashable init or non-array params: plain call
        return optimizer.init(params)


def _current_lr(opt_state):
    try:
        from fdl.optim import current_lr

        return current_lr(opt_state)
    except (ValueError, ImportError, TypeError):
        return None


def _fmt(row: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}"]
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "test_perplexity"):
        if k == "test_perplexity" and "test_acc" in row:
            continue
        if k in row and row[k] is not None:
            parts.append(f"{k.replace('_', ' ')} {row[k]:.4f}")
    if "examples_per_sec" in row:
        parts.append(f"{row['examples_per_sec']:.1f} examples/s")
    if "time" in row:
        parts.append(f"{row['time']:.1f} s")
    return ", ".join(parts)


def fit(
    model: Layer | Callable,
    params,
    state,
    optimizer,
    train_data,
    *,
    epochs: int,
    key,
    eval_data=None,
    loss: str | Callable = "cross_entropy",
    batch_size: int | None = None,
    opt_state=None,
    top_k: Sequence[int] = (),
    train_step: Callable | None = None,
    eval_step: Callable | None = None,
    log_every: int = 50,
    progress: bool = True,
    print_fn: Callable[[str], None] | None = print,
    log_file: str | None = None,
    plot: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int | None = 1,
    checkpoint_every_steps: int | None = None,
    keep: int = 3,
    resume: bool | str = False,
    early_stopping: EarlyStopping | None = None,
    metadata: dict[str, Any] | None = None,
    callback: Callable[[int, dict], None] | None = None,
    resume_hint: str | None = None,
    steps_per_call: int | None = None,
) -> FitResult:
    """Train ``model`` for ``epochs`` epochs; evaluate on ``eval_data`` after each.

    Args:
      model, params, state: the layer (or apply function) and its initial params and state
        (copied; the originals stay valid).
      optimizer: an ``fdl.optim`` transformation; ``opt_state`` defaults to
        ``optimizer.init(params)``.
      train_data, eval_data: :class:`~fdl.data.ArrayLoader` or ``(x, y)`` tuples (then
        ``batch_size`` is required; training data are shuffled with a key derived from ``key``).
      epochs: total epochs (a resumed run continues up to this number; 0 is refused).
      key: PRNG key; step ``s`` uses ``fold_in(key, s)`` (dropout etc.).
      loss, top_k: as in :func:`~fdl.train.make_train_step`.
      train_step, eval_step: prebuilt steps (e.g. data-parallel ones from ``fdl.parallel``).
      log_every: fetch metrics (progress bar, ``log_file``) every this many steps.
      progress: show a tqdm progress bar (if tqdm is installed and ``print_fn`` is set).
      print_fn: one line per epoch (``None``: silent).
      log_file: append JSON lines (step records every ``log_every`` steps, one per epoch).
      plot: save the d2l "Animator" figure (train loss, train acc, test acc per epoch) here.
      checkpoint_dir, checkpoint_every, checkpoint_every_steps, keep: see module docstring.
      resume: ``True`` continues from the newest checkpoint in ``checkpoint_dir`` (starting
        fresh if there is none), or a checkpoint path.
      early_stopping: an :class:`EarlyStopping`.
      metadata: extra JSON stored in every checkpoint (e.g. the model name for ``fdl eval``).
      callback: ``callback(step, metrics)`` after every step with that step's metrics (device
        arrays); raising ``StopIteration`` ends training. With ``steps_per_call`` > 1 it runs
        after every call instead, with the metrics of the call's last step.
      resume_hint: the command printed after Ctrl-C (default: a Python hint).
      steps_per_call: at most this many steps per compiled call on the device path (see the
        module docstring); ``None`` chooses: the whole epoch, ``len(loader) // 20`` with a
        progress bar, 1 with a ``callback``. Ctrl-C and ``StopIteration`` act between calls.

    Returns a :class:`FitResult`.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"fit: epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"fit: log_every must be an integer >= 1, got {log_every!r}")
    if steps_per_call is not None and (not isinstance(steps_per_call, int)
                                       or isinstance(steps_per_call, bool) or steps_per_call < 1):
        raise ValueError(f"fit: steps_per_call must be an integer >= 1 or None, got "
                         f"{steps_per_call!r}")
    if checkpoint_every_steps is not None and checkpoint_every_steps < 1:
        raise ValueError("fit: checkpoint_every_steps must be >= 1 or None")
    if resume and checkpoint_dir is None and not isinstance(resume, str):
        raise ValueError("fit: resume=True needs checkpoint_dir=")
    say = print_fn or (lambda *_: None)

    own_loader = not isinstance(train_data, ArrayLoader)
    data_key = jax.random.fold_in(key, 0x5EED) if own_loader else None
    train_loader = _as_loader(train_data, batch_size, data_key, True, "train_data")
    eval_loader = None
    if eval_data is not None:
        eval_loader = _as_loader(eval_data, batch_size or train_loader.batch_size, None, False,
                                 "eval_data")
    if train_step is None:
        train_step = make_train_step(model, optimizer, loss, top_k=top_k)
    if eval_step is None and eval_loader is not None:
        eval_step = make_eval_step(model, loss, top_k=top_k)

    device_steps = _device_steps(train_step) if train_loader.indexable_on_device else None
    params, state, opt_state = _prepare(optimizer, params, state, opt_state)
    step = 0
    history = History()
    epoch_sums = None
    manager = ckpt.CheckpointManager(checkpoint_dir, keep=keep) if checkpoint_dir else None
    last_ckpt = None

    # ------------------------------------------------------------------ resume
    if resume:
        path = resume if isinstance(resume, str) else manager.latest()
        if path is None:
            say(f"no checkpoint in '{checkpoint_dir}'; starting from scratch")
        else:
            template = {"params": params, "state": state, "opt_state": opt_state, "key": key,
                        "step": 0, "loader": {"epoch": 0, "batch": 0}}
            meta = ckpt.load_metadata(path)
            if "epoch_sums" in meta.get("fdl_fit", {}):
                template["epoch_sums"] = _zeros_like_metrics(meta["fdl_fit"]["epoch_sums"])
            restored = ckpt.load(path, template)
            params, state, opt_state = (restored["params"], restored["state"],
                                        restored["opt_state"])
            key = restored["key"]
            if own_loader:
                train_loader.key = jax.random.fold_in(key, 0x5EED)
            step = restored["step"]
            train_loader.set_state(restored["loader"])
            epoch_sums = restored.get("epoch_sums")
            history = History.from_json(meta.get("fdl_fit", {}).get("history", "[]"))
            last_ckpt = path
            say(f"resumed from {path} (step {step}, epoch {train_loader.epoch + 1}, "
                f"batch {train_loader.batch})")

    def save_checkpoint() -> str | None:
        nonlocal last_ckpt
        if manager is None:
            return None
        tree = {"params": params, "state": state, "opt_state": opt_state, "key": key,
                "step": step, "loader": train_loader.state()}
        fit_meta: dict[str, Any] = {"history": history.to_json()}
        if epoch_sums is not None:
            tree["epoch_sums"] = epoch_sums
            fit_meta["epoch_sums"] = sorted(epoch_sums)
        last_ckpt = manager.save(step, tree, {**(metadata or {}), "fdl_fit": fit_meta})
        return last_ckpt

    log_fh = open(log_file, "a") if log_file else None  # noqa: SIM115

    def log(record: dict) -> None:
        if log_fh is not None:
            log_fh.write(json.dumps(record) + "\n")
            log_fh.flush()

    use_bar = progress and print_fn is not None
    tqdm = None
    if use_bar:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None

    def after_step(epoch, bar, metrics, n) -> None:
        if callback is not None:
            callback(step, metrics)
        if bar is not None:
            bar.update(n)
        if step % log_every == 0 and (bar is not None or log_fh is not None):
            s = summarize(epoch_sums, "train_")
            if bar is not None:
                bar.set_postfix({k[6:]: f"{v:.4f}" for k, v in s.items()
                                 if k in ("train_loss", "train_acc")})
            log({"type": "step", "step": step, "epoch": epoch + 1, **s})
        if checkpoint_every_steps and step % checkpoint_every_steps == 0:
            save_checkpoint()

    best_value, best_tree, bad_epochs, stopped_early = None, None, 0, False
    last_done = 0.0  # when the previous epoch's steps were done (perf_counter)

    def epoch_record(epoch: int, first: int, seen: int, t0: float, lagged: bool) -> _EpochRecord:
        """Dispatch what the epoch's row needs from the device (evaluation, learning rate)
        without waiting for it."""
        eval_sums = None
        if eval_loader is not None:
            eval_sums = _evaluate_sums(params, state, eval_loader, eval_step)
        lr = _current_lr(opt_state)
        if lagged and isinstance(lr, jax.Array):
            lr = jnp.copy(lr)  # the next step donates opt_state
        return _EpochRecord(epoch, step, first, seen, t0, epoch_sums, eval_sums, lr)

    def finish(rec: _EpochRecord) -> bool:
        """Fetch the epoch's metrics, record, log and print them, early-stop, checkpoint and
        plot; True to stop training."""
        nonlocal best_value, best_tree, bad_epochs, last_done
        row: dict[str, Any] = {"epoch": rec.epoch + 1, "step": rec.step}
        host_sums = lr = None
        if rec.sums is not None:  # one fetch: waits for the epoch's steps
            host_sums, lr = jax.device_get((rec.sums, rec.lr))
        t_done = time.perf_counter()
        t0 = max(rec.t0, last_done)  # a lagged epoch's steps start when the previous ones end
        last_done = t_done
        n_real = None
        if host_sums is not None:
            row.update(summarize(host_sums, "train_"))
            if rec.first == 0:
                n_real = float(host_sums["count"])
        if rec.eval_sums is not None:
            row.update({f"test_{k}": v for k, v in summarize(rec.eval_sums).items()})
        if rec.seen and n_real is not None:
            row["examples_per_sec"] = n_real / max(t_done - t0, 1e-9)
        row["time"] = time.perf_counter() - t0
        if lr is None and rec.lr is not None:
            lr = jax.device_get(rec.lr)
        if lr is not None:
            row["lr"] = float(lr)
        history.append(row)
        log({"type": "epoch", **row})
        if print_fn is not None:
            say(_fmt(row))
        if early_stopping is not None:
            value = row.get(early_stopping.monitor)
            if value is None:
                raise ValueError(
                    f"EarlyStopping: monitor {early_stopping.monitor!r} not in the epoch "
                    f"record; available: {sorted(row)}"
                )
            if early_stopping.improved(value, best_value):
                best_value, bad_epochs = value, 0
                if early_stopping.restore_best:
                    best_tree = (_copy(params), _copy(state))
            else:
                bad_epochs += 1
        if manager is not None and checkpoint_every and (rec.epoch + 1) % checkpoint_every == 0:
            save_checkpoint()
        if plot:
            plot_history(history, plot)
        if early_stopping is not None and bad_epochs >= early_stopping.patience:
            say(f"early stopping: {early_stopping.monitor} has not improved for "
                f"{bad_epochs} epochs (best {best_value:.4f})")
            return True
        return False

    nb = len(train_loader)
    # Device path: steps per compiled call. A call ends at every step where fit logs (progress
    # bar postfix, log_file) or checkpoints, so those see exactly the steps they see with one
    # step per call.
    if steps_per_call is None:
        per_call = 1 if callback is not None else max(1, nb // 20) if tqdm is not None else nb
    else:
        per_call = steps_per_call
    cut_at = [log_every] if (tqdm is not None or log_fh is not None) else []
    if checkpoint_every_steps:
        cut_at.append(checkpoint_every_steps)
    data = train_loader.device_arrays() if device_steps is not None else None
    ahead = None  # the next epoch's index table, on the device ahead of time (device path)
    counter = None
    # An epoch whose row needs nothing before the next epoch starts (no early stopping, no
    # checkpoint at its end) is finished after the next epoch's first call is dispatched:
    # fetching its metrics, printing, logging and plotting then overlap that call instead of
    # leaving the device idle between epochs.
    pending = None
    epoch = first = seen = 0
    bar = None

    def dispatched(metrics, n: int = 1) -> None:
        """After each call's dispatch (``n`` steps): the previous epoch's row (first call
        only), the progress bar, logging, callbacks and step checkpoints."""
        nonlocal pending, bar
        if pending is not None:
            rec, pending = pending, None
            finish(rec)
        if bar is None and tqdm is not None:
            bar = tqdm(total=nb, initial=first + seen - n,
                       desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
        after_step(epoch, bar, metrics, n)

    try:
        try:
            for epoch in range(train_loader.epoch, epochs):
                t0 = time.perf_counter()
                first = train_loader.batch
                if first == 0:
                    epoch_sums = None
                bar = None
                seen = 0
                if device_steps is not None:
                    # runs of steps in one compiled call each (``_device_steps``), gathering
                    # their batches from the device-resident data by the epoch's index table
                    # (moved to the device during the previous epoch; it starts at the loader's
                    # position, so this resumes mid-epoch)
                    run, zeros_cache = device_steps
                    if ahead is None or ahead[0] != (epoch, first):
                        ahead = _epoch_table(train_loader, epoch, first)
                    (_, table, masks), ahead = ahead, None
                    if counter is None:  # then the device copy of ``step`` the calls return
                        counter = np.uint32(step)
                    sums = epoch_sums
                    if sums is None and first < nb:
                        sums = _metric_zeros(train_step, zeros_cache, params, state, opt_state,
                                             key, train_loader)
                    lo = 0
                    for n in _calls(step, nb - first, per_call, cut_at):
                        params, state, opt_state, sums, metrics, counter = run(
                            params, state, opt_state, sums, counter, data, table, masks,
                            np.int32(lo), np.int32(n), key)
                        lo += n
                        train_loader.batch += n
                        step += n
                        seen += n
                        epoch_sums = sums
                        dispatched(metrics, n)
                    if epoch + 1 < epochs:  # before the fetch below waits for this epoch's steps
                        ahead = _epoch_table(train_loader, epoch + 1, 0)
                    train_loader.epoch, train_loader.batch = epoch + 1, 0
                else:
                    for batch in train_loader:  # resumes mid-epoch from the loader's position
                        params, state, opt_state, metrics = train_step(
                            params, state, opt_state, batch, jax.random.fold_in(key, step)
                        )
                        step += 1
                        epoch_sums = (metrics if epoch_sums is None
                                      else _accumulate(epoch_sums, metrics))
                        seen += 1
                        dispatched(metrics)
                if bar is not None:
                    bar.close()
                lag = (epoch + 1 < epochs and early_stopping is None
                       and not (manager is not None and checkpoint_every
                                and (epoch + 1) % checkpoint_every == 0))
                rec = epoch_record(epoch, first, seen, t0, lag)
                epoch_sums = None
                if lag:
                    pending = rec
                elif finish(rec):
                    stopped_early = True
                    break
        except StopIteration:  # raised by the callback
            pass
        if pending is not None:  # stopped before the next epoch's first step
            finish(pending)
    except KeyboardInterrupt:
        hint = resume_hint or (
            f"fit(..., checkpoint_dir={checkpoint_dir!r}, resume=True)" if checkpoint_dir else None
        )
        if last_ckpt:
            say(f"\ninterrupted at step {step}; the last checkpoint is intact: {last_ckpt}\n"
                f"resume with: {hint}")
        else:
            say(f"\ninterrupted at step {step}; no checkpoint was written yet"
                + ("" if checkpoint_dir else " (pass checkpoint_dir= to enable them)"))
        raise
    finally:
        if log_fh is not None:
            log_fh.close()
    if stopped_early and best_tree is not None:
        params, state = best_tree
    return FitResult(params, state, opt_state, history, step, last_ckpt, stopped_early)


def plot_history(history: History, path: str, *, title: str | None = None) -> str:
    """Save the d2l "Animator" figure: train loss, train acc and test acc per epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'fdl[train]'") from None
    epochs = history["epoch"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    styles = {"train_loss": "-", "train_acc": "m--", "test_acc": "g-.", "test_loss": "r:"}
    labels = {"train_loss": "train loss", "train_acc": "train acc", "test_acc": "test acc",
              "test_loss": "test loss"}
    for name in ("train_loss", "train_acc", "test_acc"):
        ys = history[name]
        if any(y is not None for y in ys):
            ax.plot(epochs, [np.nan if y is None else y for y in ys], styles[name],
                    label=labels[name])
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(max(epochs, default=1), 2))
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
