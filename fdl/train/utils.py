"""Curriculum utilities: k-fold cross-validation, grid / random hyperparameter search,
ensembles."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["k_fold_splits", "k_fold", "grid_search", "random_search", "ensemble_predict"]


def k_fold_splits(n: int, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """d2l's ``get_k_fold_data`` as indices: ``k`` contiguous folds of ``n // k`` examples
    (the remainder goes to training); returns ``[(train_idx, valid_idx), ...]``."""
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k_fold: k must be an integer >= 2, got {k!r}")
    if n < k:
        raise ValueError(f"k_fold: need at least k={k} examples, got {n}")
    size = n // k
    idx = np.arange(n)
    out = []
    for i in range(k):
        valid = idx[i * size : (i + 1) * size]
        train = np.concatenate([idx[: i * size], idx[(i + 1) * size :]])
        out.append((train, valid))
    return out


def k_fold(k: int, x, y, train_fn: Callable[..., Mapping[str, float]]) -> dict[str, Any]:
    """d2l's ``k_fold``: for each fold call ``train_fn(x_train, y_train, x_valid, y_valid)``
    (returning a dict of scores such as ``{"train_loss": ..., "valid_loss": ...}``) and average.

    Returns ``{"folds": [scores, ...], "mean": {name: average}}``."""
    folds = []
    for tr, va in k_fold_splits(len(x), k):
        folds.append(dict(train_fn(x[tr], y[tr], x[va], y[va])))
    names = folds[0].keys()
    return {"folds": folds, "mean": {n: float(np.mean([f[n] for f in folds])) for n in names}}


def _best(results, metric, mode):
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    pick = min if mode == "min" else max
    return pick(results, key=lambda r: r["score"][metric])


def grid_search(space: Mapping[str, Sequence[Any]], evaluate_fn: Callable[..., Mapping],
                *, metric: str, mode: str = "min") -> dict[str, Any]:
    """Evaluate ``evaluate_fn(**config)`` on every combination of ``space`` (a dict of lists).

    Returns ``{"best": {"config", "score"}, "results": [{"config", "score"}, ...]}`` where
    ``score`` is the dict ``evaluate_fn`` returned and the best minimises/maximises
    ``score[metric]``."""
    if not space:
        raise ValueError("grid_search: empty search space")
    names = list(space)
    results = []
    for values in itertools.product(*(space[n] for n in names)):
        config = dict(zip(names, values, strict=True))
        results.append({"config": config, "score": dict(evaluate_fn(**config))})
    return {"best": _best(results, metric, mode), "results": results}


def random_search(space: Mapping[str, Any], evaluate_fn: Callable[..., Mapping], *, key,
                  num_trials: int, metric: str, mode: str = "min") -> dict[str, Any]:
    """Random search: each trial draws every hyperparameter from ``space``, whose values are a
    list (uniform choice), a ``("uniform", lo, hi)``, ``("log_uniform", lo, hi)`` or
    ``("int", lo, hi)`` (inclusive) spec. Draws use ``fold_in(key, trial)``; same key, same
    trials. Returns as :func:`grid_search`."""
    if num_trials < 1:
        raise ValueError(f"random_search: num_trials must be >= 1, got {num_trials}")
    names = sorted(space)
    results = []
    for t in range(num_trials):
        keys = jax.random.split(jax.random.fold_in(key, t), len(names))
        config = {}
        for n, k in zip(names, keys, strict=True):
            spec = space[n]
            u = float(jax.random.uniform(k, ()))
            if isinstance(spec, tuple) and spec and spec[0] in ("uniform", "log_uniform", "int"):
                kind, lo, hi = spec
                if kind == "uniform":
                    config[n] = lo + u * (hi - lo)
                elif kind == "log_uniform":
                    config[n] = float(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))))
                else:
                    config[n] = int(min(hi, lo + int(u * (hi - lo + 1))))
            elif isinstance(spec, (list, tuple)) and spec:
                config[n] = spec[min(int(u * len(spec)), len(spec) - 1)]
            else:
                raise ValueError(f"random_search: bad spec for {n!r}: {spec!r}")
        results.append({"config": config, "score": dict(evaluate_fn(**config))})
    return {"best": _best(results, metric, mode), "results": results}


def ensemble_predict(predict: Callable, members: Sequence[tuple[Any, Any]], x,
                     *, probabilities: bool = True) -> jax.Array:
    """Average the predictions of several models: ``predict(params, state, x)`` for each
    ``(params, state)`` in ``members``. With ``probabilities`` the outputs (logits) are
    softmax-ed before averaging."""
    if not members:
        raise ValueError("ensemble_predict: no members")
    outs = []
    for params, state in members:
        y = predict(params, state, x)
        outs.append(jax.nn.softmax(y, axis=-1) if probabilities else y)
    return jnp.mean(jnp.stack(outs), axis=0)
