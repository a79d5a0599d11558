"""LeNet-5 + BatchNorm training step (d2l's BN LeNet), 1x28x28, batch 256, SGD momentum.

Architecture (the same for every implementation): conv(6, 5x5, valid) - BN - sigmoid -
avgpool 2x2 - conv(16, 5x5) - BN - sigmoid - avgpool 2x2 - flatten (256) - dense 120 - BN -
sigmoid - dense 84 - BN - sigmoid - dense 10; softmax cross-entropy; SGD lr 0.1 momentum 0.9;
BN momentum 0.1 (PyTorch) = decay 0.9; a fixed synthetic float32 batch already in memory.
"""

from __future__ import annotations

from scripts.bench import common
from scripts.bench.api import Workload

_PENDING = None
try:  # fdl's capability: layers (conv2d, batch_norm, avg_pool2d) and fdl.optim.sgd
    from fdl import nn as fnn
    from fdl import optim as foptim

    foptim.sgd, foptim.apply_updates  # noqa: B018
    fnn.conv2d, fnn.batch_norm, fnn.avg_pool2d  # noqa: B018
except Exception as e:  # noqa: BLE001
    _PENDING = f"fdl capability missing: {type(e).__name__}: {e}"


def fdl_lenet():
    """The same network from ``fdl.nn`` layers (NHWC)."""
    return fnn.serial(
        ("conv1", fnn.conv2d(6, 5)), ("bn1", fnn.batch_norm(decay=0.9)), fnn.sigmoid(),
        fnn.avg_pool2d(2),
        ("conv2", fnn.conv2d(16, 5)), ("bn2", fnn.batch_norm(decay=0.9)), fnn.sigmoid(),
        fnn.avg_pool2d(2),
        fnn.flatten(),
        ("fc1", fnn.dense(120)), ("bn3", fnn.batch_norm(decay=0.9)), fnn.sigmoid(),
        ("fc2", fnn.dense(84)), ("bn4", fnn.batch_norm(decay=0.9)), fnn.sigmoid(),
        ("fc3", fnn.dense(10)),
    )


def _fdl():
    import jax
    import jax.numpy as jnp

    h = common.LENET
    x, y = common.image_batch(h["batch"], 28, 1, 10)
    net = fdl_lenet()
    _, params, state = net.init(jax.random.key(0), x.shape)
    opt = foptim.sgd(h["lr"], momentum=h["momentum"])
    return common.fdl_classifier_step(net, params, state, opt, jnp.asarray(x), jnp.asarray(y))


def _flax():
    from scripts.bench.references import flax_models

    return flax_models.lenet_step()


def _equinox():
    from scripts.bench.references import equinox_models

    return equinox_models.lenet_step()


def _torch():
    from scripts.bench.references import torch_models

    return torch_models.lenet_step(False)


def _torch_compile():
    from scripts.bench.references import torch_models

    return torch_models.lenet_step(True)


def _flops():
    from scripts.bench.references import flax_models

    return flax_models.classifier_flops("lenet")


_impls = {} if _PENDING else {"fdl": _fdl, "fdl (xla)": common.xla_kernels(_fdl)}
_impls.update({"Flax linen": _flax, "Equinox": _equinox, "PyTorch eager": _torch,
               "torch.compile": _torch_compile})

WORKLOADS = [
    Workload(
        name="lenet5_bn",
        description=(
            "LeNet-5 + BatchNorm (d2l's BN LeNet: conv(6,5)-BN-sigmoid-avgpool2-conv(16,5)-BN-"
            "sigmoid-avgpool2-dense120-BN-sigmoid-dense84-BN-sigmoid-dense10), input 1x28x28, "
            "batch 256, float32, softmax cross-entropy, SGD lr 0.1 momentum 0.9, BN in train mode "
            "(momentum 0.1). Layout: NHWC for fdl/Flax, per-example CHW under vmap for Equinox, "
            "NCHW for PyTorch. One training step (forward, backward, update) on a fixed batch."
        ),
        impls=_impls,
        flops_fn=_flops,
        flops_note="XLA HLO cost analysis of the Flax training step",
        pending=_PENDING,
        quick_steps=20,
        steps=50,
    )
]
