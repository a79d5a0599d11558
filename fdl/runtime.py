"""Process-level facts and tuning: which kernels run here, and the explicit allocator setting.

- :func:`kernels` -- for the 2-D convolution, dense layers, the LSTM, the GRU, the fused
  optimizer steps and training-mode batch norm: ``native`` (fdl's C++ kernels, on oneDNN for
  the first four) or ``xla``, and why. ``fdl list`` and the benchmark header print it.
- :func:`tune_allocator` -- glibc settings (and JAX's dispatch on the calling thread) that keep
  XLA's per-step temporaries resident. A process-wide, irreversible change, so fdl never makes
  it by itself (``import fdl`` changes nothing): applications call it for their own process
  (the ``fdl`` command and the examples do).
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys

from fdl import config

__all__ = ["Kernel", "kernels", "kernels_table", "tune_allocator"]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """What computes ``op`` (``conv``, ``dense``, ``lstm``, ``gru``, ``optim``, ``bn``) here:
    ``backend`` is ``"native"`` or ``"xla"``; ``why`` says why (or which library and oneDNN)."""

    op: str
    backend: str
    why: str

    def __str__(self) -> str:
        return f"{self.op}: {self.backend} ({self.why})"


_OPS = {"conv": ("conv_backend", "conv"), "dense": ("dense_backend", "dense"),
        "lstm": ("rnn_backend", "rnn"), "gru": ("rnn_backend", "rnn"),
        "optim": ("optim_backend", "optim"), "bn": ("norm_backend", "norm")}
# libraries that are fdl's own loops (OpenMP), not calls into oneDNN
_OWN_LOOPS = {"optim", "norm"}


def kernels() -> dict[str, Kernel]:
    """``{"conv": Kernel, "dense": Kernel, "lstm": Kernel, "gru": Kernel, "optim": Kernel,
    "bn": Kernel}`` for float32 on the default JAX platform (other dtypes always use XLA).
    Loads (and if needed builds) the native libraries, as the first layer that uses one
    would."""
    import jax

    from fdl._ext import loader

    platform = jax.default_backend()
    out = {}
    for op, (option, lib) in _OPS.items():
        choice = config.get(option)
        if choice == "xla":
            k = Kernel(op, "xla", f"fdl.config.{option} = 'xla'")
        elif platform != "cpu":
            k = Kernel(op, "xla", f"platform {platform}: native kernels are CPU-only")
        else:
            st = loader.load(lib)
            if st.loaded:
                what = "fdl's C++ loop" if lib in _OWN_LOOPS else f"oneDNN {st.onednn}"
                k = Kernel(op, "native", f"{what}, {st.path}")
            else:
                k = Kernel(op, "xla", f"{st.reason}; fix: {st.fix}" if st.fix else st.reason)
        out[op] = k
    return out


def kernels_table() -> str:
    """:func:`kernels` as lines ``  conv  native  (why)``, for printing."""
    ks = kernels()
    return "\n".join(f"  {k.op:<5} {k.backend:<7} {k.why}" for k in ks.values())


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


def _run_inline() -> bool:
    """Have JAX run single-device CPU computations on the calling thread
    (``jax_cpu_enable_async_dispatch = False``); ``False`` if JAX's backends already exist
    (the option is read when the CPU backend is created)."""
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return not jax.config.read("jax_cpu_enable_async_dispatch")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def tune_allocator() -> bool:
    """Keep XLA's large per-execution temporaries resident (Linux/glibc only). Returns
    ``True`` if the settings are in effect: ``False`` elsewhere, and if JAX's CPU backend
    already existed (then only the glibc part is made).

    Why: XLA's CPU runtime allocates each execution's temporaries as one block (e.g. ~160 MB
    for a ResNet-18 CIFAR training step at batch 32) and frees it when the execution ends.
    glibc serves blocks that large with a fresh ``mmap`` and returns them with ``munmap``, so
    every step the kernel maps and zero-fills the whole block again (page faults worth ~10% of
    that step; docs/performance.md). This sets ``mallopt(M_MMAP_MAX, 0)`` and
    ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`` (the block comes from the heap and stays there),
    and has JAX run single-device computations on the calling thread
    (``jax_cpu_enable_async_dispatch = False``): the block is then allocated from glibc's main
    arena, the only one that can hold it without ``mmap`` (a thread arena maps any request
    over 64 MB whatever ``M_MMAP_MAX`` says). No single-arena setting: it made every thread
    wait on one malloc lock (optimizer updates ~10% slower, the char-LM LSTM step ~25%).

    Effects on the whole process: freed memory is kept (peak usage is not returned to the
    OS), and a jitted call returns when its computation is done (multi-device computations
    stay asynchronous). Call it early, before JAX's CPU backend exists (the first jitted call
    or array).
    """
    global _tuned
    if _tuned:
        return True
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
    glibc = bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _tuned = glibc and _run_inline()
    return _tuned
