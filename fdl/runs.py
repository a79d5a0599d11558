"""Run folders: every training run writes into a folder of its own, so no run clobbers another.

Layout (what ``fdl train`` writes)::

    runs/cnn_digits/                     the model folder: one per model and dataset
        latest -> 2026-12-02T07-01-33    a symlink (or a one-line file) naming the newest run
        2026-12-02T07-01-33/             a run folder
            config.json                  the command line and the resolved settings
            log.jsonl  curve.png         the run's log and training curve
            ckpt_00000023.safetensors    its checkpoints

A run folder is named by its start time (UTC), with ``-2``, ``-3``... if that name is taken.
:func:`resolve_run` accepts a model folder (its ``latest`` run), a run folder (also the
``<run>/checkpoints/`` layout of older fdl versions) or a checkpoint file. Nothing here imports
JAX.
"""

from __future__ import annotations

import contextlib
import os
import time

__all__ = ["RUN_FILES", "new_run", "latest_run", "set_latest", "resolve_run", "clear_run",
           "run_files", "checkpoint_dir_of"]

# What a run writes besides its checkpoints.
RUN_FILES = ("config.json", "log.jsonl", "curve.png")
_LATEST = "latest"


def _is_ckpt(name: str) -> bool:
    return name.startswith("ckpt_") and name.endswith((".safetensors", ".npz"))


def checkpoint_dir_of(run_dir: str) -> str:
    """Where a run folder's checkpoints are: the folder itself, or ``checkpoints/`` inside it
    (the layout of older fdl versions) when only that has any."""
    sub = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(sub) and not _has_ckpts(run_dir) and _has_ckpts(sub):
        return sub
    return run_dir


def _has_ckpts(directory: str) -> bool:
    try:
        return any(_is_ckpt(n) for n in os.listdir(directory))
    except OSError:
        return False


def run_files(run_dir: str) -> list[str]:
    """The files of a run in ``run_dir`` (checkpoints, log, curve, config), if any."""
    if not os.path.isdir(run_dir):
        return []
    names = sorted(n for n in os.listdir(run_dir) if _is_ckpt(n) or n in RUN_FILES)
    sub = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(sub):
        names += [os.path.join("checkpoints", n) for n in sorted(os.listdir(sub)) if _is_ckpt(n)]
    return [os.path.join(run_dir, n) for n in names]


def clear_run(run_dir: str) -> list[str]:
    """Delete the run files of ``run_dir`` (for ``--overwrite``); returns what was deleted."""
    gone = run_files(run_dir)
    for path in gone:
        os.remove(path)
    return gone


def latest_run(model_dir: str) -> str | None:
    """The run folder ``model_dir/latest`` names, else the newest run folder (by name, i.e.
    start time), else ``None``."""
    link = os.path.join(model_dir, _LATEST)
    if os.path.islink(link):
        target = os.path.normpath(os.path.join(model_dir, os.readlink(link)))
        if os.path.isdir(target):
            return target
    elif os.path.isdir(link):
        return link
    elif os.path.isfile(link):
        with open(link) as f:
            target = os.path.join(model_dir, f.read().strip())
        if os.path.isdir(target):
            return target
    if not os.path.isdir(model_dir):
        return None
    runs = sorted(n for n in os.listdir(model_dir)
                  if n != _LATEST and os.path.isdir(os.path.join(model_dir, n))
                  and run_files(os.path.join(model_dir, n)))
    return os.path.join(model_dir, runs[-1]) if runs else None


def set_latest(model_dir: str, run_dir: str) -> None:
    """Point ``model_dir/latest`` at ``run_dir`` (atomically replaced)."""
    name = os.path.relpath(run_dir, model_dir)
    link = os.path.join(model_dir, _LATEST)
    tmp = os.path.join(model_dir, f".{_LATEST}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.symlink(name, tmp)
    except OSError:  # no symlinks here: a one-line file instead
        with open(tmp, "w") as f:
            f.write(name + "\n")
    if os.path.isdir(link) and not os.path.islink(link):
        os.remove(tmp)
        raise FileExistsError(f"'{link}' is a directory; cannot point it at the newest run")
    os.replace(tmp, link)


def new_run(model_dir: str, now: float | None = None) -> str:
    """Create a fresh run folder in ``model_dir`` named by the time, point ``latest`` at it
    and return its path (``OSError`` if the folder cannot be created)."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime(now))
    os.makedirs(model_dir, exist_ok=True)
    for i in range(1, 10_000):
        path = os.path.join(model_dir, stamp if i == 1 else f"{stamp}-{i}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        set_latest(model_dir, path)
        return path
    raise FileExistsError(f"too many runs named {stamp} in '{model_dir}'")


def resolve_run(path: str) -> tuple[str, str]:
    """``(run folder, checkpoint directory or file)`` for a model folder, a run folder or a
    checkpoint file; ``FileNotFoundError`` saying what was looked for."""
    if os.path.isfile(path):
        run = os.path.dirname(os.path.abspath(path))
        if os.path.basename(run) == "checkpoints" and run_files(os.path.dirname(run)):
            run = os.path.dirname(run)  # the older <run>/checkpoints/ layout
        return run, path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"'{path}' does not exist")
    has_latest = os.path.lexists(os.path.join(path, _LATEST))
    if run_files(path) and not has_latest:
        return path, checkpoint_dir_of(path)
    run = latest_run(path)
    if run is None:
        raise FileNotFoundError(
            f"no run in '{path}': expected a run folder with ckpt_<step>.safetensors files or "
            "a model folder (runs/<model>_<data>) with run folders")
    return run, checkpoint_dir_of(run)
