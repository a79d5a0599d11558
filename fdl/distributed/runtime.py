"""Joining a multi-process run: ``jax.distributed`` with checked inputs, bounded waits and
fail-fast errors.

:func:`initialize` must run before any JAX computation in the process. It

- reads where this process sits (:func:`fdl.distributed.cluster.detect_cluster`; a
  single-process run returns at once and changes nothing);
- on CPU selects gloo for the cross-process collectives
  (``jax_cpu_collectives_implementation``; GPUs use NCCL, chosen by JAX);
- checks, before handing over to JAX, that process 0 can bind the coordinator port and that the
  other processes can reach it within the init timeout: an unreachable coordinator is a
  :class:`DistributedError` naming the address, not a stuck process;
- starts ``jax.distributed`` with the :class:`~fdl.distributed.cluster.Timeouts` (heartbeat,
  init, shutdown); if the processes have not all connected shortly before the init timeout, a
  message says which process count and id this process was given (JAX then stops the process);
- checks that every process agrees on the process count (a process started with another
  count is an error on every process, naming both counts);
- with ``fail_fast`` (default), installs an exception hook: an uncaught exception in any process
  prints its traceback and ends that process at once, skipping JAX's exit handshake, so the
  coordination service sees it stop and stops every other process within the heartbeat
  timeout (a graceful exit would wait at the handshake while the others wait in a collective:
  a hang). A process killed outright (``SIGKILL``, out of memory) stops the others the same
  way. :mod:`fdl.launch` also stops the other processes as soon as one fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import sys
import threading
import time
import traceback

from fdl.distributed.cluster import ClusterSpec, Timeouts, detect_cluster

__all__ = ["DistributedError", "ProcessInfo", "initialize", "process_info", "is_main_process",
           "barrier", "fail_fast", "exit_now", "write_once", "broadcast_text",
           "joined"]


class DistributedError(RuntimeError):
    """A multi-process run could not start or lost a process."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the run: ``index`` of ``count`` processes, with
    ``local_devices`` of the ``global_devices`` devices."""

    index: int
    count: int
    local_devices: int
    global_devices: int

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def describe(self) -> str:
        return (f"process {self.index} of {self.count}, {self.local_devices} local of "
                f"{self.global_devices} devices")


_state: dict = {"spec": None, "timeouts": None, "hook": None}


def process_info() -> ProcessInfo:
    """This process's :class:`ProcessInfo` (``index 0 of 1`` without ``jax.distributed``)."""
    import jax

    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                       jax.device_count())


def joined() -> bool:
    """Whether this process has joined a multi-process run with :func:`initialize`."""
    return _state["spec"] is not None


