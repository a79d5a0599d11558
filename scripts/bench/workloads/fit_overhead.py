"""Overhead of ``fdl.train.fit`` over the bare jitted training step (LeNet + BN on the digits).

One harness "step" is one epoch: 1792 sklearn digits (8x8, zero-padded to 28x28 so the two 5x5
convolutions fit), 7 batches of 256, fdl's BN LeNet (the same network as ``lenet5_bn``), SGD lr
0.1 momentum 0.9. Both rows call the same compiled step (``fdl.train.make_train_step``):

* ``fdl fit``: ``fdl.train.fit(..., epochs=1)`` on an ``ArrayLoader`` (shuffling, batching,
  per-step keys, metric sums, history; progress bar, printing, checkpoints off);
* ``bare jitted step loop``: a Python loop over the 7 batches, already on the device (no
  shuffling: the lower bound, and the reference for ``x fastest``);
* ``bare loop, shuffled``: the same loop with what a user would write to shuffle, a NumPy
  permutation per epoch and ``x[rows], y[rows]`` on the device arrays before each step.

Data placement is the same for both: the bare loop's batches are put on the device once, in
setup, and fit's loader (built once, rewound to epoch 0 before every call) keeps its device copy
of the dataset after the first call. (Until 2026-11-29 a fresh loader was built per call, so fit
alone paid a host-to-device copy of the whole dataset, 5.6 MB, in every timed call.)

The row to read is ``fdl fit``'s ``x fastest``: fit's epoch time over the bare loop's (issue 4's
goal: < 1.05); examples/s are in their own column.

``fit_overhead_10_epochs`` is the same with one harness step = 10 epochs (``fit(...,
epochs=10)`` against 10 passes of the bare loop), the length of ``fdl train``'s default run: a
one-epoch call pays fit's per-call set-up (copies, optimizer init, the index table, the history
row) every epoch, a training run once.

Since 2026-11-30 (fifth session) fit runs each epoch as one compiled call, a loop on the device
in which every step gathers its shuffled batch (``fdl.train.device_loop.DeviceSteps``), while the
bare loop dispatches one call per step. So fit can be faster than the bare loop: the ratio
measures fit as a user gets it against the loop a user would write by hand.
"""

from __future__ import annotations

import functools

from scripts.bench import common
from scripts.bench.api import Workload
from scripts.bench.workloads import _fit_rows

_N, _BATCH = 1792, 256
_PENDING = None
try:
    from fdl import optim as foptim
    from fdl.train import fit as _fit  # noqa: F401
    from fdl.train import make_train_step
except Exception as e:  # noqa: BLE001
    _PENDING = f"`fdl.train.fit` is not available ({type(e).__name__}: {e})"


def _setup():
    import jax
    import numpy as np
    from sklearn.datasets import load_digits

    from scripts.bench.workloads.lenet import fdl_lenet

    d = load_digits()
    x = (d.images[:_N] / 16.0).astype(np.float32)
    x = np.pad(x, ((0, 0), (10, 10), (10, 10)))[..., None]  # (N, 28, 28, 1)
    y = d.target[:_N].astype(np.int32)
    net = fdl_lenet()
    _, params, state = net.init(jax.random.key(0), (_BATCH, 28, 28, 1))
    opt = foptim.sgd(common.LENET["lr"], momentum=common.LENET["momentum"])
    return net, params, state, opt, x, y


def _setup_rows():
    return (*_setup(), _BATCH)


_fit_row = functools.partial(_fit_rows.fit_row, _setup_rows)
_bare_row = functools.partial(_fit_rows.bare_row, _setup_rows)


def _bare_shuffled_row(epochs: int = 1):
    """The bare loop as a user would write it with shuffling: a NumPy permutation per epoch and
    ``x[rows], y[rows]`` on the device-resident arrays before each step (not the reference for
    ``x fastest``, which is the faster unshuffled loop; it shows what shuffling costs)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    net, params, state, opt, x, y = _setup()
    train_step = make_train_step(net, opt)
    key = jax.random.key(1)
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    carry = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state), opt.init(params)]
    rng = np.random.default_rng(0)

    def step():
        p, s, o = carry
        for _ in range(epochs):
            perm = rng.permutation(_N)
            for i in range(0, _N - _BATCH + 1, _BATCH):
                rows = perm[i:i + _BATCH]
                p, s, o, _ = train_step(p, s, o, (xd[rows], yd[rows]), key)
        carry[:] = [p, s, o]
        return jax.block_until_ready(p)

    return step


WORKLOADS = [
    Workload(
        name="fit_overhead",
        description=(
            "One epoch (7 batches of 256 = 1792 examples) of fdl's BN LeNet on the sklearn digits "
            "(zero-padded to 28x28), SGD momentum: `fdl.train.fit` (ArrayLoader built once and "
            "rewound each call, so its data stay on the device like the bare loop's; shuffling, "
            "metrics, history; progress bar, printing and checkpoints off) against a bare Python "
            "loop over the same compiled `make_train_step` on device-resident batches. "
            "`x fastest` of the fit row = fit's time / the bare loop's."
        ),
        impls={} if _PENDING else {"fdl fit": _fit_row, "bare jitted step loop": _bare_row,
                                   "bare loop, shuffled (x[rows] per step)": _bare_shuffled_row},
        pending=_PENDING,
        # a 5% difference between two ~40 ms medians on a shared 2-core machine needs more
        # samples than the default 20; one call is cheap (~0.1 s per pair)
        quick_steps=40,
        steps=60,
        isolate=False,  # fit and the bare loops run the same fdl step in one process
        extra={"examples_per_step": _N},
    ),
    Workload(
        name="fit_overhead_10_epochs",
        description=(
            "As `fit_overhead`, one harness step = 10 epochs (`fdl train`'s default run length): "
            "`fdl.train.fit(..., epochs=10)` against 10 passes of the bare loop over the same "
            "compiled step. `x fastest` of the fit row = fit's time / the bare loop's."
        ),
        impls={} if _PENDING else {
            "fdl fit": functools.partial(_fit_row, 10),
            "bare jitted step loop": functools.partial(_bare_row, 10),
            "bare loop, shuffled (x[rows] per step)": functools.partial(_bare_shuffled_row, 10)},
        pending=_PENDING,
        # ~0.4 s per step (10 epochs); 40 steps = 8 blocks of 5 per row, so one slow phase of
        # the shared machine during one block does not move the median (a full run at 07:08
        # UTC on 2026-11-30 gave 1.07 with 20 steps, fit's min 390 ms against the bare
        # loop's 405 ms; an in-process A/B right after, 42 calls each: 0.946)
        quick_steps=20,
        steps=40,
        isolate=False,
        extra={"examples_per_step": 10 * (_N // _BATCH) * _BATCH},
    ),
]
