"""The training curve (d2l's "Animator" figure), saved to a file.

Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas directly: ``pyplot`` is never
imported, so the caller's backend and open figures are left alone.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from fdl.train.history import History

__all__ = ["plot_history", "history_figure"]

_LOSSES = (("train_loss", "train loss", "C0-"), ("test_loss", "test loss", "C3:"))
_ACCURACIES = (("train_acc", "train acc", "C4--"), ("test_acc", "test acc", "C2-."))
_PERPLEXITIES = (("train_perplexity", "train perplexity", "C4--"),
                 ("test_perplexity", "test perplexity", "C2-."))


def _draw(ax, history: History, epochs, curves) -> list:
    lines = []
    for name, label, style in curves:
        ys = history[name]
        if any(y is not None for y in ys):
            ys = [np.nan if y is None else y for y in ys]
            lines += ax.plot(epochs, ys, style, label=label)
    return lines


def history_figure(history: History, *, title: str | None = None):
    """A ``matplotlib.figure.Figure`` (Agg canvas, no pyplot) with train/test loss on the left
    axis and train/test accuracy on the right (perplexity for a model without accuracy)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'fdl[train]'") from None
    epochs = history["epoch"]
    fig = Figure(figsize=(5.0, 3.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines = _draw(ax, history, epochs, _LOSSES)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_xlim(1, max(max(epochs, default=1), 2))
    ax.grid(True, alpha=0.3)
    right = ax.twinx()
    more = _draw(right, history, epochs, _ACCURACIES)
    right.set_ylabel("accuracy")
    if not more:
        more = _draw(right, history, epochs, _PERPLEXITIES)
        right.set_ylabel("perplexity" if more else "")
    if not more:
        right.set_yticks([])
    lines += more
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize="small")
    ax.set_title(title or "training curves")
    fig.tight_layout()
    return fig


def plot_history(history: History, path: str, *, title: str | None = None) -> str:
    """Save :func:`history_figure` to ``path`` (written whole, then moved into place);
    returns ``path``."""
    fig = history_figure(history, title=title)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=f".{fmt}", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
