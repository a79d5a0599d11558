"""Compile fdl's native CPU kernels (XLA FFI handlers linked to oneDNN 3 from pip).

Five libraries, each one C++ source: ``conv`` (``conv_onednn.cc``: oneDNN's convolutions),
``dense`` (``dense_onednn.cc``: the matrix products of dense layers, oneDNN's sgemm), ``rnn``
(``rnn_cpu.cc``: the LSTM/GRU time loops), ``optim`` (``optim_cpu.cc``: fused optimizer
steps, OpenMP only) and ``norm`` (``norm_cpu.cc``: training-mode batch norm, on XLA's own
thread pool). ``pip install`` builds them (``setup.py``
calls :func:`compile_library` from its ``build_ext``); :mod:`fdl._ext.loader` loads them, or
builds them on first use into a cache when the installed copy is missing or stale (a source
checkout on ``PYTHONPATH``, a failed install-time build, a changed compiler or oneDNN).

This module uses only the standard library: ``setup.py`` imports it by path, before fdl, jax
or oneDNN are importable.

Where things come from:
- oneDNN: the pip packages ``onednn-devel-cpu-gomp`` (headers) and ``onednn-cpu-gomp``
  (``lib/libdnnl.so.3``, GNU OpenMP), found through their installed file lists, else under
  ``sys.prefix``. oneDNN 2.x (Debian's ``libdnnl-dev``) is not supported: the sources use the
  oneDNN 3 API.
- the XLA FFI headers: ``jaxlib/include`` (jaxlib is a build requirement).
- the compiler: ``$CXX``, else ``g++``.

Every library carries a build record (``FDL_BUILD_INFO{...}`` in its read-only data): the
digest of its source, the oneDNN version, the FFI headers' digest and the compiler. The loader
reads it from the file *before* loading anything and rebuilds a library whose record does not
match (never loads a stale or foreign one blindly); the cache file name is a hash of the record,
so a changed compiler or oneDNN means a new build, and a failed build is retried then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# oneDNN from pip: the version the sources are written and tested against.
ONEDNN_RUNTIME = "onednn-cpu-gomp"
ONEDNN_DEVEL = "onednn-devel-cpu-gomp"
ONEDNN_PIP_VERSION = "2023.2.0"
ONEDNN_MIN_MAJOR = 3
INSTALL_HINT = f"pip install '{ONEDNN_DEVEL}=={ONEDNN_PIP_VERSION}'"


@dataclasses.dataclass(frozen=True)
class Library:
    """One native library: its C++ source and the FFI targets it defines (JAX name -> C symbol).
    """

    name: str
    source: str
    targets: dict[str, str]
    flags: tuple[str, ...] = ()

    @property
    def source_path(self) -> Path:
        return HERE / self.source


LIBRARIES: dict[str, Library] = {
    "conv": Library("conv", "conv_onednn.cc", {
        "fdl_conv_fwd": "FdlConvFwd",
        "fdl_conv_bwd_data": "FdlConvBwdData",
        "fdl_conv_bwd_weights": "FdlConvBwdWeights",
    }),
    "dense": Library("dense", "dense_onednn.cc", {"fdl_matmul": "FdlMatmul",
                                                  "fdl_heads_matmul": "FdlHeadsMatmul"}),
    "rnn": Library("rnn", "rnn_cpu.cc", {
        "fdl_lstm_fwd": "FdlLstmFwd",
        "fdl_lstm_bwd_dw": "FdlLstmBwdDw",
        "fdl_gru_fwd": "FdlGruFwd",
        "fdl_gru_bwd_dw": "FdlGruBwdDw",
    }),
    "optim": Library("optim", "optim_cpu.cc", {"fdl_adam_step": "FdlAdamStep",
                                               "fdl_momentum_step": "FdlMomentumStep"},
                     # FMA contraction as XLA:CPU's loops (the same values bit for bit where
                     # the CPU has FMA), sqrt without errno (vectorised)
                     flags=("-fopenmp", "-ffp-contract=fast", "-fno-math-errno")),
    "norm": Library("norm", "norm_cpu.cc", {"fdl_batch_norm_fwd": "FdlBatchNormFwd",
                                            "fdl_batch_norm_bwd": "FdlBatchNormBwd"},
                    flags=("-ffp-contract=fast", "-fno-math-errno")),
}


class BuildError(RuntimeError):
    """A library cannot be built here; ``fix`` says what would make it buildable."""

    def __init__(self, reason: str, fix: str = "", log: str = ""):
        super().__init__(reason)
        self.reason, self.fix, self.log = reason, fix, log


# ----------------------------------------------------------------------------- oneDNN


@dataclasses.dataclass(frozen=True)
class OneDNN:
    """Where oneDNN's headers and ``libdnnl.so.3`` are (either may be missing)."""

    include: Path | None
    library: Path | None

    @property
    def version(self) -> str | None:
        """``major.minor.patch`` from the headers (``None`` without headers)."""
        if self.include is None:
            return None
        text = (self.include / "oneapi" / "dnnl" / "dnnl_version.h").read_text()
        parts = [re.search(rf"#define DNNL_VERSION_{p}\s+(\d+)", text) for p in
                 ("MAJOR", "MINOR", "PATCH")]
        return ".".join(m.group(1) for m in parts) if all(parts) else None


