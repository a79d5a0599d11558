"""Data-parallel scaling: the LeNet-5+BN training step on 256 examples, split over 1, 2, 4
and 8 simulated CPU devices with a sharded ``jit`` and over 2 processes x 4 devices
(``jax.distributed``, gloo over loopback), against the single-device step at the same
per-device batch, and Flax's sharded step.

Every row does the work of 256 examples: ``fdl (1 device, k x batch 256/k)`` runs ``k``
single-device steps of ``256/k`` examples (the per-device batch of a ``k``-device split), so
the ratio of the ``k``-device sharded row to it is the cost of splitting the step (the
gradient all-reduce, the BatchNorm statistics over the global batch, the per-device
dispatch), with the same arithmetic on the same two cores. Simulated devices share the
machine's cores: this measures overhead, not a multi-GPU speed-up (see
``docs/distributed.md`` for the all-reduce bytes per step and the projection to real
interconnects).

Each row runs in a worker process of its own (the harness's default), which sets its device
count before JAX starts (``jax_num_cpu_devices``); the 2-process row starts a partner process
that joins it as process 1 and runs every step in lockstep. With ``--in-process`` the rows
needing more devices than the process has fail with a message saying so.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
from functools import partial

from scripts.bench import common
from scripts.bench.api import Workload

GLOBAL = common.LENET["batch"]  # 256 examples per step in every row


def _use_devices(n: int, check: bool = True) -> None:
    """Give this process ``n`` CPU devices (before JAX starts), or check it has them."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend is up already (``--in-process``)
        pass
    if check and jax.device_count() < n:
        raise RuntimeError(f"needs {n} devices, this process has {jax.device_count()}: run "
                           "the benchmark isolated (the default, not --in-process)")


def _lenet_setup(batch: int, seed: int = 0):
    """``(model, params, state, optimizer, x, y)`` of the LeNet workload for ``batch``."""
    import jax

    from fdl import optim
    from scripts.bench.workloads.lenet import fdl_lenet

    h = common.LENET
    x, y = common.image_batch(GLOBAL, 28, 1, 10, seed)
    net = fdl_lenet()
    _, params, state = net.init(jax.random.key(0), (batch, 28, 28, 1))
    return net, params, state, optim.sgd(h["lr"], momentum=h["momentum"]), x, y


def _fdl_single(k: int):
    """``k`` single-device steps of ``GLOBAL / k`` examples per timed step."""
    def build():
        import jax
        import jax.numpy as jnp

        from fdl.train import make_train_step

        _use_devices(1)
        b = GLOBAL // k
        net, params, state, opt, x, y = _lenet_setup(b)
        batches = [(jnp.asarray(x[i * b:(i + 1) * b]), jnp.asarray(y[i * b:(i + 1) * b]))
                   for i in range(k)]
        train_step = make_train_step(net, opt)
        carry = [params, state, opt.init(params)]
        key = jax.random.key(1)

        def step():
            for batch in batches:
                p, s, o, metrics = train_step(*carry, batch, key)
                carry[:] = [p, s, o]
            return jax.block_until_ready(metrics)

        return step

    return build


def _sharded_step(mesh):
    """One sharded step over ``mesh`` of the global batch: ``step()`` blocks on it."""
    import jax

    from fdl import parallel

    net, params, state, opt, x, y = _lenet_setup(GLOBAL)
    train_step = parallel.make_sharded_train_step(net, opt, mesh=mesh)
    carry = list(parallel.replicate_on_mesh((params, state, opt.init(params)), mesh))
    batch = parallel.shard_batch((x, y), mesh)
    key = parallel.replicate_on_mesh(jax.random.key(1), mesh)

    def step():
        p, s, o, metrics = train_step(*carry, batch, key)
        carry[:] = [p, s, o]
        return jax.block_until_ready(metrics)

    return step


def _fdl_sharded(n: int):
    def build():
        from fdl import parallel

        _use_devices(n)
        return _sharded_step(parallel.data_mesh(n))

    return build


def _join(process_id: int, address: str, processes: int, devices: int) -> None:
    import fdl.distributed as dist

    _use_devices(devices, check=False)  # jax.distributed starts before the backend
    dist.initialize(dist.ClusterSpec(address, processes, process_id, "bench"),
                    timeouts=dist.Timeouts(heartbeat=10, init=60, shutdown=30))


def _fdl_processes(processes: int, devices: int):
    """Process 0 of a ``processes`` x ``devices`` run; the others are partner processes
    started here that run every step when this one does."""
    def build():
        from fdl import parallel
        from fdl.launch import free_port

        address = f"127.0.0.1:{free_port()}"
        partners = [subprocess.Popen(
            [sys.executable, "-m", "scripts.bench.workloads.data_parallel", "partner", address,
             str(i), str(processes), str(devices)], stdin=subprocess.PIPE, stdout=sys.stderr,
            text=True) for i in range(1, processes)]
        _join(0, address, processes, devices)
        # before JAX's exit handshake (atexit runs the newest first): end the partners' input
        atexit.register(lambda: [p.stdin.close() for p in partners])
        run = _sharded_step(parallel.data_mesh())

        def step():
            for p in partners:
                p.stdin.write("1\n")
                p.stdin.flush()
            return run()

        return step

    return build


