"""``fdl train --num-processes N``: N processes over loopback train one run; process 0 alone
prints, logs and writes; the run resumes with another number of processes; bad
combinations are refused before anything starts."""

import json
import os

import pytest

from fdl import cli

from . import procs

pytest.importorskip("sklearn")

TRAIN = ["-m", "fdl.cli", "train", "softmax", "--batch-size", "64", "--lr", "0.05",
         "--no-progress"]


def _acc(out: str) -> float:
    return float(out.split("done: test accuracy ")[1].split(",")[0])


def test_two_processes_train_one_run_and_resume_with_one(tmp_path):
    out = str(tmp_path / "runs")
    text = procs.run([*TRAIN, "--epochs", "1", "--num-processes", "2", "--devices", "2",
                      "--output", out], 300)
    assert "4 device(s) in 2 processes" in text
    assert text.count("epoch 1, train loss") == 1  # process 0 only
    assert text.count("done: test accuracy") == 1
    (model_dir,) = os.listdir(out)
    runs = [n for n in os.listdir(os.path.join(out, model_dir)) if n != "latest"]
    assert len(runs) == 1  # one run folder for the two processes
    run = os.path.join(out, model_dir, runs[0])
    files = sorted(os.listdir(run))
    assert "config.json" in files and "log.jsonl" in files and "curve.png" in files
    assert [f for f in files if f.startswith("ckpt_")] == ["ckpt_00000023.safetensors"]
    with open(os.path.join(run, "log.jsonl")) as f:
        epochs = [json.loads(line) for line in f if '"epoch"' in line]
    assert [r["epoch"] for r in epochs if r.get("type") == "epoch"] == [1]
    # resumed by one process on one device: the second epoch of the same run
    resumed = procs.run([*TRAIN, "--epochs", "2", "--resume", run], 300)
    assert "epoch 2, train loss" in resumed and "epoch 1, train loss" not in resumed
    assert sorted(f for f in os.listdir(run) if f.startswith("ckpt_"))[-1] == \
        "ckpt_00000046.safetensors"
    assert 0.5 < _acc(resumed) <= 1  # (equality with one process: test_multiprocess.py)


@pytest.mark.parametrize("argv, message", [
    (["--num-processes", "2", "--devices", "3"], "must be a multiple of the 6 devices"),
    (["--num-processes", "0"], "--num-processes must be >= 1"),
    (["--num-processes", "2", "--coordinator", "h:1"], "missing this process's id"),
    (["--coordinator", "nohost", "--process-id", "0", "--num-processes", "2"], "host:port"),
    (["--heartbeat-timeout", "0"], "--heartbeat-timeout must be >= 1"),
])
def test_bad_multiprocess_arguments(argv, message, capsys, tmp_path):
    assert cli.main(["train", "softmax", "--output", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
