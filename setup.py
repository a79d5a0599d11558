"""Builds fdl's native CPU kernels when fdl is installed (metadata lives in pyproject.toml).

Each native library (fdl/_ext/build.py: ``LIBRARIES``) is a setuptools extension whose
``build_ext`` step runs fdl's own compile (the same one a first-use build runs): oneDNN from the
``onednn-devel-cpu-gomp`` build requirement, the XLA FFI headers from ``jaxlib``. If it cannot be
built (no C++ compiler, a platform without the oneDNN wheels) the install still succeeds with a
warning and fdl uses XLA's kernels (or builds them on first use once a compiler exists).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _build_module():
    spec = importlib.util.spec_from_file_location("_fdl_native_build",
                                                  HERE / "fdl" / "_ext" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


# Installed as <prefix>/lib/pythonX.Y/site-packages/fdl/_ext/, next to oneDNN's <prefix>/lib.
_RPATH_TO_PREFIX_LIB = "$ORIGIN/../../../.."


class BuildNative(build_ext):
    """Compile each library with fdl/_ext/build.py; a failure is a warning, not an error (and
    the library is left out of the outputs)."""

    def get_outputs(self) -> list[str]:
        return [p for p in super().get_outputs() if Path(p).exists()]

    def get_output_mapping(self) -> dict[str, str]:
        return {k: v for k, v in super().get_output_mapping().items() if Path(k).exists()}

    def build_extension(self, ext: Extension) -> None:
        build = _build_module()
        (lib,) = [lib for lib in build.LIBRARIES.values()
                  if ext.name == f"fdl._ext._{Path(lib.source).stem}"]
        out = Path(self.get_ext_fullpath(ext.name))
        try:
            record = build.compile_library(lib, out, rpaths=(_RPATH_TO_PREFIX_LIB,))
        except build.BuildError as e:
            self.warn(f"fdl: native library {lib.name!r} not built: {e.reason}"
                      + (f" (fix: {e.fix})" if e.fix else "")
                      + "; fdl will use XLA's kernels for it\n" + e.log[-4000:])
            return
        print(f"fdl: built native library {lib.name!r} ({out.name}; oneDNN {record['dnnl']})")


setup(
    ext_modules=[Extension(f"fdl._ext._{Path(lib.source).stem}", sources=[f"fdl/_ext/{lib.source}"],
                           optional=True)
                 for lib in _build_module().LIBRARIES.values()],
    cmdclass={"build_ext": BuildNative},
)
