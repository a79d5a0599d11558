"""Callbacks: the protocol's hooks and their order, values added to the epoch record, stopping,
the progress bar only on a terminal, the plot (title, labels, test loss, no backend change),
perplexity only where asked."""

import io
import json

import jax
import pytest

from fdl import optim
from fdl.train import Callback, EvalHook, History, ProgressBar, fit, make_train_step
from fdl.train.plots import history_figure, plot_history

from .helpers import blobs, init, tiny_mlp

MODEL = tiny_mlp()
OPT = optim.adam(0.05)
STEP = make_train_step(MODEL, OPT)


def _fit(**kw):
    params, state = init(MODEL)
    base = dict(epochs=2, key=jax.random.key(0), batch_size=8, eval_data=blobs(12, seed=2),
                progress=False, print_fn=None, train_step=STEP)
    return fit(MODEL, params, state, OPT, blobs(20, seed=1), **{**base, **kw})


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, trainer):
        self.calls.append("train_begin")

    def on_epoch_begin(self, trainer):
        self.calls.append(f"epoch_begin {trainer.epoch}")

    def on_steps_end(self, trainer, metrics, n):
        self.calls.append(f"steps {trainer.step} {n}")

    def on_epoch_end(self, trainer, row):
        self.calls.append(f"epoch_end {row['epoch']}")
        row["seen_params"] = float(jax.tree.leaves(trainer.params)[0].sum())

    def on_train_end(self, trainer):
        self.calls.append("train_end")


def test_hooks_in_order_and_rows_extended_before_output(tmp_path):
    rec = Recorder()
    lines = []
    score = EvalHook("bleu", lambda params, state: 0.5)
    res = _fit(callbacks=[rec, score], print_fn=lines.append, log_file=str(tmp_path / "l.jsonl"))
    # 3 batches per epoch in one compiled call each; no lag (a plain callback reads params)
    assert rec.calls == ["train_begin", "epoch_begin 0", "steps 3 3", "epoch_end 1",
                         "epoch_begin 1", "steps 6 3", "epoch_end 2", "train_end"]
    assert res.history["bleu"] == [0.5, 0.5] and "seen_params" in res.history.last
    assert "bleu 0.5000" in lines[-1]
    epochs = [json.loads(x) for x in open(tmp_path / "l.jsonl") if '"epoch"' in x]
    assert [r["bleu"] for r in epochs if r["type"] == "epoch"] == [0.5, 0.5]


def test_a_callback_stops_training():
    class StopAfterFirst(Callback):
        def on_epoch_end(self, trainer, row):
            trainer.stop = True

    res = _fit(epochs=5, callbacks=[StopAfterFirst()])
    assert len(res.history) == 1 and res.steps == 3


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    pytest.importorskip("tqdm")
    tty, pipe = Tty(), io.StringIO()
    _fit(callbacks=[ProgressBar(log_every=1, file=tty)])
    _fit(callbacks=[ProgressBar(log_every=1, file=pipe)])
    assert "\r" in tty.getvalue() and "epoch 2/2" in tty.getvalue()
    assert pipe.getvalue() == ""
    assert ProgressBar(file=pipe).steps_per_call(100) is None
    assert ProgressBar(file=tty).steps_per_call(100) == 5


def test_no_perplexity_for_a_classifier(tmp_path):
    log = tmp_path / "log.jsonl"
    res = _fit(log_file=str(log), log_every=1)
    assert not any("perplexity" in line for line in log.read_text().splitlines())
    assert not any("perplexity" in k for k in res.history.last)


def test_plot_titled_labelled_with_test_loss_and_backend_untouched(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    history = History([{"epoch": 1, "train_loss": 1.0, "test_loss": 1.2, "train_acc": 0.5,
                        "test_acc": 0.4},
                       {"epoch": 2, "train_loss": 0.6, "test_loss": 0.9, "train_acc": 0.7,
                        "test_acc": 0.6}])
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a caller's choice; plotting must not switch it to Agg
    try:
        _check_plot(history, tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)


def _check_plot(history, tmp_path):
    fig = history_figure(history, title="cnn on digits")
    ax, right = fig.axes
    assert ax.get_title() == "cnn on digits"
    assert ax.get_ylabel() == "loss" and right.get_ylabel() == "accuracy"
    assert ax.get_xlabel() == "epoch"
    labels = [line.get_label() for a in fig.axes for line in a.get_lines()]
    assert {"train loss", "test loss", "train acc", "test acc"} <= set(labels)
    path = plot_history(history, str(tmp_path / "sub" / "curve.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert history_figure(History([{"epoch": 1, "train_loss": 2.0, "train_perplexity": 7.4}]),
                          ).axes[1].get_ylabel() == "perplexity"