def _dist_file(dist: str, suffix: str) -> Path | None:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:  # (recorded relative to site-packages, e.g. "../../../lib/libdnnl.so.3")
        if ("/" + str(f).replace("\\", "/")).endswith("/" + suffix):
            path = Path(f.locate()).resolve()
            if path.exists():
                return path
    return None


def find_onednn() -> OneDNN:
    """oneDNN from the pip packages (their installed file lists), else ``sys.prefix``."""
    header = _dist_file(ONEDNN_DEVEL, "include/oneapi/dnnl/dnnl.hpp")
    lib = _dist_file(ONEDNN_RUNTIME, "libdnnl.so.3")
    prefix = Path(sys.prefix)
    if header is None and (prefix / "include/oneapi/dnnl/dnnl.hpp").exists():
        header = prefix / "include/oneapi/dnnl/dnnl.hpp"
    if lib is None and (prefix / "lib/libdnnl.so.3").exists():
        lib = prefix / "lib/libdnnl.so.3"
    include = header.parents[2] if header is not None else None
    return OneDNN(include, lib)


# ----------------------------------------------------------------------------- toolchain


def ffi_include_dir() -> Path:
    """jaxlib's ``include`` directory (the XLA FFI headers), without importing jax."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("jaxlib is not installed (it provides the XLA FFI headers)",
                         "pip install jaxlib")
    inc = Path(list(spec.submodule_search_locations)[0]) / "include"
    if not (inc / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise BuildError(f"no XLA FFI headers under {inc}", "reinstall jaxlib")
    return inc


def compiler() -> tuple[str, str]:
    """``(path, version line)`` of the C++ compiler (``$CXX`` or ``g++``)."""
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise BuildError(f"no C++ compiler ({cxx!r} is not on PATH)",
                         "install one (e.g. `apt-get install g++`), then run "
                         "`python -m fdl._ext.build` (or reinstall fdl)")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        version = (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "unknown"
    return path, version


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def source_digest(lib: Library) -> str:
    return _digest(lib.source_path)


def build_record(lib: Library, onednn: OneDNN, cxx_version: str, ffi_dir: Path) -> dict[str, str]:
    """What a library built now from these inputs records about itself."""
    ffi = ffi_dir / "xla" / "ffi" / "api"
    return {
        "lib": lib.name,
        "src": source_digest(lib),
        "dnnl": onednn.version or "?",
        "ffi": _digest(ffi / "c_api.h", ffi / "api.h", ffi / "ffi.h"),
        "cxx": re.sub(r"[^A-Za-z0-9 ._()+-]", "", cxx_version)[:80],
    }


def record_key(record: dict[str, str]) -> str:
    return hashlib.sha256(repr(sorted(record.items())).encode()).hexdigest()[:16]


def _encode(record: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in record.items())


def read_record(path: Path) -> dict[str, str] | None:
    """The build record stored in a built library, read from its bytes (nothing is loaded);
    ``None`` if the file has none."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    m = re.search(rb"FDL_BUILD_INFO\{([^}\x00]*)\}", data)
    if m is None:
        return None
    pairs = (item.split("=", 1) for item in m.group(1).decode(errors="replace").split(";"))
    return {k: v for k, v in pairs if k}


