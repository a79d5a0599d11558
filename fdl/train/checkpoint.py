"""Checkpoints: any pytree of arrays to one safetensors file, atomically, without pickle.

File format: standard `safetensors <https://github.com/huggingface/safetensors>`_ (an 8-byte
little-endian header length, a JSON header, then raw little-endian tensor bytes). fdl writes the
format itself (it is ~20 lines), so checkpoints need no extra package and bfloat16 works; any
safetensors reader can open them. The header's ``__metadata__["fdl"]`` entry is a JSON document
describing the tree::

    {"format": "fdl-checkpoint", "version": 2,
     "leaves": [{"path": "params/conv1/w", "shape": [3, 3, 1, 6], "dtype": "float32",
                 "kind": "array"},          # or "key" (+ "impl"), "int", ...
                ...],
     "metadata": {...user JSON...}}

and ``__metadata__["fdl_sha256"]``, the first entry of the header (at a fixed byte offset), is
the SHA-256 of the *whole file* (length prefix, header and data) with those 64 hex digits
replaced by zeros: any change to a dtype, a shape, an offset, the tree description, the user
metadata or a data byte fails verification. Version-1 files (the checksum covered the data only)
are still read, with every header entry cross-checked against the tree description.

Paths are the ``/``-joined pytree paths (dict keys, NamedTuple field names, list indices), so a
checkpoint of ``{"params": ..., "opt_state": AdamState(...)}`` reads ``opt_state/0/mu/conv1/w``.
Typed PRNG keys are stored as their ``jax.random.key_data`` with the key implementation's name.

A path ending in ``.npz`` writes a NumPy ``.npz`` instead (arrays + the same JSON document as a
``uint8`` array, and the SHA-256 of that document and the data; read with
``allow_pickle=False``). Neither format ever uses pickle.

Writes are atomic: the bytes go to a temporary file in the destination directory, are
``fsync``-ed, then ``os.replace``-d over the destination; a crash at any point leaves the previous
checkpoint untouched. Loads verify the checksum, that every tensor read has the dtype and shape
the description says and, given a ``template`` pytree, the structure, shapes and dtypes of the
tensors actually read, naming every mismatching path. Every malformed file raises
:class:`CheckpointError` naming the file and what is wrong.

In a directory of numbered checkpoints, :func:`latest_valid` returns the newest one that
verifies, reporting each newer one it skips (corrupt, truncated, a stray zero-byte file); the
rotation of :class:`CheckpointManager` only ever deletes checkpoints older than the one just
written.
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
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdl.distributed.placement import place_like, to_host
from fdl.distributed.runtime import is_main_process, write_once

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "save",
    "load",
    "load_metadata",
    "latest",
    "latest_valid",
    "list_checkpoints",
    "verify",
]

FORMAT = "fdl-checkpoint"
VERSION = 2
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
        data = to_host(jax.random.key_data(leaf))
        desc = {"kind": "key", "impl": impl, "key_shape": list(leaf.shape)}
    elif isinstance(leaf, bool):
        data, desc = np.asarray(leaf, np.bool_), {"kind": "bool"}
    elif isinstance(leaf, int):
        data, desc = np.asarray(leaf, np.int64), {"kind": "int"}
    elif isinstance(leaf, float):
        data, desc = np.asarray(leaf, np.float64), {"kind": "float"}
    elif isinstance(leaf, (np.ndarray, np.generic, jax.Array)):
        data, desc = to_host(leaf), {"kind": "array"}
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


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (other threads may be
    creating files)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str, chunks: Iterable[bytes]) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_chunks(f, chunks)
            f.flush()
            if hasattr(os, "fchmod"):  # mkstemp's 0600 -> the mode a plain open() would give
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


# The header starts with these bytes, then the 64 hex digits of the file's SHA-256.
_SHA_PREFIX = b'{"__metadata__":{"fdl_sha256":"'
_SHA_AT = 8 + len(_SHA_PREFIX)
_ZERO_SHA = "0" * 64


def _file_sha(raw: bytes | bytearray | memoryview) -> str:
    """SHA-256 of a safetensors file with its checksum digits zeroed."""
    h = hashlib.sha256()
    h.update(raw[:_SHA_AT])
    h.update(_ZERO_SHA.encode())
    h.update(raw[_SHA_AT + 64 :])
    return h.hexdigest()


def _safetensors_chunks(arrays: list[np.ndarray], names: list[str], doc: dict) -> list[bytes]:
    header: dict[str, Any] = {
        "__metadata__": {"fdl_sha256": _ZERO_SHA, "fdl": json.dumps(doc, sort_keys=True)}
    }
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
    first = struct.pack("<Q", len(hbytes)) + hbytes
    assert first[8:_SHA_AT] == _SHA_PREFIX
    h = hashlib.sha256(first)
    data = [a.tobytes() for a in arrays]
    for d in data:
        h.update(d)
    first = first[:_SHA_AT] + h.hexdigest().encode() + first[_SHA_AT + 64 :]
    return [first, *data]


def save(path: str | os.PathLike, tree: Any, metadata: dict[str, Any] | None = None) -> str:
    """Save a pytree of arrays (and PRNG keys, Python scalars) to ``path`` atomically.

    ``metadata`` is any JSON-serialisable dict stored in the header (read it back with
    :func:`load_metadata`). Returns the path written. A ``.npz`` suffix selects NumPy's format,
    anything else safetensors.

    In a multi-process run (``jax.distributed``) every process calls ``save`` with the same
    tree: arrays split over processes are gathered, process 0 alone writes the file, and every
    process waits at a barrier until it is complete (:func:`fdl.distributed.write_once`; the
    directory must be on a file system all processes share). Any process can then load it.
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
    try:
        json.dumps(metadata or {})
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint: metadata must be JSON-serialisable: {e}") from None
    doc = {"format": FORMAT, "version": VERSION, "leaves": leaves, "metadata": metadata or {}}
    names = [d["path"] for d in leaves]

    def write() -> None:
        if path.endswith(".npz"):
            text = json.dumps(doc, sort_keys=True).encode("utf-8")
            h = hashlib.sha256(text)
            for a in arrays:
                h.update(a.tobytes())
            buf = io.BytesIO()
            payload = {f"t{i}": a for i, a in enumerate(arrays)}
            payload["__fdl__"] = np.frombuffer(text, np.uint8)
            payload["__fdl_sha256__"] = np.frombuffer(h.hexdigest().encode(), np.uint8)
            np.savez(buf, **payload)
            _atomic_write(path, [buf.getvalue()])
        else:
            _atomic_write(path, _safetensors_chunks(arrays, names, doc))

    write_once(path, write)  # in a multi-process run: process 0 writes, all wait (see above)
    return path


