"""One process of the multi-process tests (run by ``tests/distributed/test_*.py`` through
``python -m fdl.launch`` or directly; never collected by pytest).

    python worker.py steps OUT [--single D]   # K hand-written sharded steps over all devices
    python worker.py fit OUT --ckpt DIR --epochs E [--resume] [--sleep S] [--pidfile F]

In a launched run the process joins with ``fdl.distributed.initialize()``. ``--single D`` runs
without ``jax.distributed`` on ``D`` simulated devices. Process 0 writes ``OUT`` (``.npz``:
the params, BatchNorm state and summed metrics).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

N, D, CLASSES, BATCH = 100, 5, 3, 16  # 7 batches per epoch, the last padded (4 real rows)


def _args(argv):
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["steps", "fit", "idle"])
    p.add_argument("out")
    p.add_argument("--single", type=int, default=None)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--pidfile", default=None)
    p.add_argument("--one-device", action="store_true",
                   help="with --single: the plain single-device step on the full batch")
    return p.parse_args(argv)


def _model():
    from fdl import nn

    # no bias before BatchNorm: its true gradient is 0 and Adam would amplify rounding noise
    return nn.serial(("fc1", nn.dense(16, use_bias=False)), ("bn1", nn.batch_norm()),
                     ("act", nn.relu()), ("drop", nn.dropout(0.25)), ("fc2", nn.dense(CLASSES)))


def _data():
    import numpy as np

    centers = np.random.default_rng(123).normal(0, 2, (CLASSES, D))
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, N).astype(np.int32)
    x = (centers[y] + rng.normal(0, 1, (N, D))).astype(np.float32)
    return x, y


def _setup(one_device: bool):
    """(model, params, state, optimizer, loader, train_step, mesh or None)."""
    import jax

    from fdl import optim, parallel
    from fdl.data import ArrayLoader
    from fdl.train import make_train_step

    model = _model()
    _, params, state = model.init(jax.random.key(0), (1, D))
    opt = optim.adam(0.05)
    if one_device:
        loader = ArrayLoader(_data(), BATCH, key=jax.random.key(1), last_batch="pad")
        return model, params, state, opt, loader, make_train_step(model, opt), None
    mesh = parallel.data_mesh()
    loader = ArrayLoader(_data(), BATCH, key=jax.random.key(1), last_batch="pad",
                         device_put=parallel.batch_sharding(mesh))
    params, state = parallel.replicate_on_mesh((params, state), mesh)
    step = parallel.make_sharded_train_step(model, opt, mesh=mesh)
    return model, params, state, opt, loader, step, mesh


def _write(out, params, state, metrics, extra=None) -> None:
    import jax
    import numpy as np

    if jax.process_index() != 0:
        return
    flat = {}
    for name, tree in (("params", params), ("state", state), ("metrics", metrics),
                       ("checks", extra or {})):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            flat[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, out)


SYNC_REAL = (4, 3, 1, 0, 4, 2, 1, 4)  # real rows of 4 on each of 8 devices (SyncBatchNorm)


def _sync_bn_check(mesh) -> dict:
    """Loss, new state and gradients of SyncBatchNorm under shard_map over ``mesh`` (8
    devices, unequal real rows), or of batch_norm on the real rows on one device."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from fdl import nn, parallel
    from fdl.distributed.placement import to_host

    rng = np.random.default_rng(5)
    x = (rng.normal(size=(32, 3)) * 2 + 3).astype(np.float32)
    mask = np.concatenate([np.arange(4) < r for r in SYNC_REAL]).astype(np.float32)
    weights = np.tile(np.arange(1, 13, dtype=np.float32).reshape(4, 3) / 12, (8, 1))
    layer = parallel.sync_batch_norm("data")
    _, params, state = layer.init(jax.random.key(0), x.shape)
    if mesh is None:
        real = mask > 0

        def loss_fn(p, xx):
            y, s = nn.batch_norm().apply(p, state, xx, train=True)
            return jnp.sum((y * weights[real]) ** 2), s

        (loss, s), (gp, gx) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(params, x[real])
        return {"loss": loss, "state": s, "grad_params": gp, "grad_x": gx}

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data"), P("data"),
                                                           P("data")), out_specs=(P(), P()))
    def sharded(p, xx, mm, ww):
        y, s = layer.apply(p, state, xx, train=True, mask=mm)
        return jax.lax.psum(jnp.sum(mm[:, None] * (y * ww) ** 2), "data"), s

    bat = parallel.batch_sharding(mesh)
    xg, mg, wg = (parallel.put_global(a, bat) for a in (x, mask, weights))
    params = parallel.replicate_on_mesh(params, mesh)
    (loss, s), (gp, gx) = jax.jit(jax.value_and_grad(sharded, (0, 1), has_aux=True))(
        params, xg, mg, wg)
    return {"loss": loss, "state": s, "grad_params": gp, "grad_x": to_host(gx)[mask > 0]}


