"""k-fold, grid / random search, ensembles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.train import ensemble_predict, grid_search, k_fold, k_fold_splits, random_search


def test_k_fold_splits_partition():
    splits = k_fold_splits(11, 3)
    assert len(splits) == 3
    valids = np.concatenate([v for _, v in splits])
    assert sorted(valids.tolist()) == list(range(9))
    for tr, va in splits:
        assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 11
    with pytest.raises(ValueError, match="k must be"):
        k_fold_splits(10, 1)


def test_k_fold_averages_least_squares():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2))
    y = x @ np.array([1.0, -2.0]) + 0.1 * rng.normal(size=30)

    def train_fn(xt, yt, xv, yv):
        w, *_ = np.linalg.lstsq(xt, yt, rcond=None)
        return {"train_mse": float(np.mean((xt @ w - yt) ** 2)),
                "valid_mse": float(np.mean((xv @ w - yv) ** 2))}

    out = k_fold(5, x, y, train_fn)
    assert len(out["folds"]) == 5
    assert out["mean"]["valid_mse"] == pytest.approx(
        np.mean([f["valid_mse"] for f in out["folds"]]))
    assert out["mean"]["valid_mse"] < 0.05


def test_grid_and_random_search():
    f = lambda a, b: {"loss": (a - 2) ** 2 + (b - 0.5) ** 2}
    g = grid_search({"a": [0, 1, 2, 3], "b": [0.0, 0.5]}, f, metric="loss")
    assert g["best"]["config"] == {"a": 2, "b": 0.5} and len(g["results"]) == 8
    space = {"a": ("int", 0, 4), "b": ("uniform", 0.0, 1.0), "c": ["x", "y"],
             "lr": ("log_uniform", 1e-4, 1e-1)}
    r1 = random_search(space, lambda a, b, c, lr: f(a, b), key=jax.random.key(0),
                       num_trials=6, metric="loss")
    r2 = random_search(space, lambda a, b, c, lr: f(a, b), key=jax.random.key(0),
                       num_trials=6, metric="loss")
    assert r1["results"] == r2["results"]
    for res in r1["results"]:
        c = res["config"]
        assert 0 <= c["a"] <= 4 and 0 <= c["b"] <= 1 and c["c"] in "xy"
        assert 1e-4 <= c["lr"] <= 1e-1
    best = min(r["score"]["loss"] for r in r1["results"])
    assert r1["best"]["score"]["loss"] == best


def test_ensemble_predict():
    predict = lambda p, s, x: x * p
    out = ensemble_predict(predict, [(1.0, None), (3.0, None)], jnp.ones(2), probabilities=False)
    np.testing.assert_allclose(out, [2.0, 2.0])
    logits = ensemble_predict(lambda p, s, x: p, [(jnp.array([0.0, 10.0]), None),
                                                   (jnp.array([10.0, 0.0]), None)], None)
    np.testing.assert_allclose(logits, [0.5, 0.5], atol=1e-4)
