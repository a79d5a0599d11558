"""Training past one machine: joining a multi-process run on ``jax.distributed``.

One process per host (or per GPU), all running the same program: :func:`initialize` joins
the run (from the variables :mod:`fdl.launch` or SLURM set, see :mod:`.cluster`), after which
``jax.devices()`` lists every process's devices, :func:`fdl.parallel.data_mesh` spans them
all and a sharded ``jit`` step is one SPMD program over the whole mesh (gradients all-reduced
across processes by XLA: gloo over TCP on CPUs, NCCL on GPUs). Each process loads only its
rows of every global batch (``ArrayLoader(..., device_put=batch_sharding(mesh))``), metrics
come back reduced over all processes, and process 0 alone prints, logs and writes
checkpoints. See ``docs/distributed.md``.
"""

from fdl.distributed.cluster import (
    ClusterConfigError,
    ClusterSpec,
    Timeouts,
    detect_cluster,
)
from fdl.distributed.runtime import (
    DistributedError,
    ProcessInfo,
    barrier,
    broadcast_text,
    exit_now,
    fail_fast,
    initialize,
    is_main_process,
    joined,
    process_info,
    write_once,
)

__all__ = [
    "ClusterConfigError", "ClusterSpec", "DistributedError", "ProcessInfo", "Timeouts",
    "barrier", "broadcast_text", "detect_cluster", "exit_now", "fail_fast", "initialize",
    "is_main_process", "joined", "process_info", "write_once",
]
