"""fdl's NMS against ``torchvision.ops.nms`` on the ``nms_5444`` inputs, interleaved in one
process (paired rounds; medians and the ratio).

torchvision cannot be imported beside the project's torch 2.13.0+cpu (its PyPI wheels are CUDA
builds), so this is not a harness workload; run it with a Python where torchvision works and
fdl's checkout is importable, e.g.::

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        jax==0.10.2 numpy
    PYTHONPATH=. /tmp/tvenv/bin/python -m scripts.bench.nms_torchvision --rounds 30

It first checks that both keep the same boxes in the same order.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (JAX uses the machine)")
    args = ap.parse_args(argv)

    import jax
    import torch
    import torchvision

    from fdl import ops
    from scripts.bench.workloads.ssd import _nms_inputs

    torch.set_num_threads(args.threads)
    boxes, scores = _nms_inputs()
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    jb, js = jax.numpy.asarray(boxes), jax.numpy.asarray(scores)
    fns = {"fdl": jax.jit(lambda b, s: ops.nms(b, s, 0.5)),
           "fdl (max_outputs=100)": jax.jit(lambda b, s: ops.nms(b, s, 0.5, max_outputs=100))}
    ref = torchvision.ops.nms(tb, ts, 0.5).numpy()
    res = jax.block_until_ready(fns["fdl"](jb, js))
    got = np.asarray(res.indices)[: int(res.count)]
    assert np.array_equal(got, ref), "fdl and torchvision keep different boxes"
    small = jax.block_until_ready(fns["fdl (max_outputs=100)"](jb, js))
    assert np.array_equal(np.asarray(small.indices), ref[:100])
    times = {k: [] for k in (*fns, "torchvision.ops.nms")}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(jb, js))
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torchvision.ops.nms(tb, ts, 0.5)
        times["torchvision.ops.nms"].append(time.perf_counter() - t0)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    base = med["torchvision.ops.nms"]
    print(f"{len(boxes)} boxes, {len(ref)} kept; torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, jax {jax.__version__}; {args.rounds} interleaved rounds")
    for k, v in med.items():
        print(f"  {k:<24} median {v:8.3f} ms   {v / base:5.2f}x torchvision")
    return med


if __name__ == "__main__":
    main()
