"""fdl.runtime: nothing happens at ``import fdl``; the explicit allocator call; fdl.kernels()."""

import subprocess
import sys

import pytest

import fdl
import fdl.runtime
from fdl import config

# How many of glibc's mmapped blocks a 256 MiB malloc adds (1 with glibc's defaults, 0 once
# M_MMAP_MAX is 0), after SETUP.
PROBE = """
import ctypes
{setup}
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
p = libc.malloc(256 << 20)
print(libc.mallinfo2().hblks - before)
"""


# The same malloc from a new thread: glibc gives the thread an arena of its own (no single-arena
# setting), and a thread arena maps a block that large whatever M_MMAP_MAX says.
IN_THREAD = PROBE.replace("p = libc.malloc(256 << 20)\n", """import threading
t = threading.Thread(target=lambda: libc.malloc(256 << 20))
t.start()
t.join()
""")


def _mmapped_blocks(setup: str, probe: str = PROBE) -> str:
    out = subprocess.run([sys.executable, "-c", probe.format(setup=setup)], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_import_leaves_the_allocator_alone_and_tune_allocator_changes_it():
    assert _mmapped_blocks("import fdl, fdl.nn, fdl.optim, fdl.train, fdl.runtime") == "1"
    assert _mmapped_blocks("import fdl.runtime; assert fdl.runtime.tune_allocator()") == "0"
    # no single arena (it made every thread wait on one malloc lock)
    assert _mmapped_blocks("import fdl.runtime; assert fdl.runtime.tune_allocator()",
                           IN_THREAD) == "1"


def _async_dispatch(code: str) -> str:
    code += "\nimport jax\nprint(jax.config.read('jax_cpu_enable_async_dispatch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_allocator_runs_computations_on_the_calling_thread():
    # the main thread allocates from glibc's main arena, the one that keeps large blocks
    assert _async_dispatch("import fdl, fdl.runtime") == "True"
    assert _async_dispatch("import fdl.runtime; assert fdl.runtime.tune_allocator()") == "False"
    # too late (the CPU backend exists): says so, dispatch unchanged
    late = "import jax.numpy as jnp, fdl.runtime; jnp.ones(2)\nprint(fdl.runtime.tune_allocator())"
    assert _async_dispatch(late) == "True"
    out = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False"]


def test_kernels_report():
    ks = fdl.kernels()
    assert list(ks) == ["conv", "dense", "lstm", "gru", "optim", "bn"]
    for k in ks.values():
        assert k.backend in ("native", "xla") and k.why
        if k.backend == "native":
            assert ("fdl's C++ loop" if k.op in ("optim", "bn") else "oneDNN 3.") in k.why
    with config.override(conv_backend="xla", dense_backend="xla", rnn_backend="xla",
                         optim_backend="xla", norm_backend="xla"):
        assert {k.backend for k in fdl.kernels().values()} == {"xla"}
        assert "conv_backend = 'xla'" in fdl.kernels()["conv"].why
    assert "conv " in fdl.runtime.kernels_table()