def partner(address: str, process_id: int, processes: int, devices: int) -> int:
    """A partner process: one step per line read, until its input ends."""
    from fdl import parallel

    _join(process_id, address, processes, devices)
    run = _sharded_step(parallel.data_mesh())
    for _ in sys.stdin:
        run()
    return 0


def _flax(n: int):
    def build():
        import jax
        import jax.numpy as jnp
        import optax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from scripts.bench.references.flax_models import LeNetBN

        _use_devices(n)
        h = common.LENET
        x, y = common.image_batch(GLOBAL, 28, 1, 10)
        x, y = jnp.asarray(x), jnp.asarray(y)
        model = LeNetBN()
        variables = model.init(jax.random.key(0), x, train=False)
        tx = optax.sgd(h["lr"], momentum=h["momentum"])
        carry = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]
        if n > 1:  # idiomatic: put the data sharded, the state replicated; jit follows
            mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
            x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
            carry = list(jax.device_put(carry, NamedSharding(mesh, P())))

        @partial(jax.jit, donate_argnums=(0, 1, 2))
        def train_step(params, batch_stats, opt_state, x, y):
            def loss_fn(p):
                logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return loss, upd["batch_stats"]

            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state, loss

        def step():
            p, b, o, loss = train_step(*carry, x, y)
            carry[:] = [p, b, o]
            return loss.block_until_ready()

        return step

    return build


def _torch():
    from scripts.bench.references import torch_models

    return torch_models.lenet_step(False)


def _flops():
    from scripts.bench.references import flax_models

    return flax_models.classifier_flops("lenet")


_impls = {"fdl (1 device)": _fdl_single(1)}
for _n in (2, 4, 8):
    _impls[f"fdl (1 device, {_n} x batch {GLOBAL // _n})"] = _fdl_single(_n)
    _impls[f"fdl (sharded jit, {_n} devices)"] = _fdl_sharded(_n)
_impls["fdl (xla, sharded jit, 8 devices)"] = common.xla_kernels(_fdl_sharded(8))
_impls["fdl (2 processes x 4 devices)"] = _fdl_processes(2, 4)
_impls.update({
    "Flax linen (1 device)": _flax(1),
    "Flax linen (sharded jit, 8 devices)": _flax(8),
    "PyTorch eager (one process, all threads)": _torch,
})

WORKLOADS = [
    Workload(
        name="data_parallel",
        description=(
            "LeNet-5+BN training step (the `lenet5_bn` workload: 1x28x28, SGD momentum) on 256 "
            "examples per row: one device; k single-device steps of 256/k examples (the "
            "per-device batch of a k-way split: the same arithmetic without the split); the "
            "sharded `jit` step over k = 2, 4, 8 simulated CPU devices (batch on a `data` mesh "
            "axis, params replicated, BatchNorm over the global batch, gradients all-reduced); "
            "2 processes x 4 devices on `jax.distributed` (gloo over loopback). Simulated "
            "devices share the 2 cores: sharded / (k x batch 256/k) is the cost of splitting, "
            "not a multi-GPU speed-up (docs/distributed.md)."
        ),
        impls=_impls,
        flops_fn=_flops,
        flops_note="XLA HLO cost analysis of the Flax training step",
        quick_steps=20,
        steps=30,
        extra={"examples_per_step": GLOBAL},
    )
]


_DTYPE_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8,
                "u64": 8, "pred": 1, "s8": 1, "u8": 1}


def allreduce_bytes(model: str = "lenet", devices: int = 8) -> dict:
    """The all-reduces XLA compiles into fdl's sharded step of ``model`` (``lenet``: this
    workload; ``resnet18``: the CIFAR ResNet-18 of the ``resnet18`` workload, batch 32 per
    device) over ``devices`` devices: ``{"count", "bytes", "largest", "params"}`` (bytes of
    the reduced operands, per device and step)."""
    import math
    import re

    import jax
    import numpy as np

    from fdl import optim, parallel

    _use_devices(devices)
    if model == "lenet":
        from scripts.bench.workloads.lenet import fdl_lenet

        net, shape = fdl_lenet(), (GLOBAL, 28, 28, 1)
    else:
        from fdl.models.vision import resnet18

        net, shape = resnet18(num_classes=10, small_input=True), (32 * devices, 32, 32, 3)
    mesh = parallel.data_mesh(devices)
    _, params, state = net.init(jax.random.key(0), shape)
    opt = optim.sgd(0.1, momentum=0.9)
    step = parallel.make_sharded_train_step(net, opt, mesh=mesh)
    batch = parallel.shard_batch((np.zeros(shape, np.float32), np.zeros(shape[0], np.int32)),
                                 mesh)
    args = parallel.replicate_on_mesh((params, state, opt.init(params)), mesh)
    hlo = step.lower(*args, batch, jax.random.key(0)).compile().as_text()
    sizes = []
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
        if m:
            sizes.append(sum(_DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
                             for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return {"count": len(sizes), "bytes": sum(sizes), "largest": max(sizes, default=0),
            "params": n_params}


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "partner":
    sys.exit(partner(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "allreduce":
    # python -m scripts.bench.workloads.data_parallel allreduce [lenet|resnet18] [devices]
    print(allreduce_bytes(*(sys.argv[2:3] or ["lenet"]), *map(int, sys.argv[3:4])))
