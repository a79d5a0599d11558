"""fdl._ext: build records, stale/foreign libraries, failed builds, concurrent first use.

A fake compiler (a shell script) stands in for g++ so that nothing here compiles C++: it prints
a version, logs each compile, and fails or "builds" by copying the real installed library."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fdl import config
from fdl._ext import build, loader

pytestmark = pytest.mark.skipif(
    build.find_onednn().include is None or build.find_onednn().library is None,
    reason="oneDNN from pip is not installed here (not Linux x86_64?)")

FAKECC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "fakecc $FAKECC_VERSION"; exit 0; fi
echo compile >> "$FAKECC_LOG"
sleep "${FAKECC_SLEEP:-0}"
while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then out="$2"; fi; shift; done
if [ -n "$FAKECC_OUTPUT" ]; then cp "$FAKECC_OUTPUT" "$out"; exit 0; fi
echo "fakecc: error: boom" >&2
exit 1
"""


@pytest.fixture
def fakecc(tmp_path, monkeypatch):
    """CXX = the fake compiler (failing unless FAKECC_OUTPUT is set); an empty cache; no
    installed library. Returns the compile log path."""
    cc = tmp_path / "fakecc"
    cc.write_text(FAKECC)
    cc.chmod(0o755)
    log = tmp_path / "compiles.log"
    monkeypatch.setenv("CXX", str(cc))
    monkeypatch.setenv("FAKECC_VERSION", "1.0")
    monkeypatch.setenv("FAKECC_LOG", str(log))
    monkeypatch.delenv("FAKECC_OUTPUT", raising=False)
    monkeypatch.setattr(loader, "installed_path", lambda name: tmp_path / "installed.so")
    loader.reset()
    with config.override(native_cache=str(tmp_path / "cache")):
        yield log
    loader.reset()


def _compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


_installed_path = loader.installed_path  # (the fixture replaces loader's)


def _real_library(name: str) -> Path:
    path = _installed_path(name)
    if build.read_record(path) is None:
        pytest.skip("fdl's native library was not built at install")
    return path


def test_installed_library_records_its_build():
    lib = build.LIBRARIES["conv"]
    record = build.read_record(_real_library("conv"))
    assert record["lib"] == "conv" and record["src"] == build.source_digest(lib)
    assert record["dnnl"] == build.find_onednn().version and record["cxx"]


def test_failed_build_is_remembered_and_retried_when_the_compiler_changes(fakecc, monkeypatch):
    with pytest.warns(loader.NativeKernelWarning, match="compiling conv_onednn.cc failed"):
        st = loader.load("conv")
    assert not st.loaded and _compiles(fakecc) == 1
    assert "boom" in next((Path(config.native_cache)).glob("conv-*.failed")).read_text()
    loader.reset()
    with pytest.warns(loader.NativeKernelWarning, match="failed before"):
        assert not loader.load("conv").loaded
    assert _compiles(fakecc) == 1  # not retried with the same compiler and oneDNN
    monkeypatch.setenv("FAKECC_VERSION", "2.0")
    loader.reset()
    with pytest.warns(loader.NativeKernelWarning, match="compiling conv_onednn.cc failed"):
        loader.load("conv")
    assert _compiles(fakecc) == 2  # a new compiler: a new build key, built again


def test_stale_or_foreign_library_is_rebuilt_not_loaded(fakecc, tmp_path):
    lib = build.LIBRARIES["conv"]
    stale = tmp_path / "installed.so"
    stale.write_bytes(b"\x7fELF garbage FDL_BUILD_INFO{lib=conv;src=0123456789abcdef;dnnl="
                      + build.find_onednn().version.encode() + b"} more garbage")
    assert "another build" in loader._valid(stale, lib, build.find_onednn().version)
    with pytest.warns(loader.NativeKernelWarning) as record:
        st = loader.load("conv")
    assert not st.loaded and _compiles(fakecc) == 1  # a rebuild was tried; nothing loaded
    assert "another build" in st.reason and "cannot load" not in st.reason
    assert len(record) == 1
    # a file in the cache under the right name but with a foreign record is not loaded either
    assert "has no build record" in loader._valid(tmp_path / "fakecc", lib, "3.2.0")


def test_concurrent_first_use_compiles_once(fakecc, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKECC_OUTPUT", str(_real_library("conv")))
    monkeypatch.setenv("FAKECC_SLEEP", "1")
    monkeypatch.setenv("FDL_NATIVE_CACHE", str(tmp_path / "shared-cache"))
    code = textwrap.dedent(f"""
        from pathlib import Path
        from fdl._ext import loader
        loader.installed_path = lambda name: Path({str(tmp_path / "none.so")!r})
        print(loader.load("conv").loaded)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [o[0].strip() for o in outs] == ["True", "True"], outs
    assert _compiles(fakecc) == 1
