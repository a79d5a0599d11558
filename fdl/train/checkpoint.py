"""Checkpoints: any pytree of arrays to one safetensors file, atomically, without pickle.

File format: standard `safetensors <https://github.com/huggingface/safetensors>`_ (an 8-byte
little-endian header length, a JSON header, then raw little-endian tensor bytes). fdl writes the
format itself (it is ~20 lines), so checkpoints need no extra package and bfloat16 works; any
safetensors reader can open them. The header's ``__metadata__["fdl"]`` entry is a JSON document
describing the tree::

    {"format": "fdl-checkpoint", "version": 1,
     "leaves": [{"path": "params/conv1/w", "name": "params/conv1/w", "shape": [3, 3, 1, 6],
                 "dtype": "float32", "kind": "array"},          # or "key" (+ "impl"), "int", ...
                ...],
     "sha256": "<hash of the data section>", "metadata": {...user JSON...}}

Paths are the ``/``-joined pytree paths (dict keys, NamedTuple field names, list indices), so a
checkpoint of ``{"params": ..., "opt_state": AdamState(...)}`` reads ``opt_state/0/mu/conv1/w``.
Typed PRNG keys are stored as their ``jax.random.key_data`` with the key implementation's name.

A path ending in ``.npz`` writes a NumPy ``.npz`` instead (arrays + the same JSON document as a
``uint8`` array; read with ``allow_pickle=False``). Neither format ever uses pickle.

Writes are atomic: the bytes go to a temporary file in the destination directory, are
``fsync``-ed, then ``os.replace``-d over the destination; a crash at any point leaves the previous
checkpoint untouched. Loads verify the checksum and, given a ``template`` pytree, the structure,
shapes and dtypes, naming every mismatching path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "save",
    "load",
    "load_metadata",
    "latest",
    "list_checkpoints",
]

FORMAT = "fdl-checkpoint"
VERSION = 1
_ROOT = "<root>"

# safetensors dtype codes <-> numpy dtype names
_ST_CODES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "int32": "I32", "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16",
    "bfloat16": "BF16", "float32": "F32", "float64": "F64",
}
_ST_NAMES = {v: k for k, v in _ST_CODES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is corrupt, or does not match the template."""


# ----------------------------------------------------------------------------- tree <-> leaves


