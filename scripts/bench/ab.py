"""Same-process A/B of a workload's fdl step under two values of one ``fdl.config`` option.

    python -m scripts.bench.ab resnet18 norm_backend xla auto --rounds 16

builds the workload module's ``_fdl()`` step twice, each traced under one value (the option is
read when a step is traced), then times them alternately in blocks of 5 steps, the order
swapped every round, and prints each one's median and minimum and the ratio of medians (B ÷ A).
On a noisy machine this separates a few percent that separate processes cannot: both steps
share the process, its allocator state and the machine's load at each moment.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", help="module under scripts/bench/workloads with _fdl(), e.g. "
                                     "resnet18, lenet")
    ap.add_argument("option", help="fdl.config option, e.g. norm_backend")
    ap.add_argument("a", help="first value (A)")
    ap.add_argument("b", help="second value (B)")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args(argv)

    import fdl.runtime
    from fdl import config

    fdl.runtime.tune_allocator()
    module = importlib.import_module(f"scripts.bench.workloads.{args.workload}")
    steps = {}
    for value in (args.a, args.b):
        with config.override(**{args.option: value}):
            step = module._fdl()
            for _ in range(3):  # trace, compile and warm up under the override
                step()
        steps[value] = step
    times: dict[str, list[float]] = {v: [] for v in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for value in order:
            for _ in range(5):
                t0 = time.perf_counter()
                steps[value]()
                times[value].append(time.perf_counter() - t0)
    for value, ts in times.items():
        print(f"{args.option}={value}: median {statistics.median(ts) * 1e3:.1f} ms, "
              f"min {min(ts) * 1e3:.1f} ms, {len(ts)} steps")
    ratio = statistics.median(times[args.b]) / statistics.median(times[args.a])
    print(f"B / A (medians): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
