"""Smoke test: examples/optimizers_2d.py runs with small settings and writes its figures."""

import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "optimizers_2d.py")


def test_optimizers_2d_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("optimizers_2d", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "figs"
    res = mod.main([str(out), "--steps", "20", "--rosen-steps", "200", "--epochs", "2"])
    for name in ("quadratic.png", "rosenbrock.png", "regression.png"):
        assert (out / name).stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "final loss" in printed and "Rosenbrock" in printed
    # d2l's momentum run (eta 0.6, beta 0.5) is close to the optimum after 20 steps
    assert np.abs(res["quadratic"]["momentum (0.6, beta 0.5)"]).max() < 0.05
    # every optimizer lowered the regression loss from its start (0.5 on standardised data)
    assert all(v < 0.45 for v in res["regression"].values())
