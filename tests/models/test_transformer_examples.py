"""Smoke tests of the transformer and BERT examples with tiny settings (real code paths)."""

import importlib.util
import os

import jax
import numpy as np
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
    loaded = _load("bert_pretrain").load_params(str(tmp_path / "p.safetensors"), out["params"])
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(out["params"])):
        np.testing.assert_array_equal(a, b)


def test_bert_finetune_example(tmp_path, capsys):
    saved = tmp_path / "pre.safetensors"
    args = ["--data", _data("fra-eng.zip"), "--pretrain-steps", "2", "--pretrain-batch-size",
            "16", "--train-examples", "16", "--test-examples", "20", "--seeds", "2",
            "--epochs", "1", "--hidden", "16", "--layers", "1"]
    out = _load("bert_finetune").main([*args, "--save-pretrained", str(saved)])
    assert len(out["pretrained"]) == len(out["scratch"]) == 2
    assert all(0.0 <= a <= 1.0 for a in out["pretrained"] + out["scratch"])
    text = capsys.readouterr().out
    assert "pretrained - scratch" in text and saved.exists()
    again = _load("bert_finetune").main([*args, "--pretrained", str(saved), "--no-scratch",
                                         "--seeds", "1"])
    assert again["pretrained"] == out["pretrained"][:1]  # the same encoder, the same run
