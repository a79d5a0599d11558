"""Reading and writing flat ``{name: array}`` state dicts (PyTorch's layout) without pickle.

Sources accepted by :func:`load_state_dict`:
- a ``dict`` of numpy arrays (or of anything ``np.asarray`` accepts; torch tensors are
  converted with ``.detach().cpu().numpy()``);
- a ``.safetensors`` file (read with the ``safetensors`` package, numpy back end);
- a ``.npz`` file (read with ``allow_pickle=False``);
- a ``.pt`` / ``.pth`` / ``.bin`` file, read with ``torch.load(..., weights_only=True)`` when
  PyTorch is installed (imported lazily; fdl never requires it). ``weights_only=True`` refuses
  arbitrary pickled objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["load_state_dict", "save_safetensors", "to_numpy_state_dict", "StateDictError"]


class StateDictError(ValueError):
    """A state dict that does not fit a model: lists every ``missing``, ``unexpected`` and
    ``mismatched`` (``name: expected shape, got shape``) key, all in one error."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        lines = [f"state dict does not match {what}:"]
        for title, items in (("missing keys", self.missing),
                             ("unexpected keys", self.unexpected),
                             ("mis-shaped keys", self.mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        super().__init__("\n".join(lines))


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def to_numpy_state_dict(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{name: np.ndarray}`` from a mapping of arrays or torch tensors."""
    return {str(k): _to_numpy(v) for k, v in sd.items()}


def load_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat ``{name: np.ndarray}`` state dict from a mapping or a file (see module doc)."""
    if isinstance(source, Mapping):
        return to_numpy_state_dict(source)
    path = os.fspath(source)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as e:  # pragma: no cover - optional dependency
            raise ImportError("reading .safetensors needs the 'safetensors' package "
                              "(pip install safetensors)") from e
        return dict(load_file(path))
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if ext in (".pt", ".pth", ".bin"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {ext} files needs PyTorch; convert the checkpoint to "
                              ".safetensors instead") from e
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(
                obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a state dict (a mapping of tensors), got "
                             f"{type(obj).__name__}")
        return to_numpy_state_dict(obj)
    raise ValueError(f"unsupported state dict file {path!r}: expected .safetensors, .npz, .pt, "
                     ".pth or .bin")


def save_safetensors(path: str | os.PathLike, sd: Mapping[str, Any],
                     metadata: dict[str, str] | None = None) -> None:
    """Write a flat state dict to a ``.safetensors`` file (contiguous numpy copies)."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(_to_numpy(v)) for k, v in sd.items()}
    save_file(arrays, os.fspath(path), metadata=metadata)
