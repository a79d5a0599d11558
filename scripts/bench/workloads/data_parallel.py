"""Data-parallel scaling: the LeNet-5+BN training step (global batch 256) on 1 device and
split over all local devices with a sharded ``jit`` (batch on a ``data`` mesh axis, params
replicated, BatchNorm statistics over the global batch).

A CPU process sees one JAX device unless it is started with simulated host devices, so this
workload is **pending** in a default run and measures only when started as::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m scripts.bench --only data_parallel

Simulated devices share the machine's cores: the figure says what splitting the step costs or
gains on this CPU (and that fdl's sharded step is no slower than Flax's), not multi-GPU speed-up.
"""

from __future__ import annotations

from functools import partial

from scripts.bench import common
from scripts.bench.api import Workload

_PENDING = None
try:
    import jax

    from fdl import parallel as _parallel

    _parallel.make_sharded_train_step  # noqa: B018
    _N = jax.local_device_count()
    if _N < 2:
        _PENDING = (
            f"this process sees {_N} JAX device; run with "
            "`XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m scripts.bench "
            "--only data_parallel` (fdl.parallel exists; see tests/parallel for equality with "
            "the 1-device step)")
except Exception as e:  # noqa: BLE001
    _N = 1
    _PENDING = f"fdl capability missing: {type(e).__name__}: {e}"


def _fdl(sharded: bool):
    def build():
        import jax
        import jax.numpy as jnp

        from fdl import optim
        from fdl.train import make_train_step
        from scripts.bench.workloads.lenet import fdl_lenet

        h = common.LENET
        x, y = common.image_batch(h["batch"], 28, 1, 10)
        net = fdl_lenet()
        _, params, state = net.init(jax.random.key(0), x.shape)
        opt = optim.sgd(h["lr"], momentum=h["momentum"])
        opt_state = opt.init(params)
        batch = (jnp.asarray(x), jnp.asarray(y))
        if sharded:
            mesh = _parallel.data_mesh()
            train_step = _parallel.make_sharded_train_step(net, opt, mesh=mesh)
            params, state, opt_state = _parallel.replicate_on_mesh((params, state, opt_state),
                                                                   mesh)
            batch = _parallel.shard_batch(batch, mesh)
        else:
            train_step = make_train_step(net, opt)
        key = jax.random.key(1)
        carry = [params, state, opt_state]

        def step():
            p, s, o, metrics = train_step(*carry, batch, key)
            carry[:] = [p, s, o]
            return jax.block_until_ready(metrics)

        return step

    return build


def _flax(sharded: bool):
    def build():
        import jax
        import jax.numpy as jnp
        import optax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from scripts.bench.references.flax_models import LeNetBN

        h = common.LENET
        x, y = common.image_batch(h["batch"], 28, 1, 10)
        x, y = jnp.asarray(x), jnp.asarray(y)
        model = LeNetBN()
        variables = model.init(jax.random.key(0), x, train=False)
        tx = optax.sgd(h["lr"], momentum=h["momentum"])
        carry = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]
        if sharded:  # idiomatic: put the data sharded, the state replicated; jit follows
            mesh = jax.make_mesh((_N,), ("data",))
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


_impls = {} if _PENDING else {
    "fdl (1 device)": _fdl(False),
    f"fdl (sharded jit, {_N} devices)": _fdl(True),
}
if not _PENDING:
    _impls.update({
        "Flax linen (1 device)": _flax(False),
        f"Flax linen (sharded jit, {_N} devices)": _flax(True),
        "PyTorch eager (one process, all threads)": _torch,
    })

WORKLOADS = [
    Workload(
        name="data_parallel",
        description=(
            "LeNet-5+BN training step (the `lenet5_bn` workload: 1x28x28, global batch 256, "
            "SGD momentum) on one JAX device and split over all local devices with a sharded "
            "`jit` (batch on a `data` mesh axis, params replicated, BatchNorm over the global "
            "batch); PyTorch runs the same step in one process on all threads. Simulated CPU "
            "devices share the cores: this shows the cost of splitting, not a multi-GPU "
            "speed-up."
        ),
        impls=_impls,
        flops_fn=_flops,
        flops_note="XLA HLO cost analysis of the Flax training step",
        pending=_PENDING,
        quick_steps=20,
        steps=30,
        extra={"examples_per_step": common.LENET["batch"]},
    )
]
