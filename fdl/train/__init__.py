"""Training: step builders, the ``fit`` loop, metrics, checkpoints, curriculum utilities."""

from fdl.train import checkpoint
from fdl.train.checkpoint import CheckpointError, CheckpointManager, latest, load, save
from fdl.train.loop import EarlyStopping, FitResult, History, evaluate, fit, plot_history
from fdl.train.metrics import accuracy, batch_metrics, summarize, top_k_accuracy
from fdl.train.step import make_eval_step, make_predict_fn, make_train_step, unpack_batch
from fdl.train.utils import ensemble_predict, grid_search, k_fold, k_fold_splits, random_search

__all__ = [
    "checkpoint", "CheckpointError", "CheckpointManager", "latest", "load", "save",
    "EarlyStopping", "FitResult", "History", "evaluate", "fit", "plot_history",
    "accuracy", "batch_metrics", "summarize", "top_k_accuracy",
    "make_eval_step", "make_predict_fn", "make_train_step", "unpack_batch",
    "ensemble_predict", "grid_search", "k_fold", "k_fold_splits", "random_search",
]
