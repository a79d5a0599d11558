"""Train the same model on 1 device and on all local devices (data parallel) and compare.

Runs ``fdl train``'s default CNN on the digits with the same seed, data order and global batch,
first with the plain jitted step on one device, then with the sharded-``jit`` step (and
optionally the ``pmap`` step) over all devices, and prints test accuracy, wall time and the
largest parameter difference. On a CPU-only machine the devices are simulated:

    python scripts/train_data_parallel.py --devices 8 [--epochs 3] [--pmap]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices if no accel.")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pmap", action="store_true", help="also run the pmap form")
    args = ap.parse_args(argv)
    if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import numpy as np

    from fdl import nn, optim, parallel
    from fdl.cli import _cnn
    from fdl.data import ArrayLoader, load_digits
    from fdl.train import fit

    n = jax.local_device_count()
    if args.batch_size % n:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of {n} devices")
    (x, y), test = load_digits()
    opt = optim.adam(1e-3)
    results = {}

    def run(name, model, train_step, eval_step, put, replicated=False):
        _, params, state = model.init(jax.random.key(0), (1, 8, 8, 1))
        opt_state = None
        if replicated:  # pmap: a leading device axis on params, state, optimizer state
            opt_state = parallel.replicate(opt.init(params))
            params, state = parallel.replicate(params), parallel.replicate(state)
        loader = ArrayLoader((x, y), args.batch_size, key=jax.random.key(1), last_batch="pad",
                             device_put=put)
        t = time.perf_counter()
        res = fit(model, params, state, opt, loader, epochs=args.epochs, key=jax.random.key(2),
                  eval_data=ArrayLoader(test, 8 * (len(test[0]) // 16), last_batch="pad",
                                        device_put=put),
                  train_step=train_step, eval_step=eval_step, opt_state=opt_state,
                  progress=False, print_fn=lambda s: print(f"[{name}]", s))
        wall = time.perf_counter() - t
        if replicated:
            res.params = parallel.unreplicate(res.params)
        results[name] = (res, wall)
        print(f"[{name}] test acc {res.history.last['test_acc']:.4f}, {wall:.1f} s")

    model = _cnn(10, (8, 8, 1))
    run("1 device", model, None, None, True)
    mesh = parallel.data_mesh()
    run(f"sharded jit x{n}", model, parallel.make_sharded_train_step(model, opt, mesh=mesh),
        parallel.make_sharded_eval_step(model, mesh=mesh), parallel.batch_sharding(mesh))
    if args.pmap:
        # the same CNN with BatchNorm statistics over the global batch (axis_name="data")
        pm_model = nn.serial(*[
            (name, nn.batch_norm(axis_name="data") if name.startswith("bn") else layer)
            for name, layer in model.children])
        pstep = parallel.make_pmap_train_step(pm_model, opt)
        peval = parallel.make_pmap_eval_step(pm_model)

        def train_step(p, s, o, batch, key):
            p, s, o, m = pstep(p, s, o, parallel.split_batch(batch), key)
            return p, s, o, parallel.unreplicate(m)

        def eval_step(p, s, batch):
            return parallel.unreplicate(peval(p, s, parallel.split_batch(batch)))

        run(f"pmap x{n}", pm_model, train_step, eval_step, False, replicated=True)
    ref = results["1 device"][0].params
    for name, (res, wall) in results.items():
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(ref), strict=True))
        print(f"{name:>16}: test acc {res.history.last['test_acc']:.4f}, wall {wall:.1f} s, "
              f"max |param - 1-device param| {diff:.2e}")
    if args.pmap:
        print("(pmap draws a different dropout mask per device, so it follows another, equally "
              "valid trajectory; without dropout it equals the 1-device step: tests/parallel)")
    return {k: v[0].history.last["test_acc"] for k, v in results.items()}


if __name__ == "__main__":
    main()
