"""Smoke test of examples/detection/tinyssd.py with tiny settings (its real code path: data
generation, fit with the book's metrics, mAP, the PNG)."""

import importlib.util
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "detection")


@pytest.mark.slow  # ~40 s (compiling TinySSD's step, detection and evaluation)
def test_tinyssd_example(tmp_path, capsys):
    pytest.importorskip("PIL")
    spec = importlib.util.spec_from_file_location("example_tinyssd",
                                                  os.path.join(ROOT, "tinyssd.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                    "--train-size", "16", "--test-size", "8", "--image-size", "64",
                    "--epochs", "2", "--batch-size", "8", "--no-progress"])
    assert os.path.isfile(out["png"]) and os.path.isfile(tmp_path / "out" / "loss.png")
    assert 0 <= out["voc_map"] <= 1 and 0 <= out["coco_map"] <= 1
    assert 0 <= out["train"]["class_err"] <= 1
    text = capsys.readouterr().out
    assert "book ~3.3e-03" in text and "mAP@0.5" in text
