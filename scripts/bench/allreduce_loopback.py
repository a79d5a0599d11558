"""Time one cross-process all-reduce (a ``psum`` in a sharded ``jit``) of ``S`` bytes between
processes over loopback (gloo on CPU), for the scaling note in ``docs/distributed.md``::

    python -m fdl.launch -n 2 --cpu-devices 1 scripts/bench/allreduce_loopback.py

Prints, from process 0, the median and minimum time of ``--reps`` all-reduces per size, and
the latency ``a`` and bandwidth ``B`` of the fit ``T = a + S / B`` (least squares over the
sizes). Each all-reduce is one compiled call that adds its input over the ``data`` axis.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--sizes", default="4,1024,181328,4194304,44734256",
                   help="bytes per all-reduce (comma-separated)")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import fdl.distributed
    from fdl import parallel

    info = fdl.distributed.initialize()
    mesh = parallel.data_mesh()
    n = mesh.devices.size
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        count = max(1, size // 4)
        x = parallel.put_global(np.ones((n, count), np.float32), parallel.batch_sharding(mesh))
        f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=mesh,
                                  in_specs=P("data"), out_specs=P("data")))
        f(x).block_until_ready()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            f(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        rows.append((count * 4, statistics.median(times), min(times)))
        del x
    if info.is_main:
        print(f"all-reduce over {n} devices in {info.count} processes ({args.reps} reps)")
        print("bytes        median ms   min ms")
        for size, med, lo in rows:
            print(f"{size:<12d} {med * 1e3:9.3f} {lo * 1e3:8.3f}")
        s = np.array([r[0] for r in rows], float)
        t = np.array([r[1] for r in rows], float)
        slope, intercept = np.polyfit(s, t, 1)
        print(f"fit T = a + S / B over the medians: a = {intercept * 1e6:.0f} us, "
              f"B = {1 / slope / 1e9:.2f} GB/s")
    del jnp
    return 0


if __name__ == "__main__":
    sys.exit(main())
