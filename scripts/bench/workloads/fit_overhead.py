"""Overhead of ``fdl.train.fit`` over the bare jitted training step (LeNet + BN on the digits).

Both rows train the same fdl LeNet + BN with SGD, batch 256, on the sklearn digits
(8x8, zero-padded to 28x28 so the two 5x5 convolutions fit); time per batch over one pass of
the data. The figure of interest is the ratio ``fit`` / bare step (issue 4's goal: < 5% overhead).
"""

from __future__ import annotations

from scripts.bench.api import Workload

_PENDING = None
try:
    from fdl.train import fit as _fit  # noqa: F401
except Exception as e:  # noqa: BLE001
    _PENDING = (f"`fdl.train.fit` does not exist yet ({type(e).__name__}: {e}); the row will "
                "compare it with the bare jitted step once the training loop lands")

WORKLOADS = [
    Workload(
        name="fit_overhead",
        description=(
            "Examples/s of `fdl.train.fit` (one epoch, progress bar and metrics on) against the "
            "bare jitted fdl training step over the same batches: LeNet + BN on the sklearn "
            "digits (zero-padded to 28x28), batch 256, SGD."
        ),
        impls={},
        pending=_PENDING or "the fit-loop row is not wired yet (fdl.train.fit now exists)",
    )
]
