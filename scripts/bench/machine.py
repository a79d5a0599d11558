"""The machine's own limits and settings, measured in the same run as the workloads.

* float32 matmul peak: an ``n x n @ n x n`` product through ``jnp.dot`` (jitted) and through
  numpy (OpenBLAS); ``2 n^3`` FLOPs per product; the better median is the yardstick "peak".
* memory bandwidth: a large float32 array copy (``np.copyto``), counted as read + write bytes.
* versions, CPU model (``/proc/cpuinfo``), thread settings.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any

import numpy as np


@dataclasses.dataclass
class MachineInfo:
    cpu_model: str
    cores: int
    threads: int  # threads JAX/XLA and PyTorch are given (the CPU affinity count)
    versions: dict[str, str]
    thread_settings: dict[str, str]
    matmul_n: int = 0
    jax_matmul_gflops: float | None = None
    numpy_matmul_gflops: float | None = None
    copy_mib: int = 0
    copy_gbs: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def peak_gflops(self) -> float | None:
        vals = [v for v in (self.jax_matmul_gflops, self.numpy_matmul_gflops) if v]
        return max(vals) if vals else None


def load_average() -> str:
    """The 1/5/15-minute load averages (how busy the shared machine was)."""
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def thread_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def fdl_kernels() -> str:
    """``fdl.kernels()`` on one line: ``conv native (oneDNN 3.2.0), lstm ...``."""
    try:
        import fdl

        return ", ".join(f"{k.op} {k.backend}" + (f" ({k.why.split(',')[0]})"
                                                  if k.backend == "native" else f" ({k.why})")
                         for k in fdl.kernels().values())
    except Exception as e:  # noqa: BLE001 - the header must not fail the run
        return f"unknown ({type(e).__name__}: {e})"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "numpy", "flax", "equinox", "optax", "torch"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional packages
            out[name] = "not installed"
    try:
        import fdl

        out["fdl"] = getattr(fdl, "__version__", "?")
    except Exception:  # noqa: BLE001
        out["fdl"] = "not importable"
    return out


def pin_torch_threads(n: int) -> str:
    """Give PyTorch the same thread count as JAX; returns a description.

    Also keeps ``torch.compile`` from spawning a pool of compile worker processes
    (``TORCHINDUCTOR_COMPILE_THREADS=1`` unless set), which would load the shared machine.
    """
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        import torch
    except Exception:  # noqa: BLE001
        return "torch not installed"
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work already ran)
        pass
    return (f"torch.set_num_threads({n}); intra-op {torch.get_num_threads()}, inter-op "
            f"{torch.get_num_interop_threads()}; TORCHINDUCTOR_COMPILE_THREADS="
            f"{os.environ['TORCHINDUCTOR_COMPILE_THREADS']}")


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(n: int = 2048, copy_mib: int = 512, reps: int = 5, torch_desc: str = "") -> MachineInfo:
    """Measure matmul peak (jnp.dot and numpy) and copy bandwidth; collect settings."""
    import jax
    import jax.numpy as jnp

    threads = thread_count()
    settings = {
        "CPU affinity (threads)": str(threads),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "(unset)"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "jax devices": ", ".join(str(d) for d in jax.devices()),
        "torch": torch_desc or "(not pinned)",
    }
    info = MachineInfo(cpu_model(), os.cpu_count() or 1, threads, versions(), settings)
    info.matmul_n = n
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    try:
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        dot = jax.jit(jnp.dot)
        t = _median_time(lambda: dot(ja, jb).block_until_ready(), reps)
        info.jax_matmul_gflops = flops / t / 1e9
    except Exception as e:  # noqa: BLE001
        info.notes.append(f"jnp.dot matmul failed: {e!r}")
    try:
        t = _median_time(lambda: np.dot(a, b), reps)
        info.numpy_matmul_gflops = flops / t / 1e9
    except Exception as e:  # noqa: BLE001
        info.notes.append(f"numpy matmul failed: {e!r}")
    info.copy_mib = copy_mib
    try:
        src = np.ones(copy_mib * 2**20 // 4, np.float32)
        dst = np.empty_like(src)
        t = _median_time(lambda: np.copyto(dst, src), reps)
        info.copy_gbs = 2 * src.nbytes / t / 1e9
    except Exception as e:  # noqa: BLE001
        info.notes.append(f"copy bandwidth failed: {e!r}")
    return info


def unmeasured(torch_desc: str = "") -> MachineInfo:
    """Settings only (no timing), for tests or when measuring is switched off."""
    threads = thread_count()
    settings: dict[str, Any] = {
        "CPU affinity (threads)": str(threads),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "(unset)"),
        "torch": torch_desc or "(not pinned)",
    }
    info = MachineInfo(cpu_model(), os.cpu_count() or 1, threads, versions(), settings)
    info.notes.append("machine limits not measured in this run")
    return info
