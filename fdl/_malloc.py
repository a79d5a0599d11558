"""glibc allocator settings that keep XLA's per-step buffers resident (Linux/glibc only).

Why: XLA's CPU runtime allocates each execution's temporaries as one block (158 MB for the
ResNet-18 CIFAR training step at batch 32) from one of its worker threads and frees it when the
execution ends. glibc serves any request above 32 MB, and anything above 64 MB made from a thread
arena, with a fresh ``mmap`` and returns it with ``munmap`` on ``free``; so every step the kernel
maps and zero-fills the whole block again: 40,400 page faults per ResNet-18 step, ~10% of its
time (docs/performance.md, 2026-11-30). With one arena, no ``mmap`` for large blocks and no trimming
of the heap top, the block is reused from the heap and steps take no page faults.

What :func:`configure` does (once, at ``import fdl``): ``mallopt(M_ARENA_MAX, 1)``,
``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``. Effects on the process: all
threads allocate from the main heap (one lock; fine for XLA's few large allocations per step),
and freed memory stays in the process (peak usage is kept, not returned to the OS). It must run
before XLA's worker threads first allocate (threads keep the arena they started with), which
``import fdl`` normally is; afterwards it is harmless but does nothing for those threads.

Opt out with ``FDL_MALLOC=default`` in the environment (read at import).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

configured = False


def configure() -> bool:
    """Apply the settings above once; ``True`` if they are in effect."""
    global configured
    if configured:
        return True
    if os.environ.get("FDL_MALLOC", "").strip().lower() in ("default", "0", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such mallopt params)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    configured = bool(
        mallopt(_M_ARENA_MAX, 1)
        and mallopt(_M_MMAP_MAX, 0)
        and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )
    return configured
