"""CIFAR ResNet-18 training step, 3x32x32, batch 32, SGD momentum, BatchNorm in train mode.

Architecture (the same for every implementation): conv3x3(64, pad 1, no bias) - BN - ReLU stem
(no max-pool), BasicBlock stages [2, 2, 2, 2] with 64/128/256/512 channels (stride 2 at the
first block of stages 2-4, 1x1 conv + BN projection shortcut there), global average pool,
dense 10; softmax cross-entropy; SGD lr 0.05 momentum 0.9; BN momentum 0.1 (decay 0.9).
"""

from __future__ import annotations

from scripts.bench import common
from scripts.bench.api import Workload

_PENDING = None
_SOURCE = "fdl.nn layers"
try:
    from fdl import nn as fnn
    from fdl import optim as foptim

    foptim.sgd, foptim.apply_updates  # noqa: B018
    fnn.conv2d, fnn.batch_norm, fnn.global_avg_pool2d, fnn.residual  # noqa: B018
except Exception as e:  # noqa: BLE001
    _PENDING = f"fdl capability missing: {type(e).__name__}: {e}"
try:
    from fdl.models.vision import resnet18 as _vision_resnet18

    _SOURCE = "fdl.models.vision.resnet18(num_classes=10, small_input=True)"
except Exception:  # noqa: BLE001 - the model zoo entry may not exist yet
    _vision_resnet18 = None


def fdl_resnet18(num_classes: int = 10):
    """The CIFAR ResNet-18 from ``fdl.nn`` layers (NHWC)."""

    def block(cout: int, stride: int, project: bool):
        body = fnn.serial(
            ("conv1", fnn.conv2d(cout, 3, stride=stride, padding=1, use_bias=False)),
            ("bn1", fnn.batch_norm(decay=0.9)), fnn.relu(),
            ("conv2", fnn.conv2d(cout, 3, padding=1, use_bias=False)),
            ("bn2", fnn.batch_norm(decay=0.9)),
        )
        short = None
        if project:
            short = fnn.serial(("conv", fnn.conv2d(cout, 1, stride=stride, use_bias=False)),
                               ("bn", fnn.batch_norm(decay=0.9)))
        return fnn.residual(body, short, post=fnn.relu())

    layers = [("stem_conv", fnn.conv2d(64, 3, padding=1, use_bias=False)),
              ("stem_bn", fnn.batch_norm(decay=0.9)), fnn.relu()]
    cin = 64
    for s, f in enumerate((64, 128, 256, 512)):
        stride = 1 if s == 0 else 2
        layers.append((f"stage{s + 1}_0", block(f, stride, stride != 1 or cin != f)))
        layers.append((f"stage{s + 1}_1", block(f, 1, False)))
        cin = f
    layers += [fnn.global_avg_pool2d(), ("fc", fnn.dense(num_classes))]
    return fnn.serial(*layers)


def _fdl():
    import jax
    import jax.numpy as jnp

    h = common.RESNET
    x, y = common.image_batch(h["batch"], 32, 3, h["classes"])
    if _vision_resnet18 is not None:
        net = _vision_resnet18(num_classes=h["classes"], small_input=True)
    else:
        net = fdl_resnet18(h["classes"])
    _, params, state = net.init(jax.random.key(0), x.shape)
    opt = foptim.sgd(h["lr"], momentum=h["momentum"])
    return common.fdl_classifier_step(net, params, state, opt, jnp.asarray(x), jnp.asarray(y))


def _flax():
    from scripts.bench.references import flax_models

    return flax_models.resnet18_step()


def _equinox():
    from scripts.bench.references import equinox_models

    return equinox_models.resnet18_step()


def _torch():
    from scripts.bench.references import torch_models

    return torch_models.resnet18_step(False)


def _torch_compile():
    from scripts.bench.references import torch_models

    return torch_models.resnet18_step(True)


def _flops():
    from scripts.bench.references import flax_models

    return flax_models.classifier_flops("resnet18")


_impls = {} if _PENDING else {f"fdl ({_SOURCE})": _fdl, "fdl (xla)": common.xla_kernels(_fdl)}
_impls.update({"Flax linen": _flax, "Equinox": _equinox, "PyTorch eager": _torch,
               "torch.compile": _torch_compile})

WORKLOADS = [
    Workload(
        name="resnet18_cifar",
        description=(
            "CIFAR ResNet-18 (conv3x3(64)-BN-ReLU stem without max-pool, BasicBlock [2,2,2,2], "
            "64-512 channels, 1x1-conv+BN projection shortcuts, global average pool, dense 10), "
            "input 3x32x32, batch 32, float32, softmax cross-entropy, SGD lr 0.05 momentum 0.9, "
            "BN in train mode (momentum 0.1). Layout: NHWC for fdl/Flax, per-example CHW under "
            "vmap for Equinox, NCHW for PyTorch. One training step on a fixed batch."
        ),
        impls=_impls,
        flops_fn=_flops,
        flops_note="XLA HLO cost analysis of the Flax training step; XLA does not count the "
                   "convolutions' zero-padding taps, so the dense count is ~15% higher",
        pending=_PENDING,
        quick_steps=20,
        # 50, not 30: on a noisy 2-core machine the medians of 30 steps moved by ~5% between
        # full runs (docs/performance.md, session 4), as much as the margin being measured
        steps=50,
    )
]