def _pmap_check(one_device: bool) -> dict:
    """3 steps of the pmap train step (BatchNorm over ``data``, no dropout) on the first 16
    examples, each process passing its rows; or the plain step on all 16 on one device."""
    import jax

    from fdl import nn, optim, parallel
    from fdl.train import make_train_step

    def model(axis):
        return nn.serial(("fc1", nn.dense(16, use_bias=False)),
                         ("bn1", nn.batch_norm(axis_name=axis)), ("act", nn.relu()),
                         ("fc2", nn.dense(CLASSES)))

    x, y = (a[:16] for a in _data())
    opt = optim.sgd(0.1, momentum=0.9)
    _, params, state = model(None).init(jax.random.key(0), (1, D))
    opt_state = opt.init(params)
    if one_device:
        step = make_train_step(model(None), opt)
        for i in range(3):
            params, state, opt_state, _ = step(params, state, opt_state, (x, y),
                                               jax.random.key(i))
        return {"params": params, "state": state}
    per = 16 // jax.process_count()
    lo = jax.process_index() * per
    batch = parallel.split_batch((x[lo:lo + per], y[lo:lo + per]))
    step = parallel.make_pmap_train_step(model("data"), opt)
    p, s, o = (parallel.replicate(t) for t in (params, state, opt_state))
    for i in range(3):
        p, s, o, _ = step(p, s, o, batch, jax.random.key(i))
    return {"params": parallel.unreplicate(p), "state": parallel.unreplicate(s)}


def run_steps(args) -> None:
    import jax

    from fdl.train.device_loop import accumulate as _accumulate

    model, params, state, opt, loader, step, mesh = _setup(args.one_device)
    opt_state = opt.init(params)
    if mesh is not None:
        from fdl import parallel

        opt_state = parallel.replicate_on_mesh(opt_state, mesh)
    key, sums, done = jax.random.key(2), None, 0
    while done < args.steps:
        for batch in loader:
            params, state, opt_state, m = step(params, state, opt_state, batch,
                                               jax.random.fold_in(key, done))
            sums = m if sums is None else _accumulate(sums, m)
            done += 1
            if done == args.steps:
                break
    checks = {}
    if mesh is None or mesh.devices.size == 8:
        checks = {"sync_bn": _sync_bn_check(mesh), "pmap": _pmap_check(mesh is None)}
    _write(args.out, params, state, sums, checks)


def run_fit(args) -> None:
    import jax

    from fdl.train import fit

    if args.pidfile:
        with open(f"{args.pidfile}.{jax.process_index()}", "w") as f:
            f.write(str(os.getpid()))
    model, params, state, opt, loader, step, mesh = _setup(args.one_device)

    def slow(step_no, metrics):
        time.sleep(args.sleep)

    main = jax.process_index() == 0
    res = fit(model, params, state, opt, loader, epochs=args.epochs, key=jax.random.key(2),
              train_step=None if mesh is None else step, checkpoint_dir=args.ckpt,
              checkpoint_every=None, checkpoint_every_steps=1, resume=args.resume, keep=2,
              progress=False, print_fn=print if main else None,
              callback=slow if args.sleep else None)
    _write(args.out, res.params, res.state, {"steps": jax.numpy.asarray(res.steps)})


def main(argv=None) -> int:
    args = _args(argv if argv is not None else sys.argv[1:])
    if args.single is not None:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = " ".join(
            [f for f in flags.split() if "xla_force_host_platform_device_count" not in f]
            + [f"--xla_force_host_platform_device_count={args.single}"])
        for var in ("FDL_COORDINATOR_ADDRESS", "FDL_NUM_PROCESSES", "FDL_PROCESS_ID"):
            os.environ.pop(var, None)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import fdl.distributed

    info = fdl.distributed.initialize()
    if args.pidfile and args.mode == "idle":
        with open(f"{args.pidfile}.{info.index}", "w") as f:
            f.write(str(os.getpid()))
    if args.mode == "idle":  # join, then wait to be killed (failure tests)
        import jax
        import jax.numpy as jnp

        from fdl import parallel

        mesh = parallel.data_mesh()
        x = parallel.replicate_on_mesh(jnp.ones(()), mesh)
        total = jax.jit(lambda v: v * 2)
        print(f"ready {info.describe()}", flush=True)
        while True:
            total(x).block_until_ready()
            time.sleep(0.05)
    (run_steps if args.mode == "steps" else run_fit)(args)
    print(f"done {info.describe()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
