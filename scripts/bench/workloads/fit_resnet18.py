"""Overhead of ``fdl.train.fit`` over the bare jitted step on ResNet-18 (CIFAR shape).

One harness "step" is one epoch: 3 batches of 32 synthetic 3x32x32 images (96 examples),
``fdl.models.vision.resnet18(num_classes=10, small_input=True)``, SGD lr 0.05 momentum 0.9 (the
``resnet18`` workload's model and hyperparameters). Both rows call the same compiled step
(``fdl.train.make_train_step``): ``fdl fit`` runs ``fit(..., epochs=1)`` (its device loop:
the epoch's steps in one compiled call, each gathering its shuffled batch), ``bare jitted step
loop`` a Python loop over device-resident batches (see ``_fit_rows``).

Two workloads, one per kernel mode: ``fit_resnet18`` with the kernels a user gets (oneDNN's
convolutions where the native extension is available, else XLA's) and ``fit_resnet18_xla`` with
XLA's convolutions forced. The row to read is ``fdl fit``'s ``x fastest``, fit's epoch time over
the bare loop's (issue 14's goal: <= 1.05 in both modes).

Inside a loop body XLA's CPU backend used to run every backward convolution as a generic loop
nest instead of its Eigen call (ResNet-18: fit 17-28x slower than the bare loop;
``fdl.nn.conv_xla`` and ``docs/results/training.md``): this workload guards against that.
"""

from __future__ import annotations

import contextlib
import functools

from scripts.bench import common
from scripts.bench.api import Workload
from scripts.bench.workloads import _fit_rows

_BATCHES = 3
_PENDING = None
try:
    from fdl import optim as foptim
    from fdl.models.vision import resnet18 as _resnet18
    from fdl.train import fit as _fit  # noqa: F401
except Exception as e:  # noqa: BLE001
    _PENDING = f"`fdl.train.fit` or the ResNet-18 model is not available ({type(e).__name__}: {e})"


def _setup():
    import jax

    h = common.RESNET
    n = _BATCHES * h["batch"]
    x, y = common.image_batch(n, 32, 3, h["classes"])
    net = _resnet18(num_classes=h["classes"], small_input=True)
    _, params, state = net.init(jax.random.key(0), (h["batch"], 32, 32, 3))
    opt = foptim.sgd(h["lr"], momentum=h["momentum"])
    return net, params, state, opt, x, y, h["batch"]


@contextlib.contextmanager
def _xla_kernels():
    """Trace with XLA's convolutions and dense products (the native kernels off)."""
    from fdl import config

    with config.override(conv_backend="xla", dense_backend="xla"):
        yield


def _impls(kernels):
    return {
        "fdl fit": functools.partial(_fit_rows.fit_row, _setup, kernels=kernels),
        "bare jitted step loop": functools.partial(_fit_rows.bare_row, _setup, kernels=kernels),
    }


_EXAMPLES = _BATCHES * common.RESNET["batch"]
_DESCRIPTION = (
    f"One epoch ({_BATCHES} batches of {common.RESNET['batch']} = {_EXAMPLES} synthetic 3x32x32 "
    "images) of `fdl.models.vision.resnet18(small_input=True)`, SGD momentum: `fdl.train.fit` "
    "(ArrayLoader built once and rewound each call; shuffling, metrics, history; progress bar, "
    "printing and checkpoints off) against a bare Python loop over the same compiled "
    "`make_train_step` on device-resident batches. `x fastest` of the fit row = fit's time / "
    "the bare loop's."
)

WORKLOADS = [
    Workload(
        name="fit_resnet18",
        description=_DESCRIPTION + " Kernels: the default (native where available, else XLA).",
        impls={} if _PENDING else _impls(None),
        pending=_PENDING,
        quick_steps=20,
        steps=20,
        isolate=False,  # fit and the bare loop run the same fdl step in one process
        extra={"examples_per_step": _EXAMPLES},
    ),
    Workload(
        name="fit_resnet18_xla",
        description=_DESCRIPTION + " Kernels: XLA's convolutions forced.",
        impls={} if _PENDING else _impls(_xla_kernels),
        pending=_PENDING,
        quick_steps=20,
        steps=20,
        isolate=False,
        extra={"examples_per_step": _EXAMPLES},
    ),
]
