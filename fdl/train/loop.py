"""``fit`` and ``evaluate``: short compositions of the parts in this package.

``fit`` builds (or takes) the steps (:mod:`fdl.train.step`), wraps the data
(:mod:`fdl.train.data`), turns its keyword arguments into callbacks (:mod:`fdl.train.callbacks`:
progress bar, epoch lines, JSON log, plot, checkpoints, early stopping) and runs a
:class:`~fdl.train.Trainer` (:mod:`fdl.train.trainer`), which loops the steps on the device
where it can (:mod:`fdl.train.device_loop`). Each part is usable alone.

Resume: with ``checkpoint_dir`` set, fit saves ``{params, state, opt_state, key, step, loader
position, epoch metric sums}`` (and the history, as JSON metadata) every ``checkpoint_every``
epochs and/or ``checkpoint_every_steps`` steps. ``resume=True`` restores the newest checkpoint
that verifies and continues: every step uses the key ``fold_in(key, step)`` and the loader's
order is a pure function of ``(data key, epoch)``, so a resumed run computes exactly what an
uninterrupted run computes (bitwise on CPU).

Ctrl-C: the loop stops between compiled calls, leaves the newest checkpoint as it was
(checkpoint writes are atomic), prints how to resume and re-raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from fdl.nn.core import Layer
from fdl.train import callbacks as cbs
from fdl.train.data import as_batches
from fdl.train.device_loop import evaluate_sums
from fdl.train.history import History
from fdl.train.metrics import Objective, summarize
from fdl.train.step import EvalStep, make_eval_step, make_train_step
from fdl.train.trainer import Trainer, prepare

__all__ = ["fit", "evaluate", "FitResult"]

_DATA_SEED = 0x5EED


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


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"fit: {name} must be an integer >= 1{' or None' if allow_none else ''}"
                         f", got {value!r}")


def _output_callbacks(print_fn, progress, log_every, log_file, plot) -> list[cbs.Callback]:
    """Progress bar, JSON log, epoch lines and plot: on the main process only."""
    if jax.process_index() != 0:
        return []
    out: list[cbs.Callback] = [cbs.ProgressBar(log_every)] if progress and print_fn else []
    out += [cbs.JsonLog(log_file, log_every)] if log_file else []
    out += [cbs.PrintEpochs(print_fn)] if print_fn else []
    return out + ([cbs.PlotCurves(plot)] if plot else [])


def _resume(trainer: Trainer, saver: cbs.Checkpoint | None, resume, say) -> None:
    """Restore ``resume`` (a path, or ``True``: the newest checkpoint that verifies)."""
    path = resume if isinstance(resume, str) else saver.latest()
    if path is None:
        return say(f"no checkpoint in '{saver.directory}'; starting from scratch")
    cbs.restore(trainer, path)
    if saver is not None:
        saver.last = path
    say(f"resumed from {path} (step {trainer.step}, epoch {trainer.epoch + 1}, batch "
        f"{trainer.batch})")


def _interrupted(step: int, saver: cbs.Checkpoint | None, hint: str | None, say) -> None:
    if saver is not None and saver.last:
        hint = hint or f"fit(..., checkpoint_dir={saver.directory!r}, resume=True)"
        say(f"\ninterrupted at step {step}; the last checkpoint is intact: {saver.last}\n"
            f"resume with: {hint}")
    else:
        say(f"\ninterrupted at step {step}; no checkpoint was written yet"
            + ("" if saver else " (pass checkpoint_dir= to enable them)"))


def fit(model: Layer | Callable, params, state, optimizer, train_data, *, epochs: int, key,
        eval_data=None, loss: str | Callable | Objective = "cross_entropy",
        metrics: Callable | None = None, perplexity: bool = False, top_k: Sequence[int] = (),
        batch_size: int | None = None, opt_state=None, train_step: Callable | None = None,
        eval_step: Callable | None = None, callbacks: Sequence[cbs.Callback] = (),
        eval_state: Callable | None = None,
        reset_state: str | Sequence[str] | Callable | None = None, log_every: int = 50,
        progress: bool = True,
        print_fn: Callable[[str], None] | None = print, log_file: str | None = None,
        plot: str | None = None, checkpoint_dir: str | None = None,
        checkpoint_every: int | None = 1, checkpoint_every_steps: int | None = None,
        keep: int = 3, resume: bool | str = False, early_stopping: cbs.EarlyStopping | None = None,
        metadata: dict[str, Any] | None = None, callback: Callable[[int, Any], None] | None = None,
        resume_hint: str | None = None, steps_per_call: int | None = None) -> FitResult:
    """Train ``model`` for ``epochs`` epochs from ``params``/``state`` (copied), evaluating on
    ``eval_data`` after each; returns a :class:`FitResult`.

    Data: an ``ArrayLoader``, ``(x, y)`` (needs ``batch_size``; shuffled with a key derived
    from ``key``) or a re-iterable batch source (:mod:`fdl.train.data`). Step ``s`` uses
    ``fold_in(key, s)``. ``loss``, ``metrics``, ``perplexity``, ``top_k``: as in
    :func:`~fdl.train.make_train_step`, which builds the steps unless ``train_step`` /
    ``eval_step`` are given. ``opt_state`` defaults to ``optimizer.init(params)``.
    ``callbacks`` run first, in order, then those the arguments make: ``progress`` bar
    (terminal only), ``print_fn`` (a line per epoch; ``None``: silent), ``log_file`` (JSON
    lines, step records every ``log_every`` steps), ``plot``, ``early_stopping``,
    ``checkpoint_dir`` (with ``checkpoint_every`` epochs, ``checkpoint_every_steps``, ``keep``,
    ``metadata``), ``callback(step, metrics)`` after each compiled call (``StopIteration``
    stops). ``resume``: ``True`` (newest valid checkpoint in ``checkpoint_dir``) or a path;
    ``resume_hint``: the command printed after Ctrl-C. ``reset_state``: state paths zeroed (or
    ``state -> state``) at every epoch start and before evaluation; ``eval_state(state)``: the
    state evaluation starts from. ``steps_per_call`` caps the steps per compiled call
    (default: a whole epoch; ~1/20 with a bar; 1 with ``callback``). See the module docstring
    for resume and Ctrl-C.
    """
    _positive("epochs", epochs), _positive("log_every", log_every)
    _positive("steps_per_call", steps_per_call, True)
    _positive("checkpoint_every_steps", checkpoint_every_steps, True)
    if resume and checkpoint_dir is None and not isinstance(resume, str):
        raise ValueError("fit: resume=True needs checkpoint_dir=")
    say = print_fn or (lambda *_: None)
    own = isinstance(train_data, (tuple, list))  # fit builds the loader: its key from ``key``
    data_key = (lambda k: jax.random.fold_in(k, _DATA_SEED)) if own else None
    data = as_batches(train_data, batch_size, data_key and data_key(key), True, "train_data")
    evald = None if eval_data is None else as_batches(
        eval_data, batch_size or getattr(data, "batch_size", None), None, False, "eval_data")
    kw = dict(metrics=metrics, top_k=top_k, perplexity=perplexity)
    train_step = train_step or make_train_step(model, optimizer, loss, **kw)
    eval_step = eval_step or (evald and make_eval_step(model, loss, **kw))
    saver = None if checkpoint_dir is None else cbs.Checkpoint(
        checkpoint_dir, every_epochs=checkpoint_every, every_steps=checkpoint_every_steps,
        keep=keep, metadata=metadata)
    resetter = None if reset_state is None else cbs.ResetState(reset_state)
    made = [callback and cbs.StepCallback(callback),
            *_output_callbacks(print_fn, progress, log_every, log_file, plot), resetter,
            early_stopping, saver]
    trainer = Trainer(
        train_step, data, *prepare(optimizer, params, state, opt_state), key, eval_step=eval_step,
        eval_data=evald, eval_state=eval_state or (resetter and resetter.reset),
        callbacks=[*callbacks, *(c for c in made if c)], steps_per_call=steps_per_call, say=say,
        data_key_from=data_key)
    if resume:
        _resume(trainer, saver, resume, say)
    try:
        trainer.run(epochs)
    except KeyboardInterrupt:
        _interrupted(trainer.step, saver, resume_hint, say)
        raise
    return FitResult(trainer.params, trainer.state, trainer.opt_state, trainer.history,
                     trainer.step, saver.last if saver else None,
                     bool(early_stopping and early_stopping.stopped))


def evaluate(params, state, data, *, model: Layer | Callable | None = None,
             eval_step: Callable | None = None, loss: str | Callable | Objective = "cross_entropy",
             metrics: Callable | None = None, perplexity: bool = False, batch_size: int = 256,
             top_k: Sequence[int] = ()) -> dict[str, float]:
    """Mean loss / accuracy / top-k / custom metrics (/ perplexity) of ``model`` (or
    ``eval_step``) over ``data`` (``ArrayLoader``, ``(x, y)`` or a batch source), in
    evaluation mode."""
    if eval_step is None:
        if model is None:
            raise ValueError("evaluate: pass model= or eval_step=")
        eval_step = make_eval_step(model, loss, metrics=metrics, top_k=top_k,
                                   perplexity=perplexity)
    step = EvalStep.of(eval_step)
    source = as_batches(data, batch_size, None, False, "data")
    return summarize(evaluate_sums(params, state, source, step), perplexity=step.perplexity)
