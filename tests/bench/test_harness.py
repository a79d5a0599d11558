"""Smoke test of the benchmark harness: one tiny synthetic workload end to end into a tmp file."""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scripts.bench import harness
from scripts.bench.api import Workload


def _jax_builder():
    x = jnp.ones((16, 16), jnp.float32)
    f = jax.jit(lambda a: jnp.tanh(a @ a))

    def step():
        return f(x).block_until_ready()

    return step


def _numpy_builder(n: int):
    def build():
        a = np.ones((n, n), np.float32)
        return lambda: np.tanh(a @ a)

    return build


def _broken_builder():
    raise RuntimeError("this implementation | is broken")


def _tiny_workloads():
    ok = Workload(
        name="tiny_matmul",
        description="16x16 float32 matmul + tanh (synthetic smoke workload)",
        impls={"fdl": _jax_builder, "numpy": _numpy_builder(16),
               "numpy (bigger)": _numpy_builder(48), "broken ref": _broken_builder},
        flops=2 * 16**3,
        bytes=3 * 16 * 16 * 4,
        quick_steps=20,
        extra={"examples_per_step": 16},
    )
    pending = Workload(name="tiny_pending", description="not there yet", impls={},
                       pending="fdl.nowhere does not exist")
    return [ok, pending]


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _table(section: str) -> list[list[str]]:
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in rows]


def test_harness_end_to_end(tmp_path):
    out = tmp_path / "BENCH.md"
    results = tmp_path / "results"
    results.mkdir()
    (results / "area.md").write_text("# Area results\n\n## Sub\n\naccuracy 0.99\n")
    text = harness.run(_tiny_workloads(), str(out), quick=True, steps=20,
                       machine_kwargs={"n": 64, "copy_mib": 4, "reps": 2},
                       command="pytest smoke", results_dir=str(results), log=lambda m: None)
    assert out.read_text() == text
    assert text.startswith("# fdl benchmarks")
    assert "# How to read this" in text and "pytest smoke" in text
    # machine limits were measured and printed as numbers
    peak = re.search(r"\*\*peak\*\* \(better of the two\) \| ([0-9.]+) GFLOP/s", text)
    assert peak and float(peak.group(1)) > 0

    secs = _sections(text)
    # the training results are appended with demoted headings: only workloads use "## "
    assert set(secs) == {"tiny_matmul", "tiny_pending"}
    assert "### area.md" in text and "### Area results" in text and "#### Sub" in text

    table = _table(secs["tiny_matmul"])
    head, sep, rows = table[0], table[1], table[2:]
    assert head[0] == "impl" and head[-1] == "x fastest"
    assert {"GFLOP/s", "% peak", "GB/s", "% bandwidth", "examples/s"} <= set(head)
    assert all(c == "---" for c in sep)
    assert [r[0] for r in rows] == ["fdl", "numpy", "numpy (bigger)", "broken ref"]
    assert all(len(r) == len(head) for r in rows)
    by = {r[0]: dict(zip(head, r, strict=True)) for r in rows}
    for name in ("fdl", "numpy", "numpy (bigger)"):
        for col in head[1:]:
            float(by[name][col])  # every number parses
        lo, med, hi = (float(by[name][c]) for c in ("min ms", "median ms", "max ms"))
        assert lo <= med <= hi
    assert "error: RuntimeError" in by["broken ref"]["compile s"]
    assert by["broken ref"]["x fastest"] == "—"
    ref_ratios = [float(by[n]["x fastest"]) for n in ("numpy", "numpy (bigger)")]
    assert min(ref_ratios) == pytest.approx(1.0)
    assert max(ref_ratios) >= 1.0
    # the fdl ratio is its median over the fastest reference median
    fastest = min(float(by[n]["median ms"]) for n in ("numpy", "numpy (bigger)"))
    assert float(by["fdl"]["x fastest"]) == pytest.approx(
        float(by["fdl"]["median ms"]) / fastest, rel=0.02, abs=0.006)

    assert "**Pending:** fdl.nowhere does not exist" in secs["tiny_pending"]
    assert not _table(secs["tiny_pending"])


def test_timing_blocks_rotate_and_count():
    """Timed steps run in blocks of ``block`` consecutive steps per implementation, the order
    rotating every round; every implementation gets exactly ``steps`` timed steps (the last
    block may be short); one failing during timing drops out without stopping the others."""
    calls = []

    def impl(name, fail_at=None):
        def build():
            n = [0]

            def step():
                n[0] += 1
                if fail_at is not None and n[0] == fail_at:
                    raise RuntimeError("boom")
                calls.append(name)

            return step

        return build

    w = Workload(name="order", description="d",
                 impls={"a": impl("a"), "b": impl("b"), "c": impl("c", fail_at=2 + 7)})
    res = harness.measure_workload(w, steps=12, block=5, log=lambda m: None)
    timed = calls[6:]  # after the compile + warm-up calls (2 per impl)
    runs = [(k, len(list(g))) for k, g in itertools.groupby(timed)]
    # round 2 starts with "a" again (c is gone, the order is [a, b] rotated by 2 % 2)
    assert runs == [("a", 5), ("b", 5), ("c", 5), ("b", 5), ("c", 1), ("a", 5 + 2), ("b", 2)]
    by = {r.impl: r for r in res.rows}
    assert len(by["a"].times_ms) == len(by["b"].times_ms) == 12 and by["a"].error is None
    assert len(by["c"].times_ms) == 6 and "failed during timing" in by["c"].error
    assert res.block == 5
    one = harness.measure_workload(Workload(name="one", description="d",
                                            impls={"a": impl("x"), "b": impl("y")}),
                                   steps=3, block=1, log=lambda m: None)
    assert calls[-6:] == ["x", "y", "y", "x", "x", "y"] and one.block == 1
    with pytest.raises(ValueError, match="block"):
        harness.measure_workload(w, steps=2, block=0, log=lambda m: None)


def test_discover_workload_modules_are_well_formed():
    workloads = harness.discover()
    names = [w.name for w in workloads]
    assert len(names) == len(set(names)), "workload names must be unique"
    for w in workloads:
        assert w.impls or w.pending, f"{w.name}: no implementations and not pending"
        assert w.steps >= 20 and w.quick_steps >= 20
        assert w.pending is None or w.pending.strip()
    assert harness.discover(only="no-such-workload-xyz") == []


def test_isolated_workers_time_each_implementation_in_its_own_process():
    """Each implementation runs in a worker process; references get ``FDL_BENCH_ROLE=reference``
    (their builder checks it); a broken builder's error comes back as its row's error."""
    from scripts.bench.smoke_workloads import WORKLOADS

    (w,) = WORKLOADS
    logs = []
    res = harness.measure_workload(w, steps=7, block=3, log=logs.append)
    assert res.isolated
    rows = {r.impl: r for r in res.rows}
    assert rows["fdl"].ok and rows["numpy"].ok, logs
    assert len(rows["fdl"].times_ms) == len(rows["numpy"].times_ms) == 7
    assert rows["fdl"].compile_s is not None
    assert "is broken" in rows["broken ref"].error
    in_process = harness.measure_workload(w, steps=2, block=1, isolated=False, log=logs.append)
    assert not in_process.isolated
    assert "FDL_BENCH_ROLE=reference" in {r.impl: r for r in in_process.rows}["numpy"].error
