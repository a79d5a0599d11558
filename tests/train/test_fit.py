"""fit: resume == uninterrupted (bitwise), Ctrl-C keeps the checkpoint, logging, plots,
early stopping, bad input."""

import json
import os

import jax
import numpy as np
import pytest

from fdl import optim
from fdl.data import ArrayLoader
from fdl.testing import count_compilations
from fdl.train import EarlyStopping, checkpoint, fit, make_eval_step, make_train_step
from fdl.train.device_loop import calls, device_eval, device_steps

from .helpers import blobs, init, leaves_equal, tiny_mlp

MODEL = tiny_mlp(dropout=0.3)
OPT = optim.adam(0.05)
TRAIN = blobs(20, seed=1)
TEST = blobs(12, seed=2)
STEP = make_train_step(MODEL, OPT)
EVAL = make_eval_step(MODEL)


def _run(**kw):
    params, state = init(MODEL)
    base = dict(epochs=3, key=jax.random.key(7), eval_data=TEST, batch_size=8, progress=False,
                print_fn=None, train_step=STEP, eval_step=EVAL)
    base.update(kw)
    return fit(MODEL, params, state, OPT, TRAIN, **base)


def _numbers(history):
    keys = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc")
    return [{k: r.get(k) for k in keys} for r in history.rows]


@pytest.mark.parametrize("device_loop", [True, False], ids=["indexed-step", "host-batches"])
def test_resume_equals_uninterrupted_bitwise(tmp_path, monkeypatch, device_loop):
    if not device_loop:  # the per-batch host path (data-parallel steps, own step functions)
        monkeypatch.setattr(ArrayLoader, "indexable_on_device", property(lambda self: False))
    ref = _run(checkpoint_dir=str(tmp_path / "a"))

    class Stop(KeyboardInterrupt):
        pass

    def interrupt(step, metrics):
        if step == 5:  # mid-epoch 2 (3 batches per epoch), after the step-4 checkpoint
            raise Stop()

    lines = []
    with pytest.raises(KeyboardInterrupt):
        _run(checkpoint_dir=str(tmp_path / "b"), checkpoint_every_steps=2, callback=interrupt,
             print_fn=lines.append)
    assert any("last checkpoint is intact" in line and "ckpt_00000004" in line for line in lines)
    assert checkpoint.latest(tmp_path / "b").endswith("ckpt_00000004.safetensors")
    resumed = _run(checkpoint_dir=str(tmp_path / "b"), checkpoint_every_steps=2, resume=True)
    assert resumed.steps == ref.steps == 9
    assert leaves_equal(resumed.params, ref.params)
    assert leaves_equal(resumed.state, ref.state)
    assert leaves_equal(resumed.opt_state, ref.opt_state)
    assert _numbers(resumed.history) == _numbers(ref.history)


def test_resume_from_epoch_checkpoint_and_extend(tmp_path):
    ref = _run(epochs=3)
    _run(epochs=2, checkpoint_dir=str(tmp_path))
    cont = _run(epochs=3, checkpoint_dir=str(tmp_path), resume=True)
    assert leaves_equal(cont.params, ref.params)
    assert _numbers(cont.history) == _numbers(ref.history)


def test_logging_plot_history(tmp_path):
    log = tmp_path / "log.jsonl"
    png = tmp_path / "curve.png"
    lines = []
    res = _run(log_file=str(log), plot=str(png), log_every=2, print_fn=lines.append,
               progress=True)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert any(r["type"] == "step" for r in recs)
    assert png.exists() and png.stat().st_size > 1000
    assert len(lines) == 3 and "test acc" in lines[0]
    assert res.history["test_acc"][-1] == epochs[-1]["test_acc"]
    assert 0.0 <= res.history["test_acc"][-1] <= 1.0
    assert res.history.last["lr"] == pytest.approx(0.05)


def test_training_learns():
    res = _run(epochs=8)
    assert res.history["train_loss"][-1] < res.history["train_loss"][0]
    assert res.history["test_acc"][-1] >= 0.75


def test_early_stopping():
    res = _run(epochs=30, early_stopping=EarlyStopping("train_loss", patience=1, min_delta=10.0))
    assert res.stopped_early and len(res.history) == 2