def _key_str(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def _flatten(tree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        p = "/".join(_key_str(k) for k in path)
        out.append((p or _ROOT, leaf))
    return out


def _is_key(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def _dtype_name(dt) -> str:
    return np.dtype(dt).name


def _to_numpy(path: str, leaf) -> tuple[np.ndarray, dict[str, Any]]:
    """Host copy of a leaf plus its description."""
    if _is_key(leaf):
        impl = str(jax.random.key_impl(leaf))
        data = np.asarray(jax.random.key_data(leaf))
        desc = {"kind": "key", "impl": impl, "key_shape": list(leaf.shape)}
    elif isinstance(leaf, bool):
        data, desc = np.asarray(leaf, np.bool_), {"kind": "bool"}
    elif isinstance(leaf, int):
        data, desc = np.asarray(leaf, np.int64), {"kind": "int"}
    elif isinstance(leaf, float):
        data, desc = np.asarray(leaf, np.float64), {"kind": "float"}
    elif isinstance(leaf, (np.ndarray, np.generic, jax.Array)):
        data, desc = np.asarray(leaf), {"kind": "array"}
    else:
        raise TypeError(
            f"checkpoint: leaf at '{path}' is a {type(leaf).__name__}; only arrays, PRNG keys, "
            "bool/int/float scalars can be saved (put strings and settings in metadata=)"
        )
    if data.dtype.name not in _ST_CODES:
        raise TypeError(f"checkpoint: leaf at '{path}' has unsupported dtype {data.dtype}")
    if not data.flags.c_contiguous:
        data = data.copy(order="C")
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    desc.update({"path": path, "shape": list(data.shape), "dtype": data.dtype.name})
    return data, desc


# ----------------------------------------------------------------------------- writing


def _write_chunks(f, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to the open file ``f`` (a seam for crash tests)."""
    for c in chunks:
        f.write(c)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str, chunks: Iterable[bytes]) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_chunks(f, chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _safetensors_chunks(arrays: list[np.ndarray], names: list[str], doc: dict) -> list[bytes]:
    header: dict[str, Any] = {"__metadata__": {"fdl": json.dumps(doc, sort_keys=True)}}
    offset = 0
    for name, a in zip(names, arrays, strict=True):
        n = a.nbytes
        header[name] = {
            "dtype": _ST_CODES[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    return [struct.pack("<Q", len(hbytes)), hbytes, *(a.tobytes() for a in arrays)]


def save(path: str | os.PathLike, tree: Any, metadata: dict[str, Any] | None = None) -> str:
    """Save a pytree of arrays (and PRNG keys, Python scalars) to ``path`` atomically.

    ``metadata`` is any JSON-serialisable dict stored in the header (read it back with
    :func:`load_metadata`). Returns the path written. A ``.npz`` suffix selects NumPy's format,
    anything else safetensors.
    """
    path = os.fspath(path)
    flat = _flatten(tree)
    arrays, leaves = [], []
    seen: set[str] = set()
    for p, leaf in flat:
        if p in seen:
            raise ValueError(f"checkpoint: duplicate leaf path '{p}'")
        seen.add(p)
        a, desc = _to_numpy(p, leaf)
        arrays.append(a)
        leaves.append(desc)
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    try:
        json.dumps(metadata or {})
    except TypeError as e:
        raise TypeError(f"checkpoint: metadata must be JSON-serialisable: {e}") from None
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "leaves": leaves,
        "sha256": h.hexdigest(),
        "metadata": metadata or {},
    }
    names = [d["path"] for d in leaves]
    if path.endswith(".npz"):
        buf = io.BytesIO()
        payload = {f"t{i}": a for i, a in enumerate(arrays)}
        payload["__fdl__"] = np.frombuffer(json.dumps(doc).encode("utf-8"), np.uint8)
        np.savez(buf, **payload)
        _atomic_write(path, [buf.getvalue()])
    else:
        _atomic_write(path, _safetensors_chunks(arrays, names, doc))
    return path


# ----------------------------------------------------------------------------- reading


def _read_safetensors(path: str) -> tuple[dict, list[np.ndarray]]:
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise CheckpointError(f"checkpoint '{path}' is truncated ({len(raw)} bytes)")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if hlen > len(raw) - 8:
        raise CheckpointError(f"checkpoint '{path}' is truncated or not a safetensors file")
    try:
        header = json.loads(raw[8 : 8 + hlen].decode("utf-8"))
        doc = json.loads(header["__metadata__"]["fdl"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"checkpoint '{path}': header is corrupt or not written by fdl ({e})"
        ) from None
    data = memoryview(raw)[8 + hlen :]
    arrays = []
    for desc in doc["leaves"]:
        entry = header.get(desc["path"])
        if entry is None:
            raise CheckpointError(f"checkpoint '{path}': tensor '{desc['path']}' is missing")
        start, end = entry["data_offsets"]
        if end > len(data):
            raise CheckpointError(f"checkpoint '{path}' is truncated at tensor '{desc['path']}'")
        dt = jnp.dtype(_ST_NAMES[entry["dtype"]])
        a = np.frombuffer(data[start:end], dtype=dt).reshape(entry["shape"])
        arrays.append(a)
    return doc, arrays


def _read_npz(path: str) -> tuple[dict, list[np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            doc = json.loads(bytes(z["__fdl__"]).decode("utf-8"))
            arrays = []
            for i, d in enumerate(doc["leaves"]):
                a = np.array(z[f"t{i}"])
                if a.dtype.name != d["dtype"]:  # e.g. bfloat16 comes back as raw void bytes
                    a = a.view(jnp.dtype(d["dtype"]))
                arrays.append(a)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not written by fdl ({e})"
        ) from None
    return doc, arrays


def _read(path: str) -> tuple[dict, list[np.ndarray]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    doc, arrays = _read_npz(path) if path.endswith(".npz") else _read_safetensors(path)
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}' is not an fdl checkpoint")
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    if h.hexdigest() != doc.get("sha256"):
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt: data checksum mismatch (expected sha256 "
            f"{doc.get('sha256')}, got {h.hexdigest()})"
        )
    return doc, arrays


def _restore_leaf(desc: dict, a: np.ndarray):
    kind = desc["kind"]
    if kind == "key":
        return jax.random.wrap_key_data(jnp.asarray(a), impl=desc["impl"])
    if kind == "int":
        return int(a)
    if kind == "float":
        return float(a)
    if kind == "bool":
        return bool(a)
    return jnp.asarray(a)


def _unflatten_nested(items: list[tuple[str, Any]]) -> Any:
    if len(items) == 1 and items[0][0] == _ROOT:
        return items[0][1]
    out: dict[str, Any] = {}
    for path, leaf in items:
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return out


def _template_desc(leaf) -> tuple[tuple[int, ...], str, str]:
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(data.shape), _dtype_name(data.dtype), "key"
    if isinstance(leaf, bool):
        return (), "bool", "bool"
    if isinstance(leaf, int):
        return (), "int64", "int"
    if isinstance(leaf, float):
        return (), "float64", "float"
    return tuple(getattr(leaf, "shape", np.shape(leaf))), _dtype_name(leaf.dtype), "array"


def load(path: str | os.PathLike, template: Any = None, *, partial: bool = False) -> Any:
    """Load a checkpoint written by :func:`save`.

    Without ``template``: a nested dict ``{name: ...}`` following the saved paths (NamedTuples
    and lists come back as dicts keyed by field name / index). With ``template`` (a pytree of
    arrays or ``jax.ShapeDtypeStruct`` of the expected structure, e.g. freshly initialised
    params): the same pytree structure filled with the saved values, after checking that the
    set of paths, every shape and every dtype agree; on any mismatch raise
    :class:`CheckpointError` listing each mismatching path. ``partial=True`` ignores saved
    paths the template lacks (e.g. load only ``{"params", "state"}`` of a training checkpoint).
    """
    path = os.fspath(path)
    doc, arrays = _read(path)
    saved = {d["path"]: (d, a) for d, a in zip(doc["leaves"], arrays, strict=True)}
    if template is None:
        return _unflatten_nested([(d["path"], _restore_leaf(d, a)) for d, a in saved.values()])

    tflat, treedef = jax.tree_util.tree_flatten_with_path(template)
    tpaths = ["/".join(_key_str(k) for k in p) or _ROOT for p, _ in tflat]
    problems = []
    for p in tpaths:
        if p not in saved:
            problems.append(f"  {p}: in the template but missing from the checkpoint")
    tset = set(tpaths)
    for p in saved:
        if p not in tset and not partial:
            problems.append(f"  {p}: in the checkpoint but not in the template")
    leaves = []
    for p, (_, tleaf) in zip(tpaths, tflat, strict=True):
        if p not in saved:
            continue
        d, a = saved[p]
        shape, dtype, kind = _template_desc(tleaf)
        if kind == "key" and d["kind"] != "key":
            problems.append(f"  {p}: template expects a PRNG key, checkpoint has an array")
            continue
        if tuple(d["shape"]) != shape:
            problems.append(f"  {p}: shape {tuple(d['shape'])} in checkpoint, template {shape}")
        if kind in ("array", "key") and d["dtype"] != dtype:
            problems.append(f"  {p}: dtype {d['dtype']} in checkpoint, template {dtype}")
        leaves.append(_restore_leaf(d, a))
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the template ({len(problems)} problem(s); "
            "was it written by a different model or configuration?):\n" + "\n".join(problems)
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` dict stored by :func:`save` (checksum verified)."""
    doc, _ = _read(os.fspath(path))
    return doc.get("metadata", {})


# ----------------------------------------------------------------------------- manager

_CKPT_RE = re.compile(r"^ckpt_(\d+)\.(safetensors|npz)$")


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, str]]:
    """``[(step, path), ...]`` of the ``ckpt_<step>`` files in ``directory``, oldest first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        m = _CKPT_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(out)


def latest(directory: str | os.PathLike) -> str | None:
    """Path of the newest checkpoint in ``directory`` (highest step), or ``None``."""
    ckpts = list_checkpoints(directory)
    return ckpts[-1][1] if ckpts else None


class CheckpointManager:
    """Numbered checkpoints ``<directory>/ckpt_<step>.safetensors``, keeping the last ``keep``.

    ``save(step, tree, metadata)`` writes atomically, then deletes the oldest beyond ``keep``;
    ``latest()`` / ``restore(template)`` return the newest.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, suffix: str = ".safetensors"):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"CheckpointManager: keep must be an integer >= 1, got {keep!r}")
        if suffix not in (".safetensors", ".npz"):
            raise ValueError(f"suffix must be '.safetensors' or '.npz', got {suffix!r}")
        self.directory = os.fspath(directory)
        self.keep = keep
        self.suffix = suffix

    def path_for(self, step: int) -> str:
        return os.path.join(self.directory, f"ckpt_{int(step):08d}{self.suffix}")

    def save(self, step: int, tree: Any, metadata: dict[str, Any] | None = None) -> str:
        path = save(self.path_for(step), tree, metadata)
        for _, old in list_checkpoints(self.directory)[: -self.keep]:
            with contextlib.suppress(OSError):
                os.remove(old)
        return path

    def latest(self) -> str | None:
        return latest(self.directory)

    def all(self) -> list[tuple[int, str]]:
        return list_checkpoints(self.directory)

    def restore(self, template: Any = None) -> Any:
        path = self.latest()
        if path is None:
            raise FileNotFoundError(f"no checkpoint (ckpt_<step>.*) in '{self.directory}'")
        return load(path, template)