def is_main_process() -> bool:
    """True in process 0 (and in a single-process run): the one that prints, logs, plots and
    writes checkpoints."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (no-op with one process). All
    processes must call it with the same ``name``, in the same order."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_text(text: str | None) -> str | None:
    """Process 0's ``text`` on every process (``None`` stays ``None``); every process must
    call it. With one process, ``text`` itself."""
    import jax

    if jax.process_count() == 1:
        return text
    import numpy as np
    from jax.experimental import multihost_utils

    data = b"" if text is None else text.encode("utf-8")
    is_main = jax.process_index() == 0
    n = int(multihost_utils.broadcast_one_to_all(
        np.array([len(data) if text is not None else -1], np.int64), is_source=is_main)[0])
    if n < 0:
        return None
    buf = np.zeros(max(n, 1), np.uint8)
    if is_main:
        buf[:n] = np.frombuffer(data, np.uint8)
    out = multihost_utils.broadcast_one_to_all(buf, is_source=is_main)
    return bytes(np.asarray(out)[:n]).decode("utf-8")


def write_once(path: str, write) -> None:
    """Write ``path`` once for all processes: process 0 calls ``write()``, then every process
    waits at a barrier (so none reads the file before it is complete) and checks that it sees
    the file. Every process must call it. A process that cannot see the file raises
    :class:`DistributedError`: the directory must be on a file system all processes share."""
    import jax

    if jax.process_count() == 1:
        write()
        return
    if jax.process_index() == 0:
        write()
    barrier(f"fdl write {path}")
    if not os.path.exists(path):
        raise DistributedError(
            f"fdl.distributed: process {jax.process_index()} cannot see '{path}', which process "
            "0 has written: put checkpoints on a file system every process shares")


def initialize(spec: ClusterSpec | None = None, *, timeouts: Timeouts | None = None,
               fail_fast_hook: bool = True) -> ProcessInfo:
    """Join the multi-process run described by ``spec`` (default: detected from the
    environment, see :mod:`fdl.distributed.cluster`), before any JAX computation.

    Returns this process's :class:`ProcessInfo`. Without a multi-process description it
    returns ``index 0 of 1`` and starts nothing. Calling it again with the same description is a
    no-op; with another one, an error. See the module docstring for the checks and timeouts.
    """
    spec = spec if spec is not None else detect_cluster()
    timeouts = timeouts or Timeouts.from_env()
    if spec is None or spec.num_processes == 1:
        return process_info()
    if _state["spec"] is not None:
        if _state["spec"] != spec:
            raise DistributedError(f"fdl.distributed is already initialised as {_state['spec']}; "
                                   f"cannot join {spec}")
        return process_info()
    import jax

    # CPU devices all-reduce over gloo (TCP); GPU devices use NCCL whatever this says
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if spec.process_id == 0:
        _check_bindable(spec)
    else:
        _wait_reachable(spec, timeouts.init)
    done = threading.Event()
    watchdog = threading.Thread(target=_init_watchdog, args=(spec, timeouts, done), daemon=True)
    watchdog.start()
    try:
        jax.distributed.initialize(
            spec.coordinator_address, spec.num_processes, spec.process_id,
            cluster_detection_method="deactivate",
            initialization_timeout=timeouts.init,
            heartbeat_timeout_seconds=timeouts.heartbeat,
            shutdown_timeout_seconds=timeouts.shutdown)
    except RuntimeError as e:
        raise DistributedError(
            f"fdl.distributed: could not start process {spec.process_id} of "
            f"{spec.num_processes} ({e}); initialize() must run before any JAX computation "
            "in the process") from e
    finally:
        done.set()
    _state.update(spec=spec, timeouts=timeouts)
    if fail_fast_hook:
        _install_hook()
    _check_agreement(spec)
    return process_info()


def _check_bindable(spec: ClusterSpec) -> None:
    """Process 0 serves the coordinator: its port must be free (a clear error, not JAX's)."""
    with socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", spec.port))
        except OSError as e:
            detail = "in use by another program" if e.errno == errno.EADDRINUSE else str(e)
            raise DistributedError(
                f"fdl.distributed: process 0 cannot serve the coordinator on port {spec.port} "
                f"({detail}); pick another port (--port, or the port of "
                f"FDL_COORDINATOR_ADDRESS / FDL_COORDINATOR_PORT)") from None


def _wait_reachable(spec: ClusterSpec, timeout: float) -> None:
    """Poll a TCP connection to the coordinator until it accepts or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((spec.host, spec.port), timeout=2.0):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"fdl.distributed: process {spec.process_id} of {spec.num_processes} could not "
                f"reach the coordinator at {spec.coordinator_address} within {timeout} s "
                f"({last.strerror or last}). Is process 0 running, and is the address right "
                f"(from {spec.source})? Raise the wait with --init-timeout / "
                "FDL_INIT_TIMEOUT") from None
        time.sleep(0.2)


def _init_watchdog(spec: ClusterSpec, timeouts: Timeouts, done: threading.Event) -> None:
    if done.wait(max(timeouts.init - 1.0, timeouts.init * 0.9)):
        return
    print(f"fdl.distributed: process {spec.process_id} has waited {timeouts.init} s for all "
          f"{spec.num_processes} processes to connect to the coordinator at "
          f"{spec.coordinator_address} (from {spec.source}). Check that every process was "
          f"started with the same number of processes ({spec.num_processes} here) and a "
          f"distinct process id in 0..{spec.num_processes - 1}; JAX stops this process now.",
          file=sys.stderr, flush=True)


def _check_agreement(spec: ClusterSpec) -> None:
    """Every process must have been told the same process count (JAX goes by process 0's)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    told = np.asarray(multihost_utils.process_allgather(
        np.array([spec.num_processes, jax.local_device_count()], np.int64)))
    counts = told[:, 0]
    if jax.process_count() != spec.num_processes or (counts != spec.num_processes).any():
        detail = ", ".join(f"process {i}: {int(c)}" for i, c in enumerate(counts))
        raise DistributedError(
            f"fdl.distributed: the processes disagree on the number of processes ({detail}; "
            f"the coordinator runs {jax.process_count()}). Start every process with the same "
            "count")


# ----------------------------------------------------------------------------- failing fast


def exit_now(code: int = 1, message: str | None = None) -> None:
    """End this process at once (``os._exit``) after flushing output, skipping JAX's exit
    handshake: in a multi-process run the others then stop within the heartbeat timeout
    instead of waiting for this one forever."""
    if message:
        print(message, file=sys.stderr)
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    os._exit(code)


def _failure_message() -> str:
    spec, timeouts = _state["spec"], _state["timeouts"]
    return (f"fdl.distributed: process {spec.process_id} of {spec.num_processes} failed (above); "
            f"ending it now so that the other processes stop within the {timeouts.heartbeat} s "
            "heartbeat timeout")


def _install_hook() -> None:
    if _state["hook"] is not None:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            exit_now(130, f"fdl.distributed: process {_state['spec'].process_id} interrupted")
        traceback.print_exception(kind, value, tb)
        exit_now(1, _failure_message())

    _state["hook"] = previous
    sys.excepthook = hook


@contextlib.contextmanager
def fail_fast():
    """``with fail_fast(): ...``: in a multi-process run, an exception escaping the block ends
    this process at once (traceback printed, exit status 1) instead of unwinding into JAX's exit
    handshake (see the module docstring). A no-op with one process."""
    try:
        yield
    except BaseException as e:
        if _state["spec"] is None or isinstance(e, SystemExit) and not e.code:
            raise
        if isinstance(e, KeyboardInterrupt):
            exit_now(130, f"fdl.distributed: process {_state['spec'].process_id} interrupted")
        if isinstance(e, SystemExit):
            exit_now(e.code if isinstance(e.code, int) else 1)
        traceback.print_exc()
        exit_now(1, _failure_message())
