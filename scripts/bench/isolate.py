"""One implementation of a workload in a process of its own (``Workload.isolate``).

Why: process-wide settings differ per library. fdl's rows run as the ``fdl`` command runs them,
after ``fdl.runtime.tune_allocator()`` (glibc keeps XLA's large per-step temporaries resident;
single-device computations run on the calling thread), which a PyTorch, Flax or Equinox user
would not have (the 2026-11-30 figures below were taken with its earlier single-arena form):
measured 2026-11-30, ResNet-18 CIFAR under ``torch.compile`` 307 ms per step with that setting
vs 282 ms with glibc's defaults, the char-LM LSTM in PyTorch ~10% slower. PyTorch's bundled
``libgomp`` is also the one fdl's oneDNN binds to when both are loaded. So each implementation
runs in a process of its own: references with ``FDL_BENCH_ROLE=reference`` (glibc's defaults,
torch threads pinned as in the parent), fdl rows with the allocator call.

Protocol (JSON lines): the parent starts ``python -m scripts.bench.isolate MODULE WORKLOAD
IMPL FD``; the worker builds the implementation, times its first step (compile) and runs one
warm-up step, and writes ``{"ok": true, "compile_s": ...}`` to file descriptor ``FD``; then for
every ``{"steps": n}`` line on its stdin it runs ``n`` steps and writes ``{"ok": true,
"times_ms": [...]}``; ``{"quit": true}`` or end of input ends it. Errors come back as
``{"ok": false, "error": ..., "trace": ...}``. The worker's own output goes to stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback


def _error(e: BaseException) -> dict:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__
    return {"ok": False, "error": msg[:240], "trace": traceback.format_exc(limit=3)}


def worker(module: str, workload: str, impl: str, fd: int) -> int:
    out = os.fdopen(fd, "w", buffering=1)
    sys.stdout = sys.stderr  # libraries' prints must not end up in the protocol

    def reply(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        if os.environ.get("FDL_BENCH_ROLE") == "reference":  # as the parent pins torch
            from scripts.bench import machine

            machine.pin_torch_threads(machine.thread_count())
        else:  # an fdl row: the process tuning the fdl command makes
            import fdl.runtime

            fdl.runtime.tune_allocator()
        mod = importlib.import_module(module)
        (w,) = [w for w in mod.WORKLOADS if w.name == workload]
        step = w.impls[impl]()
        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0
        step()  # warm-up, not timed
    except Exception as e:  # noqa: BLE001
        reply(_error(e))
        return 1
    reply({"ok": True, "compile_s": compile_s})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        times = []
        try:
            for _ in range(int(cmd["steps"])):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # noqa: BLE001
            reply(_error(e))
            return 1
        reply({"ok": True, "times_ms": times})
    return 0


class WorkerError(RuntimeError):
    def __init__(self, msg: dict):
        super().__init__(msg.get("error", "worker failed"))
        self.trace = msg.get("trace", "")


class Worker:
    """The parent's handle on one worker process (see the module docstring)."""

    def __init__(self, module: str, workload: str, impl: str, *, reference: bool):
        env = dict(os.environ)
        env.pop("FDL_BENCH_ROLE", None)
        if reference:
            env["FDL_BENCH_ROLE"] = "reference"
        r, w = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.bench.isolate", module, workload, impl, str(w)],
            stdin=subprocess.PIPE, stdout=sys.stderr, pass_fds=(w,), env=env, text=True,
            cwd=root,
        )
        os.close(w)
        self.replies = os.fdopen(r)
        try:
            self.compile_s = float(self._read()["compile_s"])
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict:
        line = self.replies.readline()
        if not line:
            self.proc.wait()
            raise WorkerError({"error": f"the worker exited (code {self.proc.returncode}) "
                                        f"without a reply"})
        msg = json.loads(line)
        if not msg.get("ok"):
            raise WorkerError(msg)
        return msg

    def run(self, n: int) -> list[float]:
        """Time ``n`` consecutive steps; their times in ms."""
        self.proc.stdin.write(json.dumps({"steps": n}) + "\n")
        self.proc.stdin.flush()
        return list(self._read()["times_ms"])

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self.replies.close()


if __name__ == "__main__":
    raise SystemExit(worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