def test_loader_input_and_params_not_donated():
    params, state = init(MODEL)
    loader = ArrayLoader(TRAIN, 8, key=jax.random.key(3), last_batch="drop")
    res = fit(MODEL, params, state, OPT, loader, epochs=1, key=jax.random.key(0),
              progress=False, print_fn=None, train_step=STEP)
    assert res.steps == 2
    np.asarray(jax.tree.leaves(params)[0])  # the caller's arrays are still alive


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        _run(epochs=0)
    with pytest.raises(ValueError, match="larger than the dataset"):
        _run(batch_size=100)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        _run(resume=True)
    lines = []
    res = _run(epochs=1, checkpoint_dir=str(tmp_path / "none"), resume=True,
               print_fn=lines.append)
    assert "starting from scratch" in lines[0] and res.checkpoint is not None
    other = tiny_mlp(dropout=0.0, bn=False)
    p2, s2 = init(other)
    with pytest.raises(checkpoint.CheckpointError, match="bn1"):
        fit(other, p2, s2, OPT, TRAIN, epochs=1, key=jax.random.key(7), batch_size=8,
            progress=False, print_fn=None, checkpoint_dir=str(tmp_path / "none"), resume=True)
    assert os.path.exists(res.checkpoint)


def test_device_path_matches_host_batches_one_compile(monkeypatch):
    """The device path (batch gather, key and metric sums compiled into a loop of steps) gives
    the numbers of the per-batch host path, and later calls, epochs and other numbers of steps
    per call do not recompile."""
    step = make_train_step(MODEL, OPT)
    fast = _run(train_step=step, eval_data=None)
    run = device_steps(step).run
    with count_compilations(run) as compiled:
        _run(train_step=step, eval_data=None, epochs=2)
        _run(train_step=step, eval_data=None, epochs=2, steps_per_call=2)
    assert compiled == []
    with monkeypatch.context() as m:
        m.setattr(ArrayLoader, "indexable_on_device", property(lambda self: False))
        slow = _run(train_step=step, eval_data=None)
    for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(slow.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for ra, rb in zip(fast.history.rows, slow.history.rows, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["train_acc"] == rb["train_acc"]


@pytest.mark.parametrize("batch_size", [4, 5, 12])  # 12 examples: full, padded, one batch
def test_device_evaluation_is_bitwise_the_host_loop(monkeypatch, batch_size):
    from fdl.train import evaluate

    params, state = init(MODEL)
    step = make_eval_step(MODEL)
    fast = evaluate(params, state, TEST, eval_step=step, batch_size=batch_size)
    run = device_eval(step).run
    with count_compilations(run) as compiled:
        evaluate(params, state, TEST, eval_step=step, batch_size=batch_size)
    assert compiled == []
    with monkeypatch.context() as m:
        m.setattr(ArrayLoader, "indexable_on_device", property(lambda self: False))
        slow = evaluate(params, state, TEST, eval_step=step, batch_size=batch_size)
    assert fast == slow and {"loss", "acc"} <= set(fast)
    assert "perplexity" not in fast  # a classifier has none (issue 16)


def test_calls_end_where_fit_logs_or_checkpoints():
    assert calls(0, 7, 7, []) == [7]
    assert calls(0, 7, 3, []) == [3, 3, 1]
    assert calls(5, 7, 100, [4]) == [3, 4]  # steps 5..11: calls end at steps 8 and 12
    assert calls(5, 7, 2, [4, 6]) == [1, 2, 2, 2]  # ends at 6, 8, 10, 12
    assert calls(3, 0, 5, [2]) == []


@pytest.mark.parametrize("per_call", [1, 2, 4])
def test_steps_per_call_is_bitwise_the_same(tmp_path, per_call):
    """Any number of steps per compiled call (one executable with a run-time trip count)
    trains bitwise the same as the default (a whole epoch per call), with step logs and step
    checkpoints at the same steps."""
    kw = dict(eval_data=None, batch_size=4, log_every=3, checkpoint_every_steps=4)  # 5 batches
    default = _run(**kw, log_file=str(tmp_path / "a.jsonl"), checkpoint_dir=str(tmp_path / "a"))
    chunked = _run(**kw, log_file=str(tmp_path / "b.jsonl"), checkpoint_dir=str(tmp_path / "b"),
                   steps_per_call=per_call)
    assert leaves_equal(chunked.params, default.params)
    assert leaves_equal(chunked.opt_state, default.opt_state)
    assert _numbers(chunked.history) == _numbers(default.history)
    untimed = ("time", "examples_per_sec")
    logs = [[{k: v for k, v in json.loads(line).items() if k not in untimed}
             for line in open(tmp_path / f"{n}.jsonl")] for n in "ab"]
    assert logs[0] == logs[1]
    steps = [[r["step"] for r in log if r["type"] == "step"] for log in logs]
    assert steps[0] == steps[1] == [3, 6, 9, 12, 15]
    saved = [sorted(os.listdir(tmp_path / n)) for n in "ab"]
    assert saved[0] == saved[1]


def test_callback_runs_once_per_call():
    seen = []
    res = _run(eval_data=None, batch_size=4, epochs=2, steps_per_call=2,
               callback=lambda step, metrics: seen.append(step))
    assert res.steps == 10 and seen == [2, 4, 5, 7, 9, 10]  # 5 batches per epoch
    seen.clear()
    _run(eval_data=None, batch_size=4, epochs=1, callback=lambda step, m: seen.append(step))
    assert seen == [1, 2, 3, 4, 5]  # a callback alone means one step per call


def test_epochs_finished_after_the_next_epochs_first_step_change_nothing(tmp_path):
    """Without early stopping or an epoch-end checkpoint, an epoch's row is fetched after the
    next epoch's first step is dispatched; the numbers are those of finishing it at once
    (forced here by a checkpoint at every epoch end)."""
    for device_loop in (True, False):
        with pytest.MonkeyPatch.context() as m:
            if not device_loop:
                m.setattr(ArrayLoader, "indexable_on_device", property(lambda self: False))
            lagged = _run(epochs=3)
            at_once = _run(epochs=3, checkpoint_dir=str(tmp_path / str(device_loop)))
        assert leaves_equal(lagged.params, at_once.params)
        assert _numbers(lagged.history) == _numbers(at_once.history)
        for row in lagged.history.rows:
            assert row["examples_per_sec"] > 0 and row["time"] > 0
            assert row["lr"] == pytest.approx(0.05)


def test_callback_stop_keeps_the_finished_epochs_row():
    def stop(step, metrics):
        if step == 4:  # the first step of epoch 2 (3 batches per epoch)
            raise StopIteration

    res = _run(epochs=3, callback=stop)
    assert res.steps == 4 and [r["epoch"] for r in res.history.rows] == [1]
    assert res.history.rows[0]["step"] == 3


def test_epoch_metrics_are_fetched_after_the_next_epochs_first_step(monkeypatch):
    step_fn = make_train_step(MODEL, OPT)
    _run(train_step=step_fn, eval_data=None, epochs=1)  # builds the fused step
    loop = device_steps(step_fn)
    run = loop.run
    calls, fetched_at = [0], []

    def counting(*args):
        calls[0] += 1
        return run(*args)

    real_get = jax.device_get

    def device_get(x):
        fetched_at.append(calls[0])
        return real_get(x)

    monkeypatch.setattr(loop, "run", counting)
    monkeypatch.setattr(jax, "device_get", device_get)
    res = _run(train_step=step_fn, eval_data=None, epochs=2, steps_per_call=1)
    assert res.steps == 6
    assert fetched_at[0] == 4  # epoch 1's sums: after epoch 2's first step was dispatched
    calls[0], fetched_at[:] = 0, []
    res = _run(train_step=step_fn, eval_data=None, epochs=2)  # one call per epoch
    assert res.steps == 6 and calls[0] == 2
    assert fetched_at[0] == 2


def test_host_batches_in_one_call_per_step_equal_the_plain_callable(monkeypatch):
    """Host batches with a TrainStep run step, key and metric sum in one compiled call
    (HostSteps); a plain callable (e.g. a sharded step) gets fold_in and a jitted sum: the
    same numbers, bitwise."""
    monkeypatch.setattr(ArrayLoader, "indexable_on_device", property(lambda self: False))
    step = make_train_step(MODEL, OPT)
    one_call = _run(train_step=step, eval_data=None)
    plain = _run(train_step=lambda *a: step.call(*a), eval_data=None)
    assert leaves_equal(one_call.params, plain.params)
    assert leaves_equal(one_call.opt_state, plain.opt_state)
    assert _numbers(one_call.history) == _numbers(plain.history)
