"""Load fdl's native CPU kernels (built by :mod:`fdl._ext.build`) and register their FFI targets.

:func:`load` finds, for one library, the first valid build among

1. the copy ``pip install`` built next to the sources (``fdl/_ext/_<name>.<ext-suffix>``);
2. a first-use build in ``fdl.config.native_cache`` named by the hash of its build record
   (made here, once per machine and toolchain, under a file lock so that concurrent processes
   compile once; unless ``fdl.config.native_build == "never"``),

where *valid* means the build record stored in the file (read from its bytes, before loading)
matches this checkout's source and the oneDNN this environment has. Then it loads oneDNN's
``libdnnl.so.3`` from the pip package, the library with ``ctypes`` and registers its targets
with ``jax.ffi`` for the CPU platform. Nothing happens until the first native-eligible call (or
:func:`fdl.kernels`).

If the library cannot be had, :func:`load` says why (:class:`Status`) and warns once per
reason (:class:`NativeKernelWarning`, with the fix); callers then use XLA.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import importlib.machinery
import threading
import warnings
from pathlib import Path

from fdl import config
from fdl._ext import build

__all__ = ["NativeKernelWarning", "Status", "enabled", "load", "library", "status"]


class NativeKernelWarning(RuntimeWarning):
    """A native CPU kernel is unavailable and fdl uses XLA's instead (slower on CPU)."""


@dataclasses.dataclass(frozen=True)
class Status:
    """Whether a native library is loaded: ``path`` and ``onednn`` version if so, else
    ``reason`` and ``fix``."""

    name: str
    loaded: bool
    path: str = ""
    onednn: str = ""
    reason: str = ""
    fix: str = ""


_WHAT = {"conv": "convolutions", "dense": "dense layers' matrix products",
         "rnn": "LSTM/GRU loops", "optim": "fused optimizer steps",
         "norm": "batch norms"}
_lock = threading.Lock()
_status: dict[str, Status] = {}
_dlls: dict[str, ctypes.CDLL] = {}
_registered: set[str] = set()
_warned: set[str] = set()
_libdnnl: dict[str, object] = {}


