"""What :func:`~fdl.train.fit` accepts as data, as one interface: batches of an epoch from a
position, the position itself (``epoch``, ``batch``; saved in checkpoints), and whether the
data can stay on the device (:class:`~fdl.data.ArrayLoader`).

- an :class:`~fdl.data.ArrayLoader` (used as it is);
- a tuple ``(x, y)`` of arrays or pytrees of arrays (an ``ArrayLoader`` is built: shuffled
  for training, the last batch padded with a mask);
- any other re-iterable source of batches: an object with ``epoch(e)`` returning the batches of
  epoch ``e`` (e.g. a sampler that draws a new offset per epoch), or with ``__iter__`` (one
  epoch per iteration). Resuming mid-epoch skips the batches already seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import jax

from fdl.data.loader import ArrayLoader

__all__ = ["IterableBatches", "as_batches"]


class IterableBatches:
    """A re-iterable batch source with the position interface of an ``ArrayLoader``."""

    indexable_on_device = False

    def __init__(self, source: Any):
        self.source = source
        self.epoch = 0
        self.batch = 0

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator:
        """Batches ``start, start+1, ...`` of ``epoch``."""
        make = getattr(self.source, "epoch", None)
        batches = make(epoch) if callable(make) else iter(self.source)
        return itertools.islice(batches, start, None)

    def __len__(self) -> int:
        return len(self.source)  # TypeError when the source has no length

    def state(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "batch": int(self.batch)}

    def set_state(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(f"invalid position {state!r}")
        self.epoch, self.batch = epoch, batch


def as_batches(data: Any, batch_size: int | None, key, shuffle: bool, name: str):
    """``data`` as an ``ArrayLoader`` or :class:`IterableBatches` (see the module docstring);
    ``key`` shuffles a loader built here for training."""
    if isinstance(data, (ArrayLoader, IterableBatches)):
        return data
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        if batch_size is None:
            raise ValueError(f"fit: {name} is a tuple of arrays; pass batch_size=")
        leaves = jax.tree.leaves(tuple(data))
        if not shuffle and leaves:  # evaluation: a smaller set than one batch is fine
            batch_size = min(batch_size, len(leaves[0]))
        return ArrayLoader(tuple(data), batch_size, key=key if shuffle else None,
                           last_batch="pad")
    if callable(getattr(data, "epoch", None)) or hasattr(data, "__iter__"):
        return IterableBatches(data)
    raise TypeError(f"fit: {name} must be an ArrayLoader, a tuple (x, y) or a re-iterable "
                    f"source of batches, got {type(data).__name__}")
