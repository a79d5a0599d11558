"""TinySSD training step and NMS (d2l ch. 14): pending until fdl.models.detection exists."""

from __future__ import annotations

from scripts.bench.api import Workload

_PENDING = None
try:
    from fdl.models import detection as _det

    _det.ssd  # noqa: B018
    _PENDING = "fdl.models.detection exists; the TinySSD / NMS benchmark rows are not wired yet"
except Exception as e:  # noqa: BLE001
    _PENDING = f"`fdl.models.detection.ssd` does not exist yet ({type(e).__name__}: {e})"

WORKLOADS = [
    Workload(
        name="tinyssd",
        description=(
            "d2l's TinySSD (banana detection, 3x256x256, batch 32, 5 scales of anchors, class "
            "cross-entropy + L1 box loss, SGD) training step, and NMS on the predicted boxes."
        ),
        impls={},
        pending=_PENDING,
    )
]
