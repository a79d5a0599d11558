"""Running worker processes with a hard time limit (never collected by pytest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "worker.py")


def env(**extra) -> dict[str, str]:
    """The test process's environment for a worker: fdl importable, CPU only, no distributed
    variables inherited."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("FDL_")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["JAX_PLATFORMS"] = "cpu"
    e["FDL_HEARTBEAT_TIMEOUT"] = "5"
    e["FDL_INIT_TIMEOUT"] = "60"
    e["FDL_SHUTDOWN_TIMEOUT"] = "20"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def start(args: list[str], **extra) -> subprocess.Popen:
    """Start ``python args...`` in a session of its own (so it and its children can be killed
    together), output captured."""
    return subprocess.Popen([sys.executable, *args], env=env(**extra), cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for ``proc`` at most ``timeout`` s; on expiry kill its whole session and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s; output:\n{out}") from None
    return proc.returncode, out


def kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(args: list[str], timeout: float, **extra) -> str:
    """Run to completion; assert success; return the output."""
    code, out = finish(start(args, **extra), timeout)
    assert code == 0, f"exit status {code}; output:\n{out}"
    return out


def launch(n: int, devices: int, worker_args: list[str], timeout: float, **extra) -> str:
    return run(["-m", "fdl.launch", "-n", str(n), "--cpu-devices", str(devices), WORKER,
                *worker_args], timeout, **extra)


def single(devices: int, worker_args: list[str], timeout: float) -> str:
    return run([WORKER, *worker_args, "--single", str(devices)], timeout)


def load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_close(a: dict, b: dict, rtol=2e-5, atol=2e-6, what="") -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what}: {k}")


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """Read ``proc``'s output until a line containing ``text`` (at most ``timeout`` s)."""
    import select
    import time

    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if text in line:
                return line
    kill_session(proc)
    raise AssertionError(f"no line with {text!r} within {timeout} s; output:\n{''.join(seen)}")
