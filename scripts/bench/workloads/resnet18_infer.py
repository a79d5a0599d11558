"""ImageNet ResNet-18 inference (eval mode) on 3x224x224, batch 1 and batch 64.

Architecture (the same for every implementation, torchvision's ``resnet18``): conv7x7/2(64,
no bias)-BN-ReLU-maxpool3x3/2 stem, BasicBlock stages [2, 2, 2, 2] with 64/128/256/512
channels (1x1-conv+BN projection shortcuts), global average pool, dense 1000. BatchNorm uses its
running statistics; no gradient. One forward pass on a fixed batch returning the logits.
Issue 8's goal: fdl <= 1.0x PyTorch eager.
"""

from __future__ import annotations

import numpy as np

from scripts.bench import common
from scripts.bench.api import Workload

_PENDING = None
try:
    from fdl.models.vision import resnet18 as _fdl_resnet18
except Exception as e:  # noqa: BLE001
    _PENDING = f"fdl capability missing: {type(e).__name__}: {e}"

SIZE, CLASSES = 224, 1000


def _batch(batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, SIZE, SIZE, 3)).astype(np.float32)


def _fdl(batch: int):
    def build():
        import jax
        import jax.numpy as jnp

        net = _fdl_resnet18(num_classes=CLASSES)
        x = jnp.asarray(_batch(batch))
        _, params, state = net.init(jax.random.key(0), x.shape)

        @jax.jit
        def forward(params, state, x):
            return net.apply(params, state, x, train=False)[0]

        def step():
            return forward(params, state, x).block_until_ready()

        return step

    return build


def _flax_model():
    from scripts.bench.references.flax_models import ResNet18

    return ResNet18(num_classes=CLASSES, imagenet_stem=True)


def _flax(batch: int):
    def build():
        import jax
        import jax.numpy as jnp

        model = _flax_model()
        x = jnp.asarray(_batch(batch))
        variables = model.init(jax.random.key(0), x, train=False)
        forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

        def step():
            return forward(variables, x).block_until_ready()

        return step

    return build


def _torch(batch: int, compile_model: bool):
    def build():
        import torch

        from scripts.bench import common
        from scripts.bench.references.torch_models import ResNet18

        torch.manual_seed(0)
        model = ResNet18(CLASSES, imagenet_stem=True).eval()
        fwd = torch.compile(model) if compile_model else model
        x = torch.from_numpy(common.nchw(_batch(batch)))

        def step():
            with torch.inference_mode():
                return fwd(x)

        return step

    return build


def _flops(batch: int):
    def count() -> float:
        import jax
        import jax.numpy as jnp

        from scripts.bench import common

        model = _flax_model()
        x = jnp.zeros((batch, SIZE, SIZE, 3), jnp.float32)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        return common.xla_flops(lambda v, x: model.apply(v, x, train=False), variables, x)

    return count


def _workload(batch: int) -> Workload:
    impls = {} if _PENDING else {"fdl": _fdl(batch),
                                 "fdl (xla)": common.xla_kernels(_fdl(batch))}
    impls.update({"Flax linen": _flax(batch), "PyTorch eager": _torch(batch, False)})
    if batch == 1:  # at batch 64 a step takes seconds: the goal's reference (eager) only
        impls["torch.compile"] = _torch(batch, True)
    return Workload(
        name=f"resnet18_224_infer_b{batch}",
        description=(
            f"ImageNet ResNet-18 (torchvision's architecture, 1000 classes) inference in eval "
            f"mode, input 3x224x224, batch {batch}, float32. Layout: NHWC for fdl/Flax, NCHW "
            "for PyTorch (under `torch.inference_mode()`). One forward pass on a fixed batch."
        ),
        impls=impls,
        flops_fn=_flops(batch),
        flops_note="XLA HLO cost analysis of the Flax forward pass (fdl's oneDNN custom "
                   "calls are opaque to it)",
        pending=_PENDING,
        quick_steps=20,
        steps=40 if batch == 1 else 20,
        extra={"examples_per_step": batch},
    )


WORKLOADS = [_workload(1), _workload(64)]
