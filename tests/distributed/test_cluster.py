"""Reading a process's place in a run (arguments, fdl.launch variables, SLURM), timeouts, the
launcher's environment, and batch placement checks: pure functions, no processes."""

import jax
import numpy as np
import pytest

from fdl import parallel
from fdl.distributed import ClusterConfigError, ClusterSpec, Timeouts, detect_cluster
from fdl.distributed.cluster import first_slurm_host, parse_address
from fdl.launch import child_env


def test_single_process_needs_nothing():
    assert detect_cluster({}) is None
    assert detect_cluster({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert detect_cluster({"FDL_NUM_PROCESSES": "1"}) is None


def test_launcher_variables():
    env = {"FDL_COORDINATOR_ADDRESS": "10.0.0.1:1234", "FDL_NUM_PROCESSES": "4",
           "FDL_PROCESS_ID": "3"}
    assert detect_cluster(env) == ClusterSpec("10.0.0.1:1234", 4, 3, detect_cluster(env).source)


def test_arguments_win_over_environment():
    env = {"FDL_COORDINATOR_ADDRESS": "a:1", "FDL_NUM_PROCESSES": "4", "FDL_PROCESS_ID": "3"}
    spec = detect_cluster(env, coordinator_address="b:2", num_processes=2, process_id=1)
    assert (spec.host, spec.port, spec.num_processes, spec.process_id) == ("b", 2, 2, 1)


def test_slurm():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[017-020,031],cpu1"}
    spec = detect_cluster(env)
    assert spec.coordinator_address == f"gpu017:{61440 + 4242 % 4096}"
    assert (spec.num_processes, spec.process_id, spec.source) == (8, 5, "SLURM")
    assert detect_cluster({**env, "FDL_COORDINATOR_PORT": "9999"}).port == 9999


@pytest.mark.parametrize("nodes, host", [("node1", "node1"), ("node1,node2", "node1"),
                                         ("n[3-6]", "n3"), ("n[007,9-12],x", "n007")])
def test_first_slurm_host(nodes, host):
    assert first_slurm_host(nodes) == host


@pytest.mark.parametrize("env, message", [
    ({"FDL_NUM_PROCESSES": "2"}, "missing the coordinator address, this process's id"),
    ({"FDL_NUM_PROCESSES": "2", "FDL_PROCESS_ID": "0"}, "missing the coordinator address"),
    ({"FDL_COORDINATOR_ADDRESS": "h:1", "FDL_NUM_PROCESSES": "2", "FDL_PROCESS_ID": "2"},
     "process id must be an integer in 0..1"),
    ({"FDL_COORDINATOR_ADDRESS": "h:1", "FDL_NUM_PROCESSES": "0", "FDL_PROCESS_ID": "0"},
     "number of processes must be an integer >= 1"),
    ({"FDL_COORDINATOR_ADDRESS": "h", "FDL_NUM_PROCESSES": "2", "FDL_PROCESS_ID": "0"},
     "host:port"),
    ({"FDL_COORDINATOR_ADDRESS": "h:1", "FDL_NUM_PROCESSES": "two", "FDL_PROCESS_ID": "0"},
     "FDL_NUM_PROCESSES must be an integer"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "SLURM_STEP_NODELIST"),
])
def test_incomplete_or_wrong_descriptions_are_refused(env, message):
    with pytest.raises(ClusterConfigError, match=message.replace("(", r"\(")):
        detect_cluster(env)


def test_addresses():
    assert parse_address("[::1]:80") == ("::1", 80)
    with pytest.raises(ClusterConfigError, match="1..65535"):
        parse_address("h:70000")


def test_timeouts_from_env_and_overrides():
    t = Timeouts.from_env({"FDL_HEARTBEAT_TIMEOUT": "7"}, init=9, shutdown=None)
    assert (t.heartbeat, t.init, t.shutdown) == (7, 9, Timeouts().shutdown)
    with pytest.raises(ClusterConfigError, match="heartbeat timeout"):
        Timeouts(heartbeat=0)


def test_child_env_sets_the_protocol_and_replaces_the_device_count():
    env = child_env(1, 2, "127.0.0.1:5", cpu_devices=4, timeouts={"heartbeat": 3, "init": None},
                    base={"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert (env["FDL_PROCESS_ID"], env["FDL_NUM_PROCESSES"]) == ("1", "2")
    assert env["FDL_HEARTBEAT_TIMEOUT"] == "3" and "FDL_INIT_TIMEOUT" not in env
    assert detect_cluster(env).coordinator_address == "127.0.0.1:5"


def test_launcher_refuses_bad_counts():
    from fdl.launch import launch

    with pytest.raises(ValueError, match="integer >= 1"):
        launch(["true"], 0)


def test_batch_not_divisible_by_the_devices_is_refused():
    """A global batch must split evenly over the devices (the loader pads only the last batch
    of an epoch, to the full batch size)."""
    from fdl.data import ArrayLoader

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = parallel.data_mesh()
    x = np.zeros((20, 3), np.float32)
    with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 devices"):
        parallel.shard_batch((x[:12],), mesh)
    loader = ArrayLoader((x,), 12, device_put=parallel.batch_sharding(mesh))
    with pytest.raises(ValueError, match="12 rows does not split over the 8 devices"):
        next(iter(loader))
    assert parallel.process_rows(parallel.batch_sharding(mesh), 16) is None  # one process


def test_a_launched_process_that_did_not_join_cannot_build_a_mesh(monkeypatch):
    monkeypatch.setenv("FDL_NUM_PROCESSES", "2")
    with pytest.raises(RuntimeError, match="call fdl.distributed.initialize"):
        parallel.data_mesh()


def test_launcher_names_the_killed_process_when_its_partner_ended_too(monkeypatch):
    """Both processes have ended by the launcher's next poll (process 1 killed, process 0
    exited on noticing): the killed one is named as the cause, the other after it."""
    import sys
    import time

    from fdl import launch

    sleep = time.sleep
    monkeypatch.setattr(launch.time, "sleep", lambda s: sleep(1.0))  # a slow poll
    script = ("import os, signal, time\n"
              "if os.environ['FDL_PROCESS_ID'] == '1': os.kill(os.getpid(), signal.SIGKILL)\n"
              "time.sleep(0.1)\nraise SystemExit(1)")
    said = []
    code = launch.launch([sys.executable, "-c", script], 2, print_fn=said.append)
    assert code == 128 + 9
    assert said == [f"fdl.launch: process 1 of 2 (pid {said[0].split('pid ')[1].split(')')[0]}) "
                    "was killed by SIGKILL; process 0 then exited with status 1"]
