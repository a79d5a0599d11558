"""Smoke tests of the basic examples with tiny settings (each runs its real code path)."""

import importlib.util
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    path = os.path.join(ROOT, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_linear_regression(capsys):
    out = _load("linear_regression").main(["--epochs", "2", "--n", "500", "--lr", "0.1"])
    assert out["scratch"]["w_error"] < 0.05 and out["concise"]["w_error"] < 0.05
    assert "error in estimating w" in capsys.readouterr().out


def test_softmax_regression(capsys):
    pytest.importorskip("sklearn")
    out = _load("softmax_regression").main(["--epochs", "1", "--lr", "0.5"])
    assert out["scratch_test_acc"] > 0.5 and out["concise_test_acc"] > 0.5
    assert "final:" in capsys.readouterr().out


def test_mlp_and_weight_decay(capsys):
    pytest.importorskip("sklearn")
    out = _load("mlp").main(["--epochs", "1", "--wd-epochs", "20"])
    assert 0.0 <= out["mlp_test_acc"] <= 1.0
    # the weight-decay effect: decay lowers the test loss
    assert out["decay_3"][1] < out["no_decay"][1]
    assert "final:" in capsys.readouterr().out


def test_lenet(capsys):
    pytest.importorskip("sklearn")
    out = _load("lenet").main(["--epochs", "1", "--batch-size", "128", "--limit", "256"])
    assert len(out["lenet"]) == len(out["lenet_bn"]) == 1
    assert "LeNet+BatchNorm test acc" in capsys.readouterr().out
