"""Multi-process data parallelism over loopback (``jax.distributed``, gloo collectives on
simulated CPU devices): the same numbers as one process, resuming across process and device
counts, and bounded failure. Every subprocess has a hard time limit (``procs.finish``)."""

import os
import signal
import time

import pytest

from . import procs

# generous: the 2-core test machines are shared; a healthy run takes a fraction of this
LIMIT = 240


def test_two_processes_equal_one_process_and_one_device(tmp_path):
    """2 processes x 4 devices == 1 process x 8 devices == 1 device with the full batch, after
    an epoch of 7 steps (BatchNorm over the global batch, dropout, a padded last batch whose 4
    real rows all sit in process 0), each process loading only its rows. Also SyncBatchNorm
    under shard_map over the 8 devices of 2 processes with unequal real rows per device
    == batch_norm on the real rows on one device, and 3 pmap steps (BatchNorm with
    ``axis_name``) == the plain step (``checks[...]`` entries)."""
    out = {name: str(tmp_path / f"{name}.npz") for name in ("p2x4", "p1x8", "p1x1")}
    runs = [
        procs.start(["-m", "fdl.launch", "-n", "2", "--cpu-devices", "4", procs.WORKER,
                     "steps", out["p2x4"]]),
        procs.start([procs.WORKER, "steps", out["p1x8"], "--single", "8"]),
        procs.start([procs.WORKER, "steps", out["p1x1"], "--single", "1", "--one-device"]),
    ]
    for p in runs:
        code, text = procs.finish(p, LIMIT)
        assert code == 0, text
    two, eight, one = (procs.load(out[k]) for k in ("p2x4", "p1x8", "p1x1"))
    assert two["metrics['count']"] == 7 * 16 - 12  # the padding (12 rows) is not counted
    assert any(k.startswith("checks['sync_bn']") for k in two)
    assert any(k.startswith("checks['pmap']") for k in two)
    procs.assert_close(two, eight, what="2x4 vs 1x8")
    procs.assert_close(two, one, what="2x4 vs 1 device")


def test_resume_with_another_process_and_device_count(tmp_path):
    """Epoch 1 on 2 processes x 2 devices, epoch 2 resumed from its checkpoint by 1 process
    with 4 devices: the same parameters as 2 uninterrupted epochs on one device."""
    ckpt, ref_ckpt = str(tmp_path / "ckpt"), str(tmp_path / "ref_ckpt")
    first, resumed, ref = (str(tmp_path / f"{n}.npz") for n in ("first", "resumed", "ref"))
    runs = [
        procs.start(["-m", "fdl.launch", "-n", "2", "--cpu-devices", "2", procs.WORKER, "fit",
                     first, "--ckpt", ckpt, "--epochs", "1"]),
        procs.start([procs.WORKER, "fit", ref, "--ckpt", ref_ckpt, "--epochs", "2",
                     "--single", "1", "--one-device"]),
    ]
    for p in runs:
        code, text = procs.finish(p, LIMIT)
        assert code == 0, text
    assert sorted(os.listdir(ckpt)) == ["ckpt_00000006.safetensors", "ckpt_00000007.safetensors"]
    text = procs.single(4, ["fit", resumed, "--ckpt", ckpt, "--epochs", "2", "--resume"], LIMIT)
    assert "resumed from" in text and "(step 7, " in text
    a, b = procs.load(resumed), procs.load(ref)
    assert int(a["metrics['steps']"]) == int(b["metrics['steps']"]) == 14
    procs.assert_close(a, b, what="resumed 2x2 -> 1x4 vs 1 device")