def check_toolchain(lib: Library) -> tuple[OneDNN, str, Path]:
    """``(oneDNN, compiler version, FFI include dir)`` for building ``lib`` here, or
    :class:`BuildError` saying what is missing and how to get it."""
    onednn = find_onednn()
    if onednn.include is None:
        raise BuildError("no oneDNN headers (oneapi/dnnl/dnnl.hpp)", INSTALL_HINT)
    version = onednn.version or "?"
    if not version[0].isdigit() or int(version.split(".")[0]) < ONEDNN_MIN_MAJOR:
        raise BuildError(f"oneDNN {version} at {onednn.include} is older than 3.0",
                         INSTALL_HINT)
    if onednn.library is None:
        raise BuildError("no oneDNN library (libdnnl.so.3)",
                         f"pip install '{ONEDNN_RUNTIME}=={ONEDNN_PIP_VERSION}'")
    ffi_dir = ffi_include_dir()
    _, cxx_version = compiler()
    return onednn, cxx_version, ffi_dir


def same_build(record: dict[str, str] | None, want: dict[str, str]) -> bool:
    """Whether a library with build record ``record`` is a build of ``want``'s source against
    ``want``'s oneDNN (the compiler does not matter for using it)."""
    return record is not None and all(record.get(k) == want[k] for k in ("lib", "src", "dnnl"))


def compile_library(lib: Library, out: Path, *, rpaths: tuple[str, ...] | None = None
                    ) -> dict[str, str]:
    """Compile ``lib`` into ``out`` (written atomically) and return its build record; raises
    :class:`BuildError` (with the compiler's log) on failure. ``rpaths``: where the library
    looks for ``libdnnl.so.3`` (default: the directory it was found in now)."""
    onednn, cxx_version, ffi_dir = check_toolchain(lib)
    cxx, _ = compiler()
    record = build_record(lib, onednn, cxx_version, ffi_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    libdir = onednn.library.parent  # type: ignore[union-attr]
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", *lib.flags,
           f"-DFDL_BUILD_INFO=\"{_encode(record)}\"",
           f"-I{ffi_dir}", f"-I{onednn.include}", str(lib.source_path), "-o", tmp,
           str(onednn.library)]
    cmd += [f"-Wl,-rpath,{r}" for r in (rpaths if rpaths is not None else (str(libdir),))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise BuildError(f"cannot run the compiler: {e}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        log = " ".join(cmd) + "\n" + proc.stdout + proc.stderr
        raise BuildError(f"compiling {lib.source} failed", log=log)
    if not same_build(read_record(Path(tmp)), record):
        os.unlink(tmp)
        raise BuildError(f"the compiler ({cxx}) produced no library of {lib.source}",
                         log=" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    os.replace(tmp, out)
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m fdl._ext.build [--force]``: build (if needed) and load every native library
    for this environment, then print which kernels run here."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fdl._ext.build",
                                description="Build and check fdl's native CPU kernels.")
    p.add_argument("--force", action="store_true",
                   help="rebuild into the cache even if a valid build exists or one failed")
    args = p.parse_args(argv)
    from fdl._ext import loader
    from fdl.runtime import kernels_table

    ok = True
    for name in LIBRARIES:
        status = loader.load(name, force=args.force)
        ok &= status.loaded
    print(kernels_table())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

