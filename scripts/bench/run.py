"""Command line: ``python -m scripts.bench [--quick] [--only NAME] [--out BENCHMARKS.md]``.

Also runnable as ``python scripts/bench/run.py ...`` from the repository root.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make ``scripts`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv: list[str] | None = None) -> int:
    from scripts.bench import harness

    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="fewer timed steps (each workload's quick_steps, >= 20)")
    p.add_argument("--only", metavar="NAME", help="run only the workload(s) matching NAME")
    p.add_argument("--out", default="BENCHMARKS.md", help="output markdown (default BENCHMARKS.md)")
    p.add_argument("--steps", type=int, default=None, help="override the timed steps per impl")
    p.add_argument("--block", type=int, default=harness.BLOCK,
                   help="consecutive timed steps of one implementation per turn (default "
                        f"{harness.BLOCK}; 1 = the old one-step rotation)")
    p.add_argument("--in-process", action="store_true",
                   help="time every implementation in this process (default: each in a worker "
                        "process of its own, see scripts/bench/isolate.py)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("--no-machine", action="store_true", help="skip measuring the machine limits")
    p.add_argument("--refresh-results", action="store_true",
                   help="only re-append docs/results/*.md to --out, keeping its measurements")
    args = p.parse_args(argv)
    if args.refresh_results:
        harness.refresh_results(args.out)
        print(f"refreshed the training results in {args.out}")
        return 0
    workloads = harness.discover(args.only)
    if args.list:
        for w in workloads:
            tag = f"  [pending: {w.pending}]" if w.pending else ""
            print(f"{w.name}: {', '.join(w.impls)}{tag}")
        return 0
    if not workloads:
        print(f"no workload matches {args.only!r}", file=sys.stderr)
        return 2
    argv_s = " ".join(argv if argv is not None else sys.argv[1:])
    harness.run(workloads, args.out, quick=args.quick, steps=args.steps, block=args.block,
                isolated=not args.in_process,
                measure_machine=not args.no_machine,
                command=f"python -m scripts.bench {argv_s}".strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
