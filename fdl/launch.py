"""Start a multi-process run on this machine: ``python -m fdl.launch -n N program [args]``.

Starts ``N`` copies of ``program`` (a Python script, or ``-m module``), each told its place by
the variables ``FDL_COORDINATOR_ADDRESS`` (process 0 on ``127.0.0.1`` at a free port, or
``--port``), ``FDL_NUM_PROCESSES`` and ``FDL_PROCESS_ID``; the program calls
:func:`fdl.distributed.initialize` (``fdl train`` does) and the processes train as one
data-parallel job over loopback. ``--cpu-devices D`` gives every process ``D`` simulated CPU
devices (``--xla_force_host_platform_device_count``), so 2 processes x 4 devices make the
8-device mesh of a 2-host job on one CPU machine. ``fdl train --num-processes N`` calls this.

Every process writes to this terminal; fdl's training loop prints, logs and shows its
progress bar only in process 0.

Failure: as soon as one process ends with a non-zero status (an error, a signal, killed by
the kernel) the launcher says which one and how, stops the others (``SIGTERM``, then
``SIGKILL`` after ``--grace`` seconds) and exits with that status. Ctrl-C is passed to every
process (``fdl train`` then stops at a step boundary and prints how to resume); ``SIGTERM``
to the launcher (a scheduler's time limit) stops every process the same way. Without the
launcher (a cluster), the distributed runtime's heartbeat stops the others (see
:mod:`fdl.distributed`).

On a cluster, start one process per host (or per GPU) with the scheduler instead; see
``docs/distributed.md`` for SLURM.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

__all__ = ["launch", "free_port", "child_env", "main"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _with_cpu_devices(xla_flags: str, n: int) -> str:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", xla_flags).split()
    return " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])


def child_env(process_id: int, num_processes: int, address: str, *,
              cpu_devices: int | None = None, timeouts: Mapping[str, int | None] | None = None,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` (default ``os.environ``) plus the
    ``FDL_*`` variables of :mod:`fdl.distributed.cluster`."""
    env = dict(os.environ if base is None else base)
    env.update(FDL_COORDINATOR_ADDRESS=address, FDL_NUM_PROCESSES=str(num_processes),
               FDL_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    for name, value in (timeouts or {}).items():
        if value is not None:
            env[f"FDL_{name.upper()}_TIMEOUT"] = str(int(value))
    if cpu_devices is not None:
        env["XLA_FLAGS"] = _with_cpu_devices(env.get("XLA_FLAGS", ""), cpu_devices)
    return env


class _Terminated(Exception):
    """The launcher received SIGTERM."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stop(procs: list[subprocess.Popen], grace: float, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the running processes, wait up to ``grace`` s, then ``SIGKILL``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command: Sequence[str], num_processes: int, *, cpu_devices: int | None = None,
           port: int | None = None, timeouts: Mapping[str, int | None] | None = None,
           grace: float = 5.0, env: Mapping[str, str] | None = None,
           print_fn=None) -> int:
    """Run ``command`` (an argv list) as ``num_processes`` processes of one run on this
    machine and return the exit status (0 when every process succeeded; see the module
    docstring for failures). ``timeouts`` (``heartbeat``/``init``/``shutdown`` seconds) go to
    every process as ``FDL_*_TIMEOUT``."""
    if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
        raise ValueError(f"fdl.launch: the number of processes must be an integer >= 1, got "
                         f"{num_processes!r}")
    if cpu_devices is not None and (not isinstance(cpu_devices, int) or cpu_devices < 1):
        raise ValueError(f"fdl.launch: --cpu-devices must be an integer >= 1, got "
                         f"{cpu_devices!r}")
    if not command:
        raise ValueError("fdl.launch: no program to run")
    say = print_fn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    address = f"127.0.0.1:{port or free_port()}"
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM: stop them all
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    procs: list[subprocess.Popen] = []
    try:
        procs += [subprocess.Popen(list(command), env=child_env(
            i, num_processes, address, cpu_devices=cpu_devices, timeouts=timeouts, base=env))
            for i in range(num_processes)]
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # Several may have ended by this poll (a killed process, then a partner that
                # noticed): a process killed by a signal is named as the cause, the others after.
                failed.sort(key=lambda f: (f[1] > 0, f[0]))
                i, code = failed[0]
                also = "".join(f"; process {j} then {_describe(c)}" for j, c in failed[1:])
                others = [p for p in procs if p.poll() is None]
                say(f"fdl.launch: process {i} of {num_processes} (pid {procs[i].pid}) "
                    f"{_describe(code)}{also}"
                    + (f"; stopping the other {len(others)}" if others else ""))
                _stop(others, grace)
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        say("fdl.launch: interrupted; passing Ctrl-C to every process")
        _stop(procs, max(grace, 10.0), signal.SIGINT)
        return 130
    except _Terminated:
        say("fdl.launch: terminated (SIGTERM); stopping every process")
        _stop(procs, grace)
        return 128 + signal.SIGTERM
    finally:
        _stop(procs, 0.0, signal.SIGKILL)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fdl.launch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\nExample:\n  python -m fdl.launch -n 2 "
        "--cpu-devices 4 -m fdl.cli train --epochs 3\n  python -m fdl.launch -n 2 "
        "my_training_script.py --lr 0.1")
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulated CPU devices per process (default: what JAX finds)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free "
                   "one)")
    p.add_argument("--heartbeat-timeout", type=int, default=None,
                   help="seconds without heartbeat before a process counts as dead")
    p.add_argument("--init-timeout", type=int, default=None,
                   help="seconds to wait for every process to connect")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds between SIGTERM and SIGKILL when stopping processes")
    p.add_argument("-m", dest="module", default=None, help="run a module (as python -m)")
    p.add_argument("program", nargs=argparse.REMAINDER,
                   help="script and its arguments (or the module's arguments with -m)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rest = list(args.program)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.module:
        command = [sys.executable, "-m", args.module, *rest]
    elif rest:
        command = [sys.executable, *rest] if rest[0].endswith(".py") else rest
    else:
        print("fdl.launch: give a script (file.py ...) or -m module", file=sys.stderr)
        return 2
    try:
        return launch(command, args.num_processes, cpu_devices=args.cpu_devices, port=args.port,
                      timeouts={"heartbeat": args.heartbeat_timeout, "init": args.init_timeout},
                      grace=args.grace)
    except (ValueError, OSError) as e:
        print(f"fdl.launch: error: {e} (command: {shlex.join(command)})", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
