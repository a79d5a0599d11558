"""Tiny workloads for the harness tests (``tests/bench``): importable by a worker process."""

from __future__ import annotations

import os

from scripts.bench.api import Workload


def _step_checking_env(reference: bool):
    def build():
        import numpy as np

        role = os.environ.get("FDL_BENCH_ROLE")
        if reference and role != "reference":
            raise RuntimeError(f"a reference runs with FDL_BENCH_ROLE=reference, got {role!r}")
        a = np.ones((8, 8), np.float32)
        return lambda: np.tanh(a @ a)

    return build


def _broken():
    raise RuntimeError("this implementation | is broken")


WORKLOADS = [
    Workload(
        name="smoke_isolated",
        description="8x8 matmul + tanh, each implementation in a worker process",
        impls={"fdl": _step_checking_env(False), "numpy": _step_checking_env(True),
               "broken ref": _broken},
        flops=2 * 8**3,
        quick_steps=20,
        module=__name__,
    )
]
