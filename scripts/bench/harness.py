"""The benchmark harness: discover workloads, time them interleaved, write ``BENCHMARKS.md``.

Timing discipline (per workload): every implementation is built (set-up, not timed); its first
``step()`` is timed as the compile (first-call) time; one more untimed warm-up step follows; then
the timed steps run interleaved in blocks of :data:`BLOCK` consecutive steps per implementation,
``AAAAA BBBBB CCCCC, BBBBB CCCCC AAAAA, ...`` (the order rotating every round), so drift on a
shared machine hits every implementation alike while each one is timed in the conditions of its
own training loop (back-to-back steps), not in the wake of another library's step. Why blocks
and not ``A B C A B C``: a step can leave work running after it returns -- PyTorch's OpenMP
workers spin for ~10 ms after each step (measured 2026-11-30: 8-9 ms of extra process CPU time
in the 10-100 ms after a PyTorch char-LM step, < 0.4 ms after a JAX library's) -- and with one
step per turn that is charged to whichever row comes next, always the same one in a rotated
cyclic order (the row after the last): the char-LM GRU step of fdl took 8.9 ms after a PyTorch
step and 6.4 ms after its own, Flax's 14.4 vs 10.6 ms. In a block only the first step pays for
what the previous library left behind (caches, spinning threads); the median is the library's
own steady state. Each implementation runs in a worker process of its own
(:mod:`scripts.bench.isolate`; not for workloads with ``isolate=False``), the references with
glibc's default allocator: fdl's import-time allocator setting made ``torch.compile``'s ResNet-18
step 9% slower when all libraries shared one process. Steps block until their results are
ready (the builders' contract, see :mod:`scripts.bench.api`). Reported: median, min and max
step time, GFLOP/s from the workload's ``flops`` (one count for every implementation), GB/s
from ``bytes``, fractions of the machine's measured limits, and ``x fastest`` = median /
fastest *reference* (non-``fdl``) median.

A failing implementation never stops the run: its error is recorded in its table row.

Importable for tests: :func:`run` takes the workloads, the output path and the settings.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import glob
import importlib
import math
import os
import pkgutil
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from scripts.bench import isolate
from scripts.bench import machine as _machine
from scripts.bench.api import Workload

Log = Callable[[str], None]


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class ImplResult:
    impl: str
    compile_s: float | None = None
    times_ms: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def is_fdl(self) -> bool:
        return self.impl.startswith("fdl")

    @property
    def is_bound(self) -> bool:
        """A physical-floor row (e.g. ``bound: x + y copy``): shown, never a reference."""
        return self.impl.startswith("bound:")

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


@dataclasses.dataclass
class WorkloadResult:
    workload: Workload
    rows: list[ImplResult]
    flops: float | None = None
    flops_note: str = ""
    steps: int = 0
    block: int = 1
    isolated: bool = False

    def fastest_reference_ms(self) -> float | None:
        refs = [r.median_ms for r in self.rows if r.ok and not r.is_fdl and not r.is_bound]
        return min(refs) if refs else None


def _err(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__
    return msg[:240]


# ----------------------------------------------------------------------------- discovery


def discover(only: str | None = None, package: str = "scripts.bench.workloads") -> list[Workload]:
    """Import every ``<package>/*.py`` (not starting with ``_``) and collect its ``WORKLOADS``.

    A module that fails to import becomes a pending workload carrying the error. ``only``
    keeps workloads whose name or module name matches it (case-insensitive; exact match
    first, else substring).
    """
    pkg = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    found: list[tuple[str, Workload]] = []
    for mod_name in names:
        try:
            mod = importlib.import_module(f"{package}.{mod_name}")
            wls = list(getattr(mod, "WORKLOADS", []))
        except Exception as e:  # noqa: BLE001 - a broken module must not kill the run
            wls = [Workload(name=mod_name, description=f"module `{package}.{mod_name}`",
                            impls={}, pending=f"the workload module failed to import: {_err(e)}")]
        for w in wls:
            w.module = w.module or f"{package}.{mod_name}"
        found += [(mod_name, w) for w in wls]
    if only:
        key = only.lower()
        exact = [(m, w) for m, w in found if key in (w.name.lower(), m.lower())]
        found = exact or [(m, w) for m, w in found if key in w.name.lower() or key in m.lower()]
    return [w for _, w in found]


# ----------------------------------------------------------------------------- timing


BLOCK = 5
"""Consecutive timed steps of one implementation per turn (see the module docstring)."""


def _in_process(builder: Callable[[], Callable[[], object]]):
    """``(run, compile_s, close)`` for an implementation built in this process."""
    step = builder()
    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    step()  # warm-up, not timed

    def run(n: int, times: list[float]) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)

    return run, compile_s, lambda: None


def _in_worker(w: Workload, impl: str):
    """``(run, compile_s, close)`` for an implementation built in a worker process."""
    worker = isolate.Worker(w.module, w.name, impl, reference=not impl.startswith("fdl"))
    return (lambda n, times: times.extend(worker.run(n))), worker.compile_s, worker.close


def measure_workload(w: Workload, *, quick: bool = False, steps: int | None = None,
                     block: int = BLOCK, isolated: bool = True,
                     log: Log = _default_log) -> WorkloadResult:
    """Build, compile, warm up and time every implementation of ``w`` (interleaved, in blocks
    of ``block`` consecutive steps per implementation, the order rotating every round); each
    in a process of its own when ``isolated`` and the workload allows it (``w.isolate``, a
    discovered module), see :mod:`scripts.bench.isolate`."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    n_steps = steps if steps is not None else (w.quick_steps if quick else w.steps)
    res = WorkloadResult(w, [], steps=n_steps, block=block)
    res.isolated = bool(isolated and w.isolate and w.module)
    res.flops, res.flops_note = w.flops, w.flops_note
    if res.flops is None and w.flops_fn is not None:
        try:
            t0 = time.perf_counter()
            res.flops = float(w.flops_fn())
            log(f"  [{w.name}] flops {res.flops / 1e9:.3f} GFLOP ({time.perf_counter() - t0:.1f}s)")
        except Exception as e:  # noqa: BLE001
            res.flops_note = f"FLOP count failed: {_err(e)}"
    # impl -> run(n, times): time n consecutive steps, appending to times (ms)
    live: dict[str, Callable[[int, list[float]], None]] = {}
    closers: list[Callable[[], None]] = []
    for impl, builder in w.impls.items():
        row = ImplResult(impl)
        res.rows.append(row)
        try:
            run, row.compile_s, close = (_in_worker(w, impl) if res.isolated
                                         else _in_process(builder))
            closers.append(close)
            live[impl] = run
            log(f"  [{w.name}] {impl}: first call {row.compile_s:.2f}s")
        except Exception as e:  # noqa: BLE001
            row.error = _err(e)
            log(f"  [{w.name}] {impl}: FAILED {row.error}")
            log(getattr(e, "trace", "") or traceback.format_exc(limit=3))
    try:
        _time_interleaved(res, live, n_steps, block)
    finally:
        for close in closers:
            close()
    for r in res.rows:
        if r.ok:
            log(f"  [{w.name}] {r.impl}: median {r.median_ms:.2f} ms")
    live.clear()
    gc.collect()
    return res


def _time_interleaved(res: WorkloadResult,
                      live: dict[str, Callable[[int, list[float]], None]],
                      n_steps: int, block: int) -> None:
    rows = {r.impl: r for r in res.rows}
    for round_ in range(math.ceil(n_steps / block)):
        # rotate the order every round (A B C, B C A, C A B, ...): the first call after another
        # implementation's step pays for the caches it evicted (and for threads it left
        # spinning), so a fixed order would always charge that cost to the same row (seen: 1-2%
        # on the memory-bound optimizer updates); blocks keep it to one step in `block`
        order = list(live)
        k = round_ % len(order) if order else 0
        n = min(block, n_steps - round_ * block)
        for impl in order[k:] + order[:k]:
            try:
                live[impl](n, rows[impl].times_ms)
            except Exception as e:  # noqa: BLE001
                rows[impl].error = f"failed during timing: {_err(e)}"
                del live[impl]


# ----------------------------------------------------------------------------- rendering


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _ms(x: float) -> str:
    """Milliseconds with at least 4 significant digits (2 decimals above 10 ms)."""
    if x <= 0 or x != x:
        return f"{x:.2f}"
    decimals = max(2, 3 - math.floor(math.log10(x)))
    return f"{x:.{decimals}f}"


def render_table(res: WorkloadResult, info: _machine.MachineInfo) -> list[str]:
    w = res.workload
    peak = info.peak_gflops
    with_bytes = w.bytes is not None
    head = ["impl", "compile s", "median ms", "min ms", "max ms", "GFLOP/s", "% peak"]
    if with_bytes:
        head += ["GB/s", "% bandwidth"]
    examples = w.extra.get("examples_per_step")
    if examples:
        head.append("examples/s")
    head.append("x fastest")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    fastest = res.fastest_reference_ms()
    for r in res.rows:
        if not r.ok:
            cells = [r.impl, f"error: {_cell(r.error or 'no timed steps')}"]
            cells += ["—"] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        med = r.median_ms
        gflops = res.flops / (med * 1e-3) / 1e9 if res.flops else None
        cells = [r.impl, _f(r.compile_s, ".2f"), _ms(med), _ms(min(r.times_ms)),
                 _ms(max(r.times_ms)), _f(gflops, ".1f"),
                 _f(100 * gflops / peak if gflops and peak else None, ".1f")]
        if with_bytes:
            gbs = w.bytes / (med * 1e-3) / 1e9
            cells += [f"{gbs:.1f}", _f(100 * gbs / info.copy_gbs if info.copy_gbs else None, ".1f")]
        if examples:
            cells.append(f"{examples / (med * 1e-3):.0f}")
        cells.append(_f(med / fastest if fastest else None, ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


HOW_TO_READ = """\
# How to read this

* Every number below was measured **in this one run**, on the machine described under "Run"
  and "Machine limits", with all implementations of a workload timed **interleaved** in
  blocks of 5 consecutive steps each (A×5 B×5 C×5, B×5 C×5 A×5, ...: the order rotates every
  round, so neither drift on a shared machine nor the state left by the previous row -- its
  caches, threads still spinning after its step -- favours one implementation; within a block
  each library runs as in its own training loop). Each implementation runs in **a process of
  its own** (except where a section says otherwise), so no library inherits another's
  process-wide settings (fdl's allocator setting, a shared OpenMP runtime). Read
  the **ratios**, not the absolute times: the machine is shared (2 cores; other jobs may
  have been running, so numbers are noisy: see the load averages under "Run"). On a loaded
  machine PyTorch suffers far more than the JAX libraries (its OpenMP threads wait for each
  other at every one of its many small parallel regions), so quote ratios from a run with a
  load average near or below the core count.
* A row is one implementation of the same training step (same shapes, dtype, optimizer, loss;
  the layout each library prefers, as the workload's description says). Rows starting with
  `fdl` are this library; the others are references (Flax linen, Equinox, PyTorch eager,
  `torch.compile`).
* `compile s`: the first call (tracing + XLA compile, or PyTorch's first eager call /
  `torch.compile`'s compile, which is much shorter when its on-disk cache is warm from an
  earlier run). `median/min/max ms`: step times after one more warm-up step.
* `GFLOP/s` = the workload's FLOP count per step (**one count for every implementation**,
  how it was obtained is stated per workload) / median time; `% peak` = that / the float32
  matmul peak measured below. `GB/s` / `% bandwidth` likewise against the measured copy
  bandwidth (memory-bound workloads only).
* **`x fastest`** = the row's median / the fastest *reference* median in the same run.
  1.00 is the fastest reference; below 1.0 means the row beats every reference. Rows named
  `bound: ...` are physical floors (e.g. a plain copy moving the same bytes), shown for scale
  and never counted as a reference.
* A workload whose fdl capability does not exist yet is marked **pending** with the reason;
  its reference rows (if any) are still measured, and no fdl row is faked. A failing
  implementation shows its error in its row.
* Machine-readable: every workload section starts with `## <workload>`; its table's first
  column is `impl`, its last column `x fastest`. No other `## ` headings appear in this file.
"""


def _demote(text: str, levels: int = 2) -> str:
    return re.sub(r"^(#{1,6}) ", lambda m: "#" * min(6, len(m.group(1)) + levels) + " ",
                  text, flags=re.M)


def render(results: Sequence[WorkloadResult], info: _machine.MachineInfo, *, command: str,
           date: str, quick: bool, results_dir: str | None = "docs/results",
           elapsed_s: float | None = None) -> str:
    out = ["# fdl benchmarks", "",
           "Generated by `python -m scripts.bench`; do not edit by hand.", "", HOW_TO_READ]
    out += ["# Run", "", f"* command: `{command}`", f"* date (UTC): {date}",
            f"* mode: {'quick' if quick else 'full'}"
            + (f"; wall time {elapsed_s / 60:.1f} min" if elapsed_s is not None else ""),
            f"* CPU: {info.cpu_model} ({info.cores} logical CPUs visible)"]
    out.append("* versions: " + ", ".join(f"{k} {v}" for k, v in info.versions.items()))
    out.append("* fdl kernels (`fdl.kernels()`; rows named `fdl (xla)` force XLA's): "
               + _machine.fdl_kernels())
    out.append("* fdl rows run after `fdl.runtime.tune_allocator()` (glibc: no `mmap`, no heap "
               "trim; JAX's `jax_cpu_enable_async_dispatch` off), as the `fdl` command does; "
               "references with glibc's and JAX's defaults")
    out.append("* threads and load: "
               + "; ".join(f"{k}: {v}" for k, v in info.thread_settings.items()))
    out += ["", "# Machine limits (measured in this run)", "",
            "| limit | value |", "| --- | --- |"]
    n = info.matmul_n
    jnp_g = _f(info.jax_matmul_gflops, ".1f")
    out.append(f"| float32 matmul {n}³, `jnp.dot` (XLA) | {jnp_g} GFLOP/s |")
    out.append(f"| float32 matmul {n}³, numpy | {_f(info.numpy_matmul_gflops, '.1f')} GFLOP/s |")
    out.append(f"| **peak** (better of the two) | {_f(info.peak_gflops, '.1f')} GFLOP/s |")
    out.append(f"| memory bandwidth, {info.copy_mib} MiB float32 copy (read + write) | "
               f"{_f(info.copy_gbs, '.1f')} GB/s |")
    for note in info.notes:
        out.append(f"\n_{note}_")
    out += ["", "# Summary: fdl against the fastest reference", "",
            "| workload | fdl row | fdl median ms | fastest reference | its median ms "
            "| x fastest |",
            "| --- | --- | --- | --- | --- | --- |"]
    for res in results:
        fastest = res.fastest_reference_ms()
        ref = next((r for r in res.rows
                    if r.ok and not r.is_fdl and not r.is_bound and r.median_ms == fastest), None)
        fdl_rows = [r for r in res.rows if r.is_fdl]
        if not fdl_rows:
            why = "pending" if res.workload.pending else "no fdl row"
            out.append(f"| {res.workload.name} | {why} | — | {ref.impl if ref else '—'} | "
                       f"{_f(fastest, '.2f')} | — |")
        for r in fdl_rows:
            if r.ok:
                ratio = _f(r.median_ms / fastest if fastest else None, ".2f")
                fast_s = _ms(fastest) if fastest else "—"
                out.append(f"| {res.workload.name} | {r.impl} | {_ms(r.median_ms)} | "
                           f"{ref.impl if ref else '—'} | {fast_s} | {ratio} |")
            else:
                out.append(f"| {res.workload.name} | {r.impl} (error) | — | "
                           f"{ref.impl if ref else '—'} | {_f(fastest, '.2f')} | — |")
    out += ["", "# Workloads", ""]
    for res in results:
        w = res.workload
        out += [f"## {w.name}", "", w.description, ""]
        if w.pending:
            out += [f"**Pending:** {w.pending}", ""]
        if res.flops:
            note = f" ({res.flops_note})" if res.flops_note else ""
            out += [f"FLOPs per step: {res.flops / 1e9:.3f} GFLOP{note}.", ""]
        elif res.flops_note:
            out += [f"FLOPs per step: not available ({res.flops_note}).", ""]
        if w.bytes:
            out += [f"Bytes per step (memory traffic): {w.bytes / 1e6:.1f} MB.", ""]
        if res.rows:
            where = ("each implementation in a process of its own" if res.isolated
                     else "all implementations in one process")
            out += [f"Timed steps per implementation: {res.steps} (in blocks of "
                    f"{min(res.block, res.steps)} consecutive steps; {where}).", ""]
            out += render_table(res, info)
            out.append("")
    if results_dir:
        out += render_results(results_dir)
    return "\n".join(out).rstrip() + "\n"


RESULTS_HEADING = "# Training results"


def render_results(results_dir: str) -> list[str]:
    """The ``# Training results`` section: every ``results_dir/*.md``, headings demoted."""
    files = sorted(glob.glob(os.path.join(results_dir, "*.md")))
    out = [RESULTS_HEADING, "",
           f"Appended from `{results_dir}/*.md` (written by the engineers of each area; "
           "headings shifted down two levels).", ""]
    if not files:
        out += ["_No result files yet._", ""]
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
        out += [f"### {os.path.basename(path)}", "", _demote(text), ""]
    return out


def refresh_results(out_path: str, results_dir: str = "docs/results") -> None:
    """Replace the ``# Training results`` section of an existing file, keeping the measurements.

    Training-result notes change more often than a quiet machine is available for timing.
    """
    with open(out_path, encoding="utf-8") as f:
        text = f.read()
    head, sep, _ = text.partition("\n" + RESULTS_HEADING + "\n")
    if not sep:
        raise ValueError(f"{out_path} has no {RESULTS_HEADING!r} section to refresh")
    new = head.rstrip() + "\n\n" + "\n".join(render_results(results_dir)).rstrip() + "\n"
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, out_path)


# ----------------------------------------------------------------------------- entry point


def run(workloads: Sequence[Workload], out_path: str | None, *, quick: bool = False,
        steps: int | None = None, block: int = BLOCK, isolated: bool = True,
        measure_machine: bool = True, machine_kwargs: dict | None = None,
        command: str | None = None, results_dir: str | None = "docs/results",
        log: Log = _default_log) -> str:
    """Measure the machine and every workload; write the markdown to ``out_path``; return it.

    ``steps`` overrides every workload's number of timed steps (default: ``quick_steps`` with
    ``quick`` else ``steps``); ``block`` is the number of consecutive steps of one
    implementation per turn (see the module docstring); ``isolated`` runs each implementation
    of a workload in a process of its own (:mod:`scripts.bench.isolate`). ``machine_kwargs`` go to
    :func:`scripts.bench.machine.measure` (``n``, ``copy_mib``, ``reps``).
    """
    t_start = time.perf_counter()
    load_start = _machine.load_average()
    threads = _machine.thread_count()
    torch_desc = _machine.pin_torch_threads(threads)
    if measure_machine:
        log("measuring machine limits ...")
        info = _machine.measure(torch_desc=torch_desc, **(machine_kwargs or {}))
        log(f"  matmul jnp {_f(info.jax_matmul_gflops, '.1f')} / numpy "
            f"{_f(info.numpy_matmul_gflops, '.1f')} GFLOP/s, copy {_f(info.copy_gbs, '.1f')} GB/s")
    else:
        info = _machine.unmeasured(torch_desc)
    cmd = command or "python -m scripts.bench " + " ".join(sys.argv[1:])

    def write(results: list[WorkloadResult], done: bool) -> str:
        date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M")
        info.thread_settings["load average 1/5/15 min, start / now"] = (
            f"{load_start}; {_machine.load_average()} (on {info.cores} CPUs)")
        text = render(results, info, command=cmd.strip(), date=date, quick=quick,
                      results_dir=results_dir, elapsed_s=time.perf_counter() - t_start)
        if not done:
            text = text.replace(
                "# How to read this",
                f"**Run in progress: {len(results)} of {len(workloads)} workloads done.**\n\n"
                "# How to read this", 1)
        if out_path:
            with open(out_path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    results: list[WorkloadResult] = []
    for w in workloads:
        log(f"workload {w.name} ({len(w.impls)} implementations)")
        results.append(measure_workload(w, quick=quick, steps=steps, block=block,
                                        isolated=isolated, log=log))
        if len(results) < len(workloads):
            write(results, done=False)  # a partial file survives an interrupted run
    if measure_machine and workloads:
        # the shared machine's load drifts: measure again at the end and keep the better figures
        log("measuring machine limits again ...")
        again = _machine.measure(torch_desc=torch_desc, **(machine_kwargs or {}))
        for field in ("jax_matmul_gflops", "numpy_matmul_gflops", "copy_gbs"):
            vals = [v for v in (getattr(info, field), getattr(again, field)) if v]
            setattr(info, field, max(vals) if vals else None)
        info.notes.append("limits measured at the start and at the end of the run; the better "
                          "of the two is shown (the load on the shared machine drifts)")
    text = write(results, done=True)
    if out_path:
        log(f"wrote {out_path}")
    return text
