"""The fdl command: train / eval / predict / resume in-process with tiny settings; run folders
that never clobber each other; clear one-line errors for bad arguments, files and folders."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from fdl import cli

pytest.importorskip("sklearn")

TRAIN = ["train", "softmax", "--epochs", "1", "--batch-size", "128", "--lr", "0.05",
         "--no-progress"]


def _acc(out: str) -> float:
    return float(out.split("done: test accuracy ")[1].split(",")[0])


def _digest(folder) -> dict:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One short training run shared by the tests below: (output root, run folder, acc)."""
    out = str(tmp_path_factory.mktemp("cli") / "runs")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main([*TRAIN, "--output", out]) == 0
    text = buf.getvalue()
    run = text.split("run:        ")[1].split("\n")[0]
    return out, run, _acc(text)


def test_help_lists_models_datasets_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in list(cli.MODELS) + ["digits", "mnist", "fashion_mnist", "cifar10"]:
        assert name in out
    for text in ("(default: 10)", "(default: 64)", "(default: 0.001)", "(default: adam)",
                 "(default: 0.0)", "(default: runs)"):
        assert text in out
    assert "(default: None)" not in out and "(default: False)" not in out
    assert cli.main([]) == 0
    assert "models:" in capsys.readouterr().out


def test_a_run_writes_everything_into_its_own_folder(first_run):
    out, run, acc = first_run
    model_dir = os.path.join(out, "softmax_digits")
    assert os.path.dirname(run) == model_dir and acc > 0.7
    assert os.path.realpath(os.path.join(model_dir, "latest")) == os.path.realpath(run)
    names = sorted(os.listdir(run))
    assert {"config.json", "log.jsonl", "curve.png"} <= set(names)
    assert any(n.startswith("ckpt_") and n.endswith(".safetensors") for n in names)