# ----------------------------------------------------------------------------- reading

# What a malformed file can raise while being parsed; all become CheckpointError.
_PARSE_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError,
                 struct.error, UnicodeDecodeError, zipfile.BadZipFile, EOFError, OSError,
                 zlib.error, NotImplementedError, RecursionError, MemoryError)


def _fail(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint '{path}': {what}")


def _read_bytes(path: str) -> bytes:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None


def _check_leaves(path: str, doc: Any) -> list[dict]:
    """The tree description's leaves, each checked for the fields and types reading needs."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}' is not an fdl checkpoint")
    leaves = doc.get("leaves")
    if not isinstance(leaves, list):
        raise _fail(path, "the tree description has no list of leaves")
    seen = set()
    for d in leaves:
        ok = (isinstance(d, dict) and isinstance(d.get("path"), str)
              and d.get("dtype") in _ST_CODES and isinstance(d.get("shape"), list)
              and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                      for n in d["shape"])
              and d.get("kind") in ("array", "key", "int", "float", "bool"))
        if not ok:
            raise _fail(path, f"malformed leaf description {d!r}")
        if d["path"] in seen:
            raise _fail(path, f"leaf '{d['path']}' is described twice")
        seen.add(d["path"])
    if not isinstance(doc.get("metadata", {}), dict):
        raise _fail(path, "metadata is not a JSON object")
    return leaves


def _parse_header(path: str, raw: bytes) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file."""
    if len(raw) < 8:
        raise _fail(path, f"is truncated ({len(raw)} bytes; not even the 8-byte length prefix)")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if hlen > len(raw) - 8:
        raise _fail(path, f"is truncated or not a safetensors file (the header length says "
                          f"{hlen} bytes, the file has {len(raw) - 8} after the prefix)")
    try:
        header = json.loads(raw[8 : 8 + hlen].decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(path, f"header is not valid JSON, the file is corrupt ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _fail(path, "header has no __metadata__: not written by fdl")
    return header, 8 + hlen


def _read_safetensors(path: str) -> tuple[dict, list[np.ndarray]]:
    raw = _read_bytes(path)
    header, start = _parse_header(path, raw)
    meta = header["__metadata__"]
    if "fdl" not in meta:
        raise _fail(path, "header has no fdl tree description: not written by fdl")
    sha = meta.get("fdl_sha256")
    if sha is not None:  # version 2: the checksum covers the whole file
        if raw[8:_SHA_AT] != _SHA_PREFIX:
            raise _fail(path, "is corrupt: the checksum is not where fdl writes it")
        got = _file_sha(raw)
        if got != sha:
            raise _fail(path, f"is corrupt: checksum mismatch (expected sha256 {sha}, got {got})")
    try:
        doc = json.loads(meta["fdl"])
    except (ValueError, TypeError) as e:
        raise _fail(path, f"tree description is not valid JSON ({e})") from None
    leaves = _check_leaves(path, doc)
    if sha is None and doc.get("version", 1) != 1:
        raise _fail(path, "has no checksum (a version-2 checkpoint always has one)")
    data = memoryview(raw)[start:]
    extra = set(header) - {"__metadata__"} - {d["path"] for d in leaves}
    if extra:
        raise _fail(path, f"tensors {sorted(extra)} are in the header but not in the tree "
                          "description")
    arrays, end_prev = [], 0
    for d in leaves:
        arrays.append(_tensor(path, header.get(d["path"]), d, data, end_prev))
        end_prev = header[d["path"]]["data_offsets"][1]
    if end_prev != len(data):
        raise _fail(path, f"has {len(data) - end_prev} bytes after the last tensor (expected "
                          f"{end_prev} data bytes, found {len(data)})")
    if sha is None:
        _check_v1_sum(path, doc, arrays)
    return doc, arrays


def _tensor(path: str, entry: Any, d: dict, data: memoryview, start: int) -> np.ndarray:
    """The tensor ``d`` describes, after checking its header ``entry`` agrees with ``d``."""
    name = d["path"]
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor '{name}' is missing from the header")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype != _ST_CODES[d["dtype"]]:
        raise _fail(path, f"tensor '{name}' has dtype {dtype!r} in the header but "
                          f"{d['dtype']} in the tree description")
    if shape != d["shape"]:
        raise _fail(path, f"tensor '{name}' has shape {shape!r} in the header but "
                          f"{d['shape']} in the tree description")
    itemsize = np.dtype(jnp.dtype(d["dtype"])).itemsize
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    if offsets != [start, start + nbytes]:
        raise _fail(path, f"tensor '{name}' has data offsets {offsets!r}, expected "
                          f"{[start, start + nbytes]} ({d['dtype']} {tuple(shape)})")
    if start + nbytes > len(data):
        raise _fail(path, f"is truncated at tensor '{name}' (needs bytes up to "
                          f"{start + nbytes}, the data section has {len(data)})")
    return np.frombuffer(data[start : start + nbytes], dtype=jnp.dtype(d["dtype"])).reshape(
        shape)


def _check_v1_sum(path: str, doc: dict, arrays: list[np.ndarray]) -> None:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    if h.hexdigest() != doc.get("sha256"):
        raise _fail(path, f"is corrupt: data checksum mismatch (expected sha256 "
                          f"{doc.get('sha256')}, got {h.hexdigest()})")


def _read_npz(path: str) -> tuple[dict, list[np.ndarray]]:
    raw = _read_bytes(path)
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        text = bytes(z["__fdl__"])
        sha = bytes(z["__fdl_sha256__"]).decode("ascii") if "__fdl_sha256__" in z.files else None
        doc = json.loads(text.decode("utf-8"))
        leaves = _check_leaves(path, doc)
        arrays = []
        for i, d in enumerate(leaves):
            a = np.array(z[f"t{i}"])
            want = np.dtype(jnp.dtype(d["dtype"]))
            if a.dtype != want and a.dtype.kind == "V" and a.dtype.itemsize == want.itemsize:
                a = a.view(want)  # e.g. bfloat16 comes back as raw void bytes
            if a.dtype != want or list(a.shape) != d["shape"]:
                raise _fail(path, f"tensor '{d['path']}' is {a.dtype} {a.shape}, the tree "
                                  f"description says {d['dtype']} {tuple(d['shape'])}")
            arrays.append(a)
    if sha is None:
        if doc.get("version", 1) != 1:
            raise _fail(path, "has no checksum (a version-2 checkpoint always has one)")
        _check_v1_sum(path, doc, arrays)
    else:
        h = hashlib.sha256(text)
        for a in arrays:
            h.update(a.tobytes())
        if h.hexdigest() != sha:
            raise _fail(path, f"is corrupt: checksum mismatch (expected sha256 {sha}, got "
                              f"{h.hexdigest()})")
    return doc, arrays


def _read(path: str) -> tuple[dict, list[np.ndarray]]:
    """``(tree description, arrays)`` of a verified checkpoint; :class:`CheckpointError` (or
    ``FileNotFoundError``) naming ``path`` for anything else."""
    try:
        if path.endswith(".npz"):
            return _read_npz(path)
        return _read_safetensors(path)
    except (CheckpointError, FileNotFoundError):
        raise
    except _PARSE_ERRORS as e:
        raise _fail(path, f"is corrupt or not written by fdl ({type(e).__name__}: {e})"
                    ) from None


def verify(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` (``FileNotFoundError`` if absent) unless ``path`` is an
    intact checkpoint: checksum, header and tree description all agree."""
    _read(os.fspath(path))


def _restore_leaf(path: str, desc: dict, a: np.ndarray):
    kind = desc["kind"]
    if kind in ("int", "float", "bool") and a.shape != ():
        raise _fail(path, f"leaf '{desc['path']}' is a Python {kind} but has shape {a.shape}")
    if kind == "key":
        try:
            return jax.random.wrap_key_data(jnp.asarray(a), impl=desc.get("impl"))
        except (ValueError, TypeError, KeyError) as e:
            raise _fail(path, f"PRNG key '{desc['path']}' cannot be restored ({e})") from None
    if kind == "int":
        return int(a)
    if kind == "float":
        return float(a)
    if kind == "bool":
        return bool(a)
    return jnp.asarray(a)


def _unflatten_nested(path: str, items: list[tuple[str, Any]]) -> Any:
    if len(items) == 1 and items[0][0] == _ROOT:
        return items[0][1]
    out: dict[str, Any] = {}
    for name, leaf in items:
        node = out
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise _fail(path, f"leaf paths collide at '{name}'")
        if parts[-1] in node:
            raise _fail(path, f"leaf paths collide at '{name}'")
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


def _template_problems(saved: dict, tpaths: list[str], tleaves: list, partial: bool):
    """Lines naming every difference between the template and the tensors read."""
    problems = [f"  {p}: in the template but missing from the checkpoint"
                for p in tpaths if p not in saved]
    if not partial:
        tset = set(tpaths)
        problems += [f"  {p}: in the checkpoint but not in the template"
                     for p in saved if p not in tset]
    for p, tleaf in zip(tpaths, tleaves, strict=True):
        if p not in saved:
            continue
        d, a = saved[p]
        shape, dtype, kind = _template_desc(tleaf)
        if kind == "key" and d["kind"] != "key":
            problems.append(f"  {p}: template expects a PRNG key, checkpoint has an array")
            continue
        if kind != "key" and d["kind"] == "key":
            problems.append(f"  {p}: checkpoint has a PRNG key, template expects {kind}")
            continue
        if tuple(a.shape) != shape:
            problems.append(f"  {p}: shape {tuple(a.shape)} in checkpoint, template {shape}")
        if kind in ("array", "key") and a.dtype.name != dtype:
            problems.append(f"  {p}: dtype {a.dtype.name} in checkpoint, template {dtype}")
    return problems


def load(path: str | os.PathLike, template: Any = None, *, partial: bool = False) -> Any:
    """Load a checkpoint written by :func:`save`.

    Without ``template``: a nested dict ``{name: ...}`` following the saved paths (NamedTuples
    and lists come back as dicts keyed by field name / index). With ``template`` (a pytree of
    arrays or ``jax.ShapeDtypeStruct`` of the expected structure, e.g. freshly initialised
    params): the same pytree structure filled with the saved values, after checking that the
    set of paths, and the shape and dtype of every tensor read, agree with it; on any mismatch
    raise :class:`CheckpointError` listing each mismatching path. ``partial=True`` ignores
    saved paths the template lacks (e.g. load only ``{"params", "state"}`` of a training
    checkpoint). A corrupt or malformed file raises :class:`CheckpointError` naming it.
    """
    path = os.fspath(path)
    doc, arrays = _read(path)
    saved = {d["path"]: (d, a) for d, a in zip(doc["leaves"], arrays, strict=True)}
    if template is None:
        return _unflatten_nested(
            path, [(d["path"], _restore_leaf(path, d, a)) for d, a in saved.values()])

    tflat, treedef = jax.tree_util.tree_flatten_with_path(template)
    tpaths = ["/".join(_key_str(k) for k in p) or _ROOT for p, _ in tflat]
    problems = _template_problems(saved, tpaths, [leaf for _, leaf in tflat], partial)
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the template ({len(problems)} problem(s); "
            "was it written by a different model or configuration?):\n" + "\n".join(problems)
        )
    # each value where its template leaf lives (e.g. replicated over a multi-process mesh)
    leaves = [place_like(_restore_leaf(path, *saved[p]), t)
              for p, (_, t) in zip(tpaths, tflat, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` dict stored by :func:`save` (the file is verified first)."""
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
    """Path of the newest checkpoint in ``directory`` (highest step), or ``None``; not
    verified (see :func:`latest_valid`)."""
    ckpts = list_checkpoints(directory)
    return ckpts[-1][1] if ckpts else None


def _warn_skipped(path: str, reason: str) -> None:
    warnings.warn(f"skipped a checkpoint that does not verify: {reason}", RuntimeWarning,
                  stacklevel=3)


def latest_valid(directory: str | os.PathLike,
                 on_skip: Callable[[str, str], None] | None = None) -> str | None:
    """Path of the newest checkpoint in ``directory`` that verifies (:func:`verify`), or
    ``None`` if there is none. Every newer one that fails is reported with
    ``on_skip(path, reason)`` (default: a ``RuntimeWarning``)."""
    on_skip = on_skip or _warn_skipped
    for _, path in reversed(list_checkpoints(directory)):
        try:
            verify(path)
        except (CheckpointError, OSError) as e:
            on_skip(path, str(e))
            continue
        return path
    return None


class CheckpointManager:
    """Numbered checkpoints ``<directory>/ckpt_<step>.safetensors``, keeping the last ``keep``.

    ``save(step, tree, metadata)`` writes atomically, then deletes the oldest checkpoints
    beyond ``keep`` among those with a *lower* step than the one just written: a checkpoint
    with a higher step (left by another run in the same directory) is never counted against
    ``keep``, so the run that is writing never loses its own checkpoints. ``latest()`` is the
    newest file, ``latest_valid()`` the newest that verifies, ``restore(template)`` loads it.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, suffix: str = ".safetensors"):
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
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
        if not is_main_process():  # process 0 rotates (see ``save``)
            return path
        older = [p for s, p in list_checkpoints(self.directory) if s < int(step)]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            with contextlib.suppress(OSError):
                os.remove(old)
        return path

    def latest(self) -> str | None:
        return latest(self.directory)

    def latest_valid(self, on_skip: Callable[[str, str], None] | None = None) -> str | None:
        return latest_valid(self.directory, on_skip)

    def all(self) -> list[tuple[int, str]]:
        return list_checkpoints(self.directory)

    def restore(self, template: Any = None) -> Any:
        """Load the newest checkpoint that verifies (warning about newer ones skipped)."""
        path = self.latest_valid()
        if path is None:
            raise FileNotFoundError(f"no intact checkpoint (ckpt_<step>.*) in "
                                    f"'{self.directory}'")
        return load(path, template)