def test_killed_process_stops_the_run_and_a_restart_resumes(tmp_path):
    """SIGKILL one of two launched processes mid-training: the launcher names it and stops the
    other at once; relaunched with resume, the run continues from the last checkpoint to the
    parameters of an uninterrupted run."""
    ckpt, pidfile = str(tmp_path / "ckpt"), str(tmp_path / "pid")
    out, ref = str(tmp_path / "out.npz"), str(tmp_path / "ref.npz")
    reference = procs.start([procs.WORKER, "fit", ref, "--ckpt", str(tmp_path / "ref_ckpt"),
                             "--epochs", "2", "--single", "1", "--one-device"])
    run = procs.start(["-m", "fdl.launch", "-n", "2", "--cpu-devices", "2", procs.WORKER,
                       "fit", out, "--ckpt", ckpt, "--epochs", "2", "--sleep", "0.5",
                       "--pidfile", pidfile])
    try:
        deadline = time.monotonic() + LIMIT
        while not (os.path.exists(pidfile + ".1") and os.path.isdir(ckpt) and os.listdir(ckpt)):
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        with open(pidfile + ".1") as f:
            os.kill(int(f.read()), signal.SIGKILL)
        t0 = time.monotonic()
        code, text = procs.finish(run, 60)
    finally:
        procs.kill_session(run)
    assert time.monotonic() - t0 < 30
    assert code != 0
    assert "process 1 of 2" in text and "SIGKILL" in text
    # process 0 is stopped by the launcher, or has already noticed by the launcher's next poll
    assert "stopping the other 1" in text or "; process 0 then exited with status" in text, text
    assert not os.path.exists(out)
    text = procs.launch(2, 2, ["fit", out, "--ckpt", ckpt, "--epochs", "2", "--resume"], LIMIT)
    assert "resumed from" in text
    code, text = procs.finish(reference, LIMIT)
    assert code == 0, text
    procs.assert_close(procs.load(out), procs.load(ref), what="killed+resumed vs 1 device")


def test_killed_process_without_launcher_fails_the_others_within_the_heartbeat(tmp_path):
    """As on a cluster (no launcher): after SIGKILL of process 1, process 0 stops within the
    heartbeat timeout (5 s here) with the runtime's message, instead of hanging."""
    from fdl.launch import free_port

    common = {"FDL_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "FDL_NUM_PROCESSES": 2,
              "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    p0 = procs.start([procs.WORKER, "idle", "-"], FDL_PROCESS_ID=0, **common)
    p1 = procs.start([procs.WORKER, "idle", "-"], FDL_PROCESS_ID=1, **common)
    try:
        procs.wait_for_line(p1, "ready", LIMIT)
        p1.kill()
        t0 = time.monotonic()
        code, text = procs.finish(p0, 60)
        elapsed = time.monotonic() - t0
    finally:
        procs.kill_session(p0)
        procs.kill_session(p1)
    assert code != 0
    assert "another task died" in text or "stopped sending heartbeats" in text, text
    assert elapsed < 5 + 25, elapsed


def test_sigterm_to_the_launcher_stops_every_process(tmp_path):
    pidfile = str(tmp_path / "pid")
    run = procs.start(["-m", "fdl.launch", "-n", "2", "--cpu-devices", "1", "--grace", "2",
                       procs.WORKER, "idle", "-", "--pidfile", pidfile])
    try:
        procs.wait_for_line(run, "ready", LIMIT)
        while not all(os.path.exists(f"{pidfile}.{i}") for i in (0, 1)):
            time.sleep(0.1)
        pids = [int(open(f"{pidfile}.{i}").read()) for i in (0, 1)]
        run.send_signal(signal.SIGTERM)
        code, text = procs.finish(run, 60)
    finally:
        procs.kill_session(run)
    assert code == 128 + signal.SIGTERM, text
    assert "terminated (SIGTERM); stopping every process" in text
    for pid in pids:  # both workers are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("case", ["unreachable", "mismatched"])
def test_bad_cluster_input_is_a_clear_error(tmp_path, case):
    from fdl.launch import free_port

    address = f"127.0.0.1:{free_port()}"
    if case == "unreachable":  # process 1 of 2, nobody serving the coordinator
        p = procs.start([procs.WORKER, "idle", "-"], FDL_COORDINATOR_ADDRESS=address,
                        FDL_NUM_PROCESSES=2, FDL_PROCESS_ID=1, FDL_INIT_TIMEOUT=3)
        code, text = procs.finish(p, LIMIT)
        assert code != 0
        assert f"could not reach the coordinator at {address} within 3 s" in text, text
        return
    common = {"FDL_COORDINATOR_ADDRESS": address,
              "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    runs = [procs.start([procs.WORKER, "idle", "-"], FDL_NUM_PROCESSES=2, FDL_PROCESS_ID=0,
                        **common),
            procs.start([procs.WORKER, "idle", "-"], FDL_NUM_PROCESSES=3, FDL_PROCESS_ID=1,
                        **common)]
    try:
        for p in runs:
            code, text = procs.finish(p, LIMIT)
            assert code != 0
            assert "disagree on the number of processes (process 0: 2, process 1: 3" in text
    finally:
        for p in runs:
            procs.kill_session(p)