def test_eval_and_predict_name_the_run_and_checkpoint(first_run, capsys):
    out, run, acc = first_run
    assert cli.main(["eval", os.path.join(out, "softmax_digits")]) == 0
    text = capsys.readouterr().out
    assert f"run {run}, checkpoint ckpt_" in text and f"accuracy {acc:.4f}" in text
    assert cli.main(["predict", run, "--count", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"run {run}, checkpoint ckpt_")
    assert len(lines) == 3 and "class" in lines[1] and "label" in lines[1]


def test_runs_never_clobber_resume_and_fallback(first_run, tmp_path, capsys):
    out, run_a, _ = first_run
    before = _digest(run_a)
    assert cli.main([*TRAIN, "--output", out, "--lr", "0.1"]) == 0
    run_b = capsys.readouterr().out.split("run:        ")[1].split("\n")[0]
    assert run_b != run_a and _digest(run_a) == before
    model_dir = os.path.join(out, "softmax_digits")
    assert os.path.realpath(os.path.join(model_dir, "latest")) == os.path.realpath(run_b)

    resume = [*TRAIN, "--output", out, "--lr", "0.1"]
    resume[3] = "2"  # --epochs 2
    assert cli.main([*resume, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and run_b in text and "epoch 2," in text
    assert "epoch 1," not in text and _digest(run_a) == before
    assert cli.main([*resume, "--resume"]) == 0
    assert "nothing was trained" in capsys.readouterr().out

    # a corrupt newest checkpoint and a stray empty one: eval falls back, saying so
    ckpts = sorted(n for n in os.listdir(run_b) if n.startswith("ckpt_"))
    newest = os.path.join(run_b, ckpts[-1])
    raw = bytearray(open(newest, "rb").read())
    raw[-3] ^= 0xFF
    open(newest, "wb").write(bytes(raw))
    open(os.path.join(run_b, "ckpt_99999999.safetensors"), "wb").close()
    assert cli.main(["eval", model_dir]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint {ckpts[-2]}" in captured.out
    assert "ckpt_99999999.safetensors" in captured.err and ckpts[-1] in captured.err
    assert captured.err.count("fdl: warning:") == 2


def test_checkpoint_dir_is_the_run_folder_and_is_not_reused(tmp_path, capsys):
    ck = str(tmp_path / "myrun")
    assert cli.main([*TRAIN, "--output", str(tmp_path / "runs"), "--checkpoint-dir", ck]) == 0
    capsys.readouterr()
    assert {"config.json", "log.jsonl", "curve.png"} <= set(os.listdir(ck))
    assert not os.path.exists(tmp_path / "runs")
    assert cli.main([*TRAIN, "--checkpoint-dir", ck]) == 2
    assert "already holds a run" in capsys.readouterr().err


def _write_file(tmp_path):
    p = tmp_path / "afile"
    p.write_text("x")
    return str(p)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "nosuch"], "unknown model 'nosuch'; valid: cnn, mlp"),
        (["train", "--data", "nope"], "--data 'nope' is not a known dataset; valid: digits"),
        (["train", "--data", "{file}"], "is a file; valid:"),
        (["train", "--epochs", "0"], "--epochs must be >= 1"),
        (["train", "--lr", "-1"], "--lr must be > 0"),
        (["train", "--lr", "nan"], "--lr must be > 0"),
        (["train", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["train", "--seed", "-1"], "--seed must be >= 0"),
        (["train", "--image-size", "0"], "--image-size must be >= 1"),
        (["train", "softmax", "--batch-size", "100000"], "larger than the training set"),
        (["train", "--optimizer", "adamax"], "unknown optimizer 'adamax'; valid: adam"),
        (["train", "lenet"], "needs images of at least 12x12"),
        (["train", "--devices", "-3"], "--devices must be >= 1, got -3"),
        (["train", "--devices", "4096"], "must be a multiple of --devices 4096"),
        (["train", "--output", "{file}/runs"], "--output '{file}/runs': '{file}' is a file"),
        (["train", "--checkpoint-dir", "{file}"], "--checkpoint-dir '{file}': '{file}' is a"),
        (["train", "--resume", "--overwrite"], "contradict"),
        (["train", "--augment", "flip,rotate"], "--augment 'flip,rotate': unknown ['rotate']"),
        (["train", "--augment", ","], "give a comma-separated list of flip, vflip, crop"),
        (["train", "--output", "/proc/fdl-runs"], "--output '/proc/fdl-runs': cannot create"),
        (["eval", "/nonexistent/ckpt.safetensors"], "does not exist"),
        (["eval", "{tmp}"], "no run in"),
        (["predict", "{tmp}", "--count", "-1"], "--count must be >= 1, got -1"),
    ],
)
def test_bad_input(argv, message, capsys, tmp_path):
    file = _write_file(tmp_path)
    fill = lambda s: s.replace("{file}", file).replace("{tmp}", str(tmp_path / "empty"))
    if "{tmp}" in " ".join(argv):
        os.makedirs(tmp_path / "empty")
    extra = ["--output", str(tmp_path / "out")] if argv[0] == "train" and \
        "--output" not in argv else []
    assert cli.main([*map(fill, argv), *extra]) == 2
    err = capsys.readouterr().err
    assert fill(message) in err and err.startswith("fdl: error: ")
    assert not os.path.exists(tmp_path / "out")  # nothing created for a refused run


def test_argument_errors_come_before_jax_is_imported():
    code = ("import sys; from fdl import cli; rc = cli.main(['train', '--devices', '4096']); "
            "print('jax' in sys.modules, rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert res.stdout.split() == ["False", "2"], res.stderr


def test_augment_wraps_the_trained_model(tmp_path, monkeypatch):
    import fdl.train
    from fdl.data import augment

    assert cli.AUGMENTATIONS == augment.SPEC_NAMES

    class Stop(Exception):
        pass

    def fake_fit(model, *args, **kwargs):
        raise Stop(model)

    monkeypatch.setattr(fdl.train, "fit", fake_fit)
    argv = [*TRAIN, "--output", str(tmp_path / "runs")]
    with pytest.raises(Stop) as plain:
        cli.main(argv)
    with pytest.raises(Stop) as aug:
        cli.main([*argv, "--augment", "flip,crop"])
    assert "augmented" not in plain.value.args[0].config
    assert aug.value.args[0].config["augmented"] is True


@pytest.mark.slow  # a CLI run and its eval: ~16 s on the shared machine
def test_augment_trains_on_augmented_batches_and_evaluates_the_plain_model(
        tmp_path, capsys, monkeypatch):
    from fdl.data import augment

    wrapped = []
    real = augment.augmented

    def spy(model, aug):
        wrapped.append(aug)
        return real(model, aug)

    monkeypatch.setattr(augment, "augmented", spy)
    out = str(tmp_path / "runs")
    assert cli.main([*TRAIN, "--augment", "crop", "--output", out]) == 0
    assert len(wrapped) == 1  # the trained model is the augmented one
    text = capsys.readouterr().out
    run = text.split("run:        ")[1].split("\n")[0]
    import json

    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["augment"] == "crop"
    assert _acc(text) > 0.5
    assert cli.main(["eval", run]) == 0  # the checkpoint loads into the plain model


def test_predict_on_bad_image_files(first_run, tmp_path, capsys):
    _, run, _ = first_run
    (tmp_path / "notes.png").write_text("not an image")
    assert cli.main(["predict", run, str(tmp_path / "notes.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "notes.png" in err and err.count("\n") == 1
    assert cli.main(["predict", run, str(tmp_path / "missing.png")]) == 2
    assert "missing.png' does not exist" in capsys.readouterr().err


def test_data_dir_is_the_folder_with_the_files(tmp_path, monkeypatch, capsys):
    import struct
    import urllib.error
    import urllib.request

    def idx(arr):
        return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
            arr.tobytes()

    rng = np.random.default_rng(0)
    d = tmp_path / "data" / "mnist"
    d.mkdir(parents=True)
    for prefix, n in (("train", 5), ("t10k", 3)):
        (d / f"{prefix}-images-idx3-ubyte").write_bytes(
            idx(rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)))
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(np.arange(n, dtype=np.uint8)))
    (xtr, _), (xte, _), k = cli.load_dataset("mnist", str(d), None)  # README: the folder itself
    assert xtr.shape == (5, 28, 28, 1) and xte.shape == (3, 28, 28, 1) and k == 10
    (xtr, _), _, _ = cli.load_dataset("mnist", str(tmp_path / "data"), None)  # or its parent
    assert xtr.shape == (5, 28, 28, 1)

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    missing = tmp_path / "nowhere" / "mnist"
    assert cli.main(["train", "--data", "mnist", "--data-dir", str(missing), "--output",
                     str(tmp_path / "out")]) == 2
    assert f"looked in directory '{missing}'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no empty folders left behind


def test_eval_refuses_other_models_checkpoint(tmp_path, capsys):
    from fdl.train import checkpoint

    path = str(tmp_path / "ckpt_00000001.safetensors")
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
    assert _acc(out) >= 0.97
