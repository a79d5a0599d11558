"""Run folders: unique names, the 'latest' pointer (symlink or one-line file), resolving model
folders, run folders, checkpoint files and the older <run>/checkpoints/ layout."""

import os

import pytest

from fdl import runs


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def test_new_runs_get_distinct_folders_and_latest_follows(tmp_path):
    model = str(tmp_path / "cnn_digits")
    a = runs.new_run(model, now=0)
    b = runs.new_run(model, now=0)  # same second: a numbered suffix
    assert os.path.basename(a) == "1970-01-01T00-00-00" and b == a + "-2"
    assert runs.latest_run(model) == os.path.realpath(b)
    _touch(os.path.join(b, "ckpt_00000001.safetensors"))
    assert runs.resolve_run(model) == (os.path.realpath(b), os.path.realpath(b))


def test_latest_as_a_file_and_without_a_pointer(tmp_path):
    model = tmp_path / "m"
    for name in ("2026-01-01T00-00-00", "2026-01-02T00-00-00"):
        _touch(str(model / name / "log.jsonl"))
    assert runs.latest_run(str(model)) == str(model / "2026-01-02T00-00-00")
    (model / "latest").write_text("2026-01-01T00-00-00\n")
    assert runs.latest_run(str(model)) == str(model / "2026-01-01T00-00-00")


def test_resolve_files_legacy_layout_and_errors(tmp_path):
    legacy = tmp_path / "softmax_digits"
    _touch(str(legacy / "log.jsonl"))
    _touch(str(legacy / "checkpoints" / "ckpt_00000012.safetensors"))
    assert runs.resolve_run(str(legacy)) == (str(legacy), str(legacy / "checkpoints"))
    ck = str(legacy / "checkpoints" / "ckpt_00000012.safetensors")
    assert runs.resolve_run(ck) == (str(legacy), ck)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run in"):
        runs.resolve_run(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runs.resolve_run(str(tmp_path / "nope"))


def test_clear_run_removes_only_run_files(tmp_path):
    run = tmp_path / "r"
    for name in ("config.json", "log.jsonl", "curve.png", "ckpt_00000001.safetensors",
                 "notes.txt"):
        _touch(str(run / name))
    gone = runs.clear_run(str(run))
    assert len(gone) == 4 and os.listdir(run) == ["notes.txt"]