def installed_path(name: str) -> Path:
    """Where ``pip install`` puts library ``name`` (next to the sources)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return build.HERE / f"_{build.LIBRARIES[name].source.removesuffix('.cc')}{suffix}"


def cache_dir() -> Path:
    return Path(config.get("native_cache"))


def _runtime_onednn() -> tuple[Path, str]:
    """``(path of libdnnl.so.3, its version)``, loaded once into the process (so the native
    libraries, which need ``libdnnl.so.3``, find it wherever pip put it)."""
    if "path" in _libdnnl:
        return _libdnnl["path"], _libdnnl["version"]  # type: ignore[return-value]
    found = build.find_onednn().library
    if found is None:
        raise build.BuildError(
            "oneDNN's library (libdnnl.so.3) is not installed",
            f"pip install '{build.ONEDNN_RUNTIME}=={build.ONEDNN_PIP_VERSION}'")
    try:
        dll = ctypes.CDLL(str(found))
    except OSError as e:
        raise build.BuildError(f"cannot load {found}: {e}",
                               "install GNU OpenMP (libgomp1), which oneDNN needs") from e

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                    ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                    ("gpu_runtime", ctypes.c_uint)]

    dll.dnnl_version.restype = ctypes.POINTER(Version)
    v = dll.dnnl_version().contents
    _libdnnl.update(path=found, version=f"{v.major}.{v.minor}.{v.patch}", dll=dll)
    return found, _libdnnl["version"]  # type: ignore[return-value]


def _valid(path: Path, lib: build.Library, onednn_version: str) -> str:
    """'' if ``path`` is a build of this source against this oneDNN, else why not."""
    record = build.read_record(path)
    want = {"lib": lib.name, "src": build.source_digest(lib), "dnnl": onednn_version}
    if record is None:
        return f"{path.name} has no build record"
    if not build.same_build(record, want):
        got = ", ".join(f"{k} {record.get(k)} (want {v})" for k, v in want.items()
                        if record.get(k) != v)
        return f"{path.name} is another build: {got}"
    return ""


def _cached_build(lib: build.Library, onednn_version: str, force: bool) -> Path:
    """A valid build in the cache: found, or compiled now (once across processes)."""
    onednn, cxx_version, ffi_dir = build.check_toolchain(lib)
    record = build.build_record(lib, onednn, cxx_version, ffi_dir)
    if record["dnnl"] != onednn_version:
        raise build.BuildError(f"oneDNN headers ({record['dnnl']}) and library "
                               f"({onednn_version}) differ", build.INSTALL_HINT)
    directory = cache_dir()
    stem = f"{lib.name}-{build.record_key(record)}"
    path, failed = directory / f"{stem}.so", directory / f"{stem}.failed"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be compiling the same build
        if not force and path.exists() and not _valid(path, lib, onednn_version):
            return path
        if not force and failed.exists():
            raise build.BuildError(
                f"building {lib.source} failed before with this compiler and oneDNN "
                f"(log: {failed})", "fix the error in the log, then `python -m fdl._ext.build "
                "--force`")
        if config.get("native_build") == "never":
            raise build.BuildError("no valid build and fdl.config.native_build is 'never'",
                                   "`python -m fdl._ext.build` or reinstall fdl")
        try:
            build.compile_library(lib, path)
        except build.BuildError as e:
            failed.write_text(f"{e.reason}\n{e.log}")
            raise
        failed.unlink(missing_ok=True)
        return path


def _register(lib: build.Library, dll: ctypes.CDLL) -> None:
    import jax.ffi

    try:
        handlers = {target: getattr(dll, symbol) for target, symbol in lib.targets.items()}
    except AttributeError as e:
        raise build.BuildError(f"{lib.source}'s library lacks a handler ({e})",
                               "`python -m fdl._ext.build --force`") from e
    for target, handler in handlers.items():
        if target not in _registered:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
            _registered.add(target)


def _load(name: str, force: bool) -> Status:
    lib = build.LIBRARIES[name]
    try:
        _, onednn_version = _runtime_onednn()
        path = installed_path(name)
        stale = "not built at install" if not path.exists() else _valid(path, lib,
                                                                         onednn_version)
        if force or stale:
            try:
                path = _cached_build(lib, onednn_version, force)
            except build.BuildError as e:
                where = f" (installed copy: {stale})" if stale else ""
                raise build.BuildError(e.reason + where, e.fix) from e
        try:
            dll = ctypes.CDLL(str(path))
        except OSError as e:
            raise build.BuildError(f"cannot load {path}: {e}",
                                   "`python -m fdl._ext.build --force`") from e
        _register(lib, dll)
    except build.BuildError as e:
        return Status(name, False, reason=e.reason, fix=e.fix)
    _dlls[name] = dll
    return Status(name, True, path=str(path), onednn=onednn_version)


def load(name: str, *, force: bool = False) -> Status:
    """Load native library ``name`` (``"conv"``, ``"dense"`` or ``"rnn"``) once per process
    (``force``: rebuild it into the cache and reload); warn once if it is unavailable."""
    with _lock:
        st = _status.get(name)
        if st is None or force:
            st = _status[name] = _load(name, force)
    if not st.loaded and st.reason not in _warned:
        _warned.add(st.reason)
        what = _WHAT[name]
        warnings.warn(
            f"fdl: the native CPU kernels for {what} are unavailable ({st.reason}); "
            f"using XLA's, which are slower on CPU. Fix: {st.fix or 'see the reason'}. "
            f"(fdl.kernels() shows what runs; fdl.config.update('<op>_backend', "
            f"'xla') chooses XLA without this warning.)", NativeKernelWarning, stacklevel=3)
    return st


def enabled(name: str, option: str) -> bool:
    """Whether ``fdl.config.<option>`` (``auto``/``native``/``xla``) allows native library
    ``name`` and it loads; with ``native`` an unavailable library is an error. Read when a
    function is traced."""
    backend = config.get(option)
    if backend == "xla":
        return False
    st = load(name)
    if not st.loaded and backend == "native":
        raise RuntimeError(f"fdl.config.{option} is 'native' but the native {_WHAT[name]} are "
                           f"unavailable: {st.reason}. Fix: {st.fix}")
    return st.loaded


def status(name: str) -> Status | None:
    """The outcome of the last :func:`load` of ``name`` (``None`` if never tried)."""
    return _status.get(name)


def library(name: str) -> ctypes.CDLL | None:
    """The loaded library ``name`` (for its plain C entry points), or ``None``."""
    return _dlls.get(name) if load(name).loaded else None


def reset() -> None:
    """Forget load outcomes and warnings (tests); loaded libraries stay loaded."""
    with _lock:
        _status.clear()
        _warned.clear()

