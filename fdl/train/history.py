"""Per-epoch records of a training run and their one-line summary."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

__all__ = ["History", "format_row", "print_every"]


@dataclasses.dataclass
class History:
    """Per-epoch records: ``history.rows`` is a list of dicts (``epoch``, ``step``,
    ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``examples_per_sec``, ``time``,
    ``lr``, custom metrics ... whichever apply); ``history["test_acc"]`` is that column."""

    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def append(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append a copy of ``row`` and return it (the stored row)."""
        self.rows.append(dict(row))
        return self.rows[-1]

    def __getitem__(self, name: str) -> list[Any]:
        return [r.get(name) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    def to_json(self) -> str:
        return json.dumps(self.rows)

    @classmethod
    def from_json(cls, text: str) -> History:
        return cls(list(json.loads(text)))


_SKIP = ("epoch", "step", "examples_per_sec", "time", "lr")


def format_row(row: dict[str, Any]) -> str:
    """``"epoch 3, train loss 0.1234, train acc 0.9800, test acc 0.9700, 1234.5 examples/s,
    0.8 s"``: every metric of the row, then throughput and time."""
    parts = [f"epoch {row['epoch']}"]
    for k, v in row.items():
        if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{k.replace('_', ' ')} {v:.4f}")
    if "examples_per_sec" in row:
        parts.append(f"{row['examples_per_sec']:.1f} examples/s")
    if "time" in row:
        parts.append(f"{row['time']:.1f} s")
    return ", ".join(parts)


def print_every(n: int) -> Callable[[str], None]:
    """A ``print_fn`` for ``fit`` printing the rows of epoch 1 and every ``n``-th epoch."""
    seen = [0]

    def say(line: str) -> None:
        if line.startswith("epoch "):
            seen[0] += 1
            if seen[0] != 1 and seen[0] % n:
                return
        print(line, flush=True)

    return say
