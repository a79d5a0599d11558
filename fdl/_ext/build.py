"""Build and load fdl's optional native extensions (XLA FFI custom calls, linked to oneDNN).

Three extensions, each its own library: the oneDNN convolution (``conv_onednn.cc``;
:func:`load`), the LSTM/GRU time loop (``rnn_cpu.cc``, oneDNN's ``dnnl_sgemm``; :func:`load_rnn`)
and the LSTM/GRU direction through oneDNN's RNN primitives (``rnn_onednn.cc``;
:func:`load_rnn_onednn`), the last two used by :mod:`fdl.nn.recurrent`. Each is compiled lazily on
first use into a cache directory keyed by a hash of the source, the compiler command and the jaxlib
version, and loaded with ``ctypes``. If no C++ compiler or no oneDNN (``libdnnl-dev``) is found,
:func:`load` (:func:`load_rnn`, :func:`load_rnn_onednn`) returns ``False`` and
:mod:`fdl.nn.conv_lowering` (:mod:`fdl.nn.recurrent`) uses XLA (one debug log line says why).

Ahead of time (e.g. in CI or a Docker image)::

    python -m fdl._ext.build            # compile + register + a smoke test; exit 1 if unavailable
    python -m fdl._ext.build --force    # ignore a cached failure / rebuild

Environment:
- ``FDL_EXT_CACHE``: cache directory (default ``$XDG_CACHE_HOME/fdl/ext`` or ``~/.cache/fdl/ext``).
- ``FDL_EXT_BUILD=0``: never compile; only load an already built library.
- ``CXX`` (default ``g++``), ``DNNL_ROOT`` (a prefix holding ``include/`` and ``lib/``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("fdl._ext")

SOURCE = Path(__file__).with_name("conv_onednn.cc")
TARGETS = {
    "fdl_conv_fwd": "FdlConvFwd",
    "fdl_conv_bwd_data": "FdlConvBwdData",
    "fdl_conv_bwd_data_flip": "FdlConvBwdDataFlip",
    "fdl_conv_bwd_weights": "FdlConvBwdWeights",
}
RNN_SOURCE = Path(__file__).with_name("rnn_cpu.cc")
RNN_TARGETS = {
    "fdl_lstm_fwd": "FdlLstmFwd",
    "fdl_lstm_bwd": "FdlLstmBwd",
    "fdl_lstm_bwd_dw": "FdlLstmBwdDw",
    "fdl_gru_fwd": "FdlGruFwd",
    "fdl_gru_bwd": "FdlGruBwd",
    "fdl_gru_bwd_dw": "FdlGruBwdDw",
}
RNN_ONEDNN_SOURCE = Path(__file__).with_name("rnn_onednn.cc")
RNN_ONEDNN_TARGETS = {
    "fdl_lstm_dnnl_fwd": "FdlLstmDnnlFwd",
    "fdl_lstm_dnnl_bwd": "FdlLstmDnnlBwd",
    "fdl_lstm_dnnl_infer": "FdlLstmDnnlInfer",
    "fdl_gru_dnnl_fwd": "FdlGruDnnlFwd",
    "fdl_gru_dnnl_bwd": "FdlGruDnnlBwd",
    "fdl_gru_dnnl_infer": "FdlGruDnnlInfer",
}

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "reason": ""}
_rnn_state: dict[str, object] = {"loaded": None, "reason": ""}
_rnn_onednn_state: dict[str, object] = {"loaded": None, "reason": "", "dll": None}


def cache_dir() -> Path:
    if os.environ.get("FDL_EXT_CACHE"):
        return Path(os.environ["FDL_EXT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fdl" / "ext"


def _command(out: Path, source: Path = SOURCE) -> list[str]:
    import jax.ffi

    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
    root = os.environ.get("DNNL_ROOT")
    if root:
        cmd += [f"-I{root}/include", f"-L{root}/lib", f"-Wl,-rpath,{root}/lib"]
    return cmd + [str(source), "-o", str(out), "-ldnnl"]


def library_path(source: Path = SOURCE) -> Path:
    """Where the library for the current source/compiler/jaxlib lives (built or not)."""
    import jaxlib

    h = hashlib.sha256(source.read_bytes())
    h.update(" ".join(_command(Path("x"), source)).encode())
    h.update(getattr(jaxlib, "__version__", "?").encode())
    return cache_dir() / f"{source.stem}-{h.hexdigest()[:16]}.so"


def build(force: bool = False, source: Path = SOURCE) -> Path:
    """Compile the extension (if not cached) and return the library path; raises on failure."""
    lib = library_path(source)
    failed = lib.with_suffix(".failed")
    if lib.exists() and not force:
        return lib
    if failed.exists() and not force:
        raise RuntimeError(f"an earlier build failed (see {failed}; retry with --force)")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    log.info("fdl: compiling the native extension %s into %s", source.name, lib)
    proc = subprocess.run(_command(Path(tmp), source), capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        failed.write_text(" ".join(_command(lib, source)) + "\n" + proc.stderr)
        raise RuntimeError(f"compiling {source.name} failed (log: {failed})")
    os.replace(tmp, lib)
    failed.unlink(missing_ok=True)
    return lib


def _load(source: Path, targets: dict[str, str], state: dict[str, object], what: str) -> bool:
    with _lock:
        if state["loaded"] is not None:
            return bool(state["loaded"])
        try:
            lib = library_path(source)
            if not lib.exists() and os.environ.get("FDL_EXT_BUILD", "1") == "0":
                raise RuntimeError("not built and FDL_EXT_BUILD=0")
            lib = build(source=source)
            dll = ctypes.CDLL(str(lib))
            import jax.ffi

            for name, sym in targets.items():
                jax.ffi.register_ffi_target(
                    name, jax.ffi.pycapsule(getattr(dll, sym)), platform="cpu"
                )
            state["dll"] = dll
            state["loaded"] = True
        except Exception as e:  # noqa: BLE001 - any failure means "use XLA"
            state["loaded"] = False
            state["reason"] = str(e)
            log.debug("fdl: %s extension unavailable (%s); using XLA", what, e)
        return bool(state["loaded"])


def load() -> bool:
    """Build if needed, load and register the convolution FFI targets once. ``False`` if
    unavailable."""
    return _load(SOURCE, TARGETS, _state, "oneDNN convolution")


def load_rnn() -> bool:
    """Build if needed, load and register the LSTM/GRU FFI targets once. ``False`` if
    unavailable."""
    return _load(RNN_SOURCE, RNN_TARGETS, _rnn_state, "native RNN")


def load_rnn_onednn() -> bool:
    """Build if needed, load and register the oneDNN RNN-primitive (LSTM/GRU) FFI targets once.
    ``False`` if unavailable."""
    return _load(RNN_ONEDNN_SOURCE, RNN_ONEDNN_TARGETS, _rnn_onednn_state, "oneDNN RNN")


def rnn_onednn_library() -> ctypes.CDLL | None:
    """The loaded ``rnn_onednn`` library (for its plain C entry points), or ``None``."""
    return _rnn_onednn_state["dll"] if load_rnn_onednn() else None  # type: ignore[return-value]


def rnn_onednn_unavailable_reason() -> str:
    return str(_rnn_onednn_state["reason"])


def rnn_unavailable_reason() -> str:
    return str(_rnn_state["reason"])


def unavailable_reason() -> str:
    return str(_state["reason"])


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fdl._ext.build", description=__doc__.split("\n")[0])
    p.add_argument("--force", action="store_true", help="rebuild even if cached or failed before")
    args = p.parse_args(argv)
    try:
        path = build(force=args.force)
        rnn_path = build(force=args.force, source=RNN_SOURCE)
        rnn_onednn_path = build(force=args.force, source=RNN_ONEDNN_SOURCE)
    except Exception as e:  # noqa: BLE001
        print(f"fdl._ext: build failed: {e}", file=sys.stderr)
        return 1
    if not load_rnn():
        print(f"fdl._ext: built {rnn_path} but loading failed: {rnn_unavailable_reason()}",
              file=sys.stderr)
        return 1
    print(f"fdl._ext: native RNN extension OK ({rnn_path})")
    if not load_rnn_onednn():
        print(f"fdl._ext: built {rnn_onednn_path} but loading failed: "
              f"{rnn_onednn_unavailable_reason()}", file=sys.stderr)
        return 1
    print(f"fdl._ext: oneDNN RNN-primitive extension OK ({rnn_onednn_path})")
    if not load():
        print(f"fdl._ext: built {path} but loading failed: {unavailable_reason()}", file=sys.stderr)
        return 1
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from fdl.nn.conv_lowering import conv2d_nhwc

    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 8), jnp.float32)
    os.environ["FDL_CONV_BACKEND"] = "onednn"
    got = conv2d_nhwc(x, w, (1, 1), ((1, 1), (1, 1)))
    ref = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    print(f"fdl._ext: oneDNN convolution extension OK ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
