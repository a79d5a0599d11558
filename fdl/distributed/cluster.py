"""Where a process sits in a multi-process run: coordinator address, process count and id.

Read from, in this order (the first source that sets the process count wins):

1. explicit arguments (``fdl train --coordinator HOST:PORT --num-processes N --process-id I``);
2. the variables :mod:`fdl.launch` gives the processes it starts, which you can also set by
   hand on any cluster: ``FDL_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
   ``FDL_NUM_PROCESSES``, ``FDL_PROCESS_ID``;
3. SLURM (``srun``): ``SLURM_NTASKS`` processes, this one ``SLURM_PROCID``, the coordinator on
   the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) at port
   ``FDL_COORDINATOR_PORT`` (default ``61440 + SLURM_JOB_ID % 4096``, JAX's convention, so
   every task of a job agrees on it without talking).

A run with one process needs none of them. The timeouts of the distributed runtime
(:class:`Timeouts`) default to the values below and are read from ``FDL_HEARTBEAT_TIMEOUT``,
``FDL_INIT_TIMEOUT`` and ``FDL_SHUTDOWN_TIMEOUT`` (seconds) when set; arguments override both.
All environment reading of :mod:`fdl.distributed` happens here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

__all__ = ["ClusterSpec", "Timeouts", "ClusterConfigError", "detect_cluster", "parse_address",
           "first_slurm_host", "launched_processes"]

# Environment protocol between ``fdl.launch`` and the processes it starts.
ENV_ADDRESS = "FDL_COORDINATOR_ADDRESS"
ENV_NUM = "FDL_NUM_PROCESSES"
ENV_ID = "FDL_PROCESS_ID"
ENV_PORT = "FDL_COORDINATOR_PORT"


class ClusterConfigError(ValueError):
    """The description of a multi-process run is incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """``num_processes`` processes, this one ``process_id``, process 0 serving the
    coordination service at ``coordinator_address`` (``host:port``); ``source`` says where
    the values came from (for error messages)."""

    coordinator_address: str
    num_processes: int
    process_id: int
    source: str = "arguments"

    def __post_init__(self):
        _check_count(self.num_processes, self.source)
        if (not isinstance(self.process_id, int) or isinstance(self.process_id, bool)
                or not 0 <= self.process_id < self.num_processes):
            raise ClusterConfigError(
                f"process id must be an integer in 0..{self.num_processes - 1} for "
                f"{self.num_processes} processes, got {self.process_id!r} (from {self.source})")
        parse_address(self.coordinator_address, self.source)

    @property
    def host(self) -> str:
        return parse_address(self.coordinator_address, self.source)[0]

    @property
    def port(self) -> int:
        return parse_address(self.coordinator_address, self.source)[1]


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds the distributed runtime waits.

    ``heartbeat``: a process that has sent no heartbeat for this long is declared dead and
    every other process is stopped with an error (the bound on how long the others run on
    after one is killed). ``init``: how long processes wait for all of them to connect to the
    coordinator at start. ``shutdown``: how long a finishing process waits for the others at
    the exit handshake."""

    heartbeat: int = 30
    init: int = 120
    shutdown: int = 60

    def __post_init__(self):
        for name in ("heartbeat", "init", "shutdown"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ClusterConfigError(f"the {name} timeout must be an integer number of "
                                         f"seconds >= 1, got {v!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Timeouts:
        """Defaults, then ``FDL_{HEARTBEAT,INIT,SHUTDOWN}_TIMEOUT``, then ``overrides``
        (``None`` values ignored)."""
        env = os.environ if env is None else env
        values = {}
        for name in ("heartbeat", "init", "shutdown"):
            var = f"FDL_{name.upper()}_TIMEOUT"
            if overrides.get(name) is not None:
                values[name] = overrides[name]
            elif env.get(var):
                values[name] = _int(env[var], var)
        return cls(**values)


def _int(text: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise ClusterConfigError(f"{what} must be an integer, got {text!r}") from None


def _check_count(n, source: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ClusterConfigError(f"the number of processes must be an integer >= 1, got {n!r} "
                                 f"(from {source})")


def parse_address(address: str, source: str = "arguments") -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"`` (``"[::1]:1234"`` for IPv6)."""
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", str(address).strip())
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise ClusterConfigError(
            f"coordinator address must be host:port with a port in 1..65535, got {address!r} "
            f"(from {source})")
    return m.group(1), int(m.group(2))


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``"node[003-006,9],gpu1"`` -> ``"node003"``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None or not m.group(1):
        raise ClusterConfigError(f"cannot read a host name from the SLURM node list "
                                 f"{nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


def detect_cluster(env: Mapping[str, str] | None = None, *, coordinator_address: str | None = None,
                   num_processes: int | None = None, process_id: int | None = None
                   ) -> ClusterSpec | None:
    """The :class:`ClusterSpec` of this process, or ``None`` for a single-process run.

    Explicit arguments first, then the ``FDL_*`` variables, then SLURM (see the module
    docstring). A partial description (a count without an id, an id without an address, ...)
    is an error naming what is missing, never a silent single-process run."""
    env = os.environ if env is None else env
    if num_processes is not None or coordinator_address is not None or process_id is not None:
        return _complete("arguments (--coordinator/--num-processes/--process-id)",
                         coordinator_address, num_processes, process_id)
    if any(env.get(v) for v in (ENV_ADDRESS, ENV_NUM, ENV_ID)):
        num = _int(env[ENV_NUM], ENV_NUM) if env.get(ENV_NUM) else None
        pid = _int(env[ENV_ID], ENV_ID) if env.get(ENV_ID) else None
        return _complete(f"{ENV_ADDRESS}/{ENV_NUM}/{ENV_ID}", env.get(ENV_ADDRESS), num, pid)
    if env.get("SLURM_NTASKS") and env.get("SLURM_PROCID") is not None:
        num = _int(env["SLURM_NTASKS"], "SLURM_NTASKS")
        if num == 1:
            return None
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise ClusterConfigError("SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor "
                                     "SLURM_JOB_NODELIST is set: run the job step with srun")
        if env.get(ENV_PORT):
            port = _int(env[ENV_PORT], ENV_PORT)
        elif env.get("SLURM_JOB_ID"):
            port = 61440 + _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 4096
        else:
            raise ClusterConfigError(f"SLURM: set {ENV_PORT} (no SLURM_JOB_ID to derive a "
                                     "coordinator port from)")
        return ClusterSpec(f"{first_slurm_host(nodes)}:{port}", num,
                           _int(env["SLURM_PROCID"], "SLURM_PROCID"), "SLURM")
    return None


def launched_processes(env: Mapping[str, str] | None = None) -> int:
    """The process count ``fdl.launch`` gave this process (``FDL_NUM_PROCESSES``), else 1."""
    env = os.environ if env is None else env
    try:
        return max(1, int(env.get(ENV_NUM, "1")))
    except ValueError:
        return 1


def _complete(source: str, address, num, pid) -> ClusterSpec | None:
    if num is not None:
        _check_count(num, source)
    if num == 1 and address is None:
        if pid not in (None, 0):
            raise ClusterConfigError(f"process id {pid} with 1 process (from {source})")
        return None
    missing = [name for name, v in (("the coordinator address", address),
                                    ("the number of processes", num),
                                    ("this process's id", pid)) if v is None]
    if missing:
        raise ClusterConfigError(
            f"a multi-process run needs the coordinator address (host:port of process 0), the "
            f"number of processes and this process's id; missing {', '.join(missing)} (from "
            f"{source}). On one machine, `fdl train --num-processes N` or `python -m "
            f"fdl.launch -n N ...` sets all three")
    return ClusterSpec(str(address), num, pid, source)
