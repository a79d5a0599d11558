"""Smoke tests of the transformer and BERT examples with tiny settings (real code paths)."""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.slow  # ~30 s each on a quiet 2-core machine (training + jit decoding)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "sequence")
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data(name):
    path = os.path.join(DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} not available at {path}")
    return path


def test_transformer_mt_example(tmp_path, capsys):
    out = _load("transformer_mt").main([
        "--data", _data("fra-eng.zip"), "--epochs", "2", "--num-examples", "128",
        "--log-every", "1", "--out", str(tmp_path)])
    assert len(out["loss"]) == 2 and out["loss"][1] < out["loss"][0]
    text = capsys.readouterr().out
    assert "translations (greedy)" in text and "beam search k=2" in text
    assert (tmp_path / "attention_cross.png").exists()
    assert (tmp_path / "attention_encoder.png").exists()


def test_bert_pretrain_example(tmp_path, capsys):
    out = _load("bert_pretrain").main([
        "--data", _data("timemachine.txt"), "--steps", "3", "--batch-size", "16",
        "--hidden", "16", "--ffn", "32", "--save", str(tmp_path / "p.safetensors")])
    assert out["mlm"] > 0 and out["nsp"] > 0
    assert "MLM loss" in capsys.readouterr().out and (tmp_path / "p.safetensors").exists()
