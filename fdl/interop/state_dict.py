"""Reading and writing flat ``{name: array}`` state dicts (PyTorch's layout) without pickle.

Sources accepted by :func:`load_state_dict`:
- a ``dict`` of numpy arrays (or of anything ``np.asarray`` accepts; torch tensors are
  converted with ``.detach().cpu().numpy()``);
- a ``.safetensors`` file (read with the ``safetensors`` package, numpy back end);
- a ``.npz`` file (read with ``allow_pickle=False``);
- a ``.pt`` / ``.pth`` / ``.bin`` file, read with ``torch.load(..., weights_only=True)`` when
  PyTorch is installed (imported lazily; fdl never requires it). ``weights_only=True`` refuses
  arbitrary pickled objects.

Anything that is not a flat mapping of names to numeric tensors (a pickled module, a list, a
tensor, string or nested-dict values, a corrupt or truncated file) raises
:class:`StateDictFileError` naming the file and what it holds instead. A training checkpoint
``{"state_dict": {...}, ...}`` (or ``"model_state_dict"``, ``"model"``) is unwrapped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["load_state_dict", "save_safetensors", "to_numpy_state_dict", "StateDictError",
           "StateDictFileError"]


class StateDictFileError(ValueError):
    """A state-dict source that is not a flat ``{name: tensor}`` mapping, or a file that
    cannot be read; the message names the file."""


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


def _describe(v: Any) -> str:
    if isinstance(v, Mapping):
        return f"a nested mapping with keys {sorted(map(str, v))[:5]}"
    return f"a {type(v).__name__}"


def to_numpy_state_dict(sd: Mapping[str, Any], source: str = "state dict"
                        ) -> dict[str, np.ndarray]:
    """``{name: np.ndarray}`` from a mapping of arrays or torch tensors; anything else
    (strings, ``None``, nested mappings, object arrays) raises :class:`StateDictFileError`
    naming the first such key and ``source``."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, (Mapping, str, bytes)) or v is None:
            a = None
        else:
            try:
                a = _to_numpy(v)
            except (TypeError, ValueError, RuntimeError):
                a = None
        if a is None or a.dtype.kind not in "biufc":
            raise StateDictFileError(
                f"{source}: entry {str(k)!r} is {_describe(v)}, not a numeric tensor; expected a "
                "flat state dict {name: tensor}"
            )
        out[str(k)] = a
    return out


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def _unwrap(obj: Any, path: str) -> Mapping:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        return obj
    raise StateDictFileError(
        f"'{path}' holds {_describe(obj)}, not a state dict (a mapping of names to tensors); "
        "save model.state_dict() rather than the model or a list of tensors"
    )


def load_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat ``{name: np.ndarray}`` state dict from a mapping or a file (see module doc)."""
    if isinstance(source, Mapping):
        return to_numpy_state_dict(source)
    path = os.fspath(source)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".safetensors", ".npz", ".pt", ".pth", ".bin"):
        raise ValueError(f"unsupported state dict file {path!r}: expected .safetensors, .npz, "
                         ".pt, .pth or .bin")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state dict file '{path}' does not exist" + (
            " (it is a directory)" if os.path.isdir(path) else ""))
    if ext == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as e:  # pragma: no cover - optional dependency
            raise ImportError("reading .safetensors needs the 'safetensors' package "
                              "(pip install safetensors)") from e
        return _read_file(path, lambda: dict(load_file(path)))
    if ext == ".npz":
        def read_npz():
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}

        return to_numpy_state_dict(_read_file(path, read_npz), f"'{path}'")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {ext} files needs PyTorch; convert the checkpoint to "
                          ".safetensors instead") from e
    obj = _read_file(path, lambda: torch.load(path, map_location="cpu", weights_only=True))
    return to_numpy_state_dict(_unwrap(obj, path), f"'{path}'")


def _read_file(path: str, read):
    """``read()``, with any failure of the reader turned into a one-line
    :class:`StateDictFileError` naming ``path``."""
    try:
        return read()
    except (ImportError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - pickle, zip, safetensors and torch errors vary
        first = (str(e).strip().splitlines() or [""])[0][:200]
        hint = (" (weights_only=True refused a pickled object: the file holds more than "
                "tensors; save model.state_dict() instead)" if "weights_only" in str(e) else "")
        raise StateDictFileError(
            f"cannot read state dict file '{path}': {type(e).__name__}: {first}{hint}"
        ) from None


def save_safetensors(path: str | os.PathLike, sd: Mapping[str, Any],
                     metadata: dict[str, str] | None = None) -> None:
    """Write a flat state dict to a ``.safetensors`` file (contiguous numpy copies)."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(_to_numpy(v)) for k, v in sd.items()}
    save_file(arrays, os.fspath(path), metadata=metadata)
