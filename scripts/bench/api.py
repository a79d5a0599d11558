"""The contract between the benchmark harness and the workload modules.

A workload module ``scripts/bench/workloads/<name>.py`` defines ``WORKLOADS: list[Workload]``.
Each implementation is a *builder*: a zero-argument callable that does all set-up (model,
data, optimizer; nothing timed) and returns ``step``, a zero-argument callable that runs one
step and blocks until its results are ready (``jax.block_until_ready`` / torch is
synchronous). The harness times the first ``step()`` call as compile time, then interleaves
the timed steps of all implementations of the workload.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Step = Callable[[], Any]
Builder = Callable[[], Step]


@dataclasses.dataclass
class Workload:
    name: str                      # the "## <name>" heading in BENCHMARKS.md
    description: str               # shapes, dtype, optimizer, layout choice
    impls: dict[str, Builder]      # "fdl", "fdl (...)" rows start with "fdl"; others are references
    flops: float | None = None     # per step, the same count for every implementation
    bytes: float | None = None     # per step memory traffic, for memory-bound workloads
    pending: str | None = None     # set (with the reason) when fdl's capability does not exist yet
    quick_steps: int = 20
    steps: int = 30
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Optional, evaluated by the harness once (not timed) when ``flops`` is None: e.g. XLA's cost
    # analysis of a reference step. ``flops_note`` says how the count was obtained.
    flops_fn: Callable[[], float] | None = None
    flops_note: str = ""
    # Time each implementation in a process of its own (scripts/bench/isolate.py: fdl's import-time
    # settings, e.g. its allocator, must not touch the references). False for workloads whose
    # rows must share one process (e.g. fdl's fit against a bare loop of the same fdl step).
    isolate: bool = True
    # "package.module" defining this workload (set by discovery; a worker process imports it)
    module: str = ""
