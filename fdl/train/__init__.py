"""Training: step builders, the device loop, the trainer and its callbacks, ``fit``, metrics,
checkpoints, plots, curriculum utilities."""

from fdl.train import checkpoint
from fdl.train.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    EvalHook,
    JsonLog,
    PlotCurves,
    PrintEpochs,
    ProgressBar,
    ResetState,
    StepCallback,
)
from fdl.train.checkpoint import CheckpointError, CheckpointManager, latest, load, save
from fdl.train.data import IterableBatches
from fdl.train.history import History, print_every
from fdl.train.loop import FitResult, evaluate, fit
from fdl.train.metrics import Objective, accuracy, batch_metrics, summarize, top_k_accuracy
from fdl.train.plots import plot_history
from fdl.train.step import (
    EvalStep,
    TrainStep,
    make_eval_step,
    make_predict_fn,
    make_train_step,
    unpack_batch,
)
from fdl.train.trainer import Trainer
from fdl.train.utils import ensemble_predict, grid_search, k_fold, k_fold_splits, random_search

__all__ = [
    "checkpoint", "CheckpointError", "CheckpointManager", "latest", "load", "save",
    "Callback", "Checkpoint", "EarlyStopping", "EvalHook", "JsonLog", "PlotCurves",
    "PrintEpochs", "ProgressBar", "ResetState", "StepCallback",
    "FitResult", "History", "IterableBatches", "Trainer", "evaluate", "fit", "plot_history",
    "print_every",
    "Objective", "accuracy", "batch_metrics", "summarize", "top_k_accuracy",
    "EvalStep", "TrainStep", "make_eval_step", "make_predict_fn", "make_train_step",
    "unpack_batch",
    "ensemble_predict", "grid_search", "k_fold", "k_fold_splits", "random_search",
]
