"""The fdl command: train / eval / predict / resume in-process with tiny settings, help text,
and clear errors for bad input."""

import os

import pytest

from fdl import cli

pytest.importorskip("sklearn")


def test_help_lists_models_and_datasets(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for name in list(cli.MODELS) + ["digits", "mnist", "fashion_mnist", "cifar10"]:
        assert name in out
    assert cli.main([]) == 0
    assert "models:" in capsys.readouterr().out


def test_train_eval_predict_resume(tmp_path, capsys):
    out_dir = str(tmp_path / "runs")
    args = ["train", "softmax", "--epochs", "1", "--batch-size", "128", "--lr", "0.05",
            "--optimizer", "adam", "--output", out_dir, "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "done: test accuracy" in out
    run = os.path.join(out_dir, "softmax_digits")
    assert os.path.exists(os.path.join(run, "curve.png"))
    assert os.path.exists(os.path.join(run, "log.jsonl"))
    ckpts = os.listdir(os.path.join(run, "checkpoints"))
    assert any(c.endswith(".safetensors") for c in ckpts)
    acc1 = float(out.split("done: test accuracy ")[1].split(",")[0])
    assert acc1 > 0.7

    assert cli.main(["eval", run]) == 0
    out = capsys.readouterr().out
    assert f"accuracy {acc1:.4f}" in out

    assert cli.main(["predict", run, "--count", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "class" in lines[0] and "label" in lines[0]

    args[3] = "2"  # --epochs 2
    assert cli.main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch 2," in out and "epoch 1," not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "nosuch"], "unknown model 'nosuch'; valid: cnn, mlp"),
        (["train", "--data", "nope"], "unknown dataset 'nope'; valid: digits, mnist"),
        (["train", "--epochs", "0"], "--epochs must be >= 1"),
        (["train", "--lr", "-1"], "--lr must be > 0"),
        (["train", "softmax", "--batch-size", "100000"], "larger than the training set"),
        (["train", "--optimizer", "adamax"], "unknown optimizer 'adamax'; valid: adam"),
        (["train", "lenet"], "needs images of at least 12x12"),
        (["eval", "/nonexistent/ckpt.safetensors"], "does not exist"),
    ],
)
def test_bad_input(argv, message, capsys, tmp_path):
    assert cli.main([*argv, *(["--output", str(tmp_path)] if argv[0] == "train" else [])]) == 2
    assert message in capsys.readouterr().err


def test_eval_refuses_other_models_checkpoint(tmp_path, capsys):
    from fdl.train import checkpoint

    path = str(tmp_path / "ckpt_00000001.safetensors")
    import numpy as np

    checkpoint.save(path, {"params": {"fc": {"w": np.zeros((3, 3), np.float32)}}, "state": {}},
                    metadata={"model": "softmax", "data": "digits", "num_classes": 10,
                              "input_shape": [8, 8, 1]})
    assert cli.main(["eval", path]) == 2
    err = capsys.readouterr().err
    assert "params/fc/w: shape (3, 3) in checkpoint, template (64, 10)" in err


@pytest.mark.slow
def test_default_train_reaches_97_percent(tmp_path, capsys):
    assert cli.main(["train", "--output", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("done: test accuracy ")[1].split(",")[0])
    assert acc >= 0.97
