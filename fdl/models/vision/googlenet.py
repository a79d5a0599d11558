"""GoogLeNet (d2l chapter 8.4): Inception blocks with four parallel paths; and torchvision's
GoogLeNet (BatchNorm, ceil-mode pools) for its weights."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from fdl import nn
from fdl.models.vision._common import classifier, scaled
from fdl.nn.core import Layer


def _conv(*args, **kw):
    """conv2d with He-normal init (PyTorch's default init shrinks the signal by ~sqrt(6) per
    ReLU layer; these BatchNorm-free nets then do not train)."""
    return nn.conv2d(*args, w_init=nn.initializers.kaiming_normal(), **kw)


__all__ = ["googlenet", "inception", "googlenet_torchvision", "inception_bn"]


def inception(c1: int, c2: Sequence[int], c3: Sequence[int], c4: int) -> Layer:
    """Inception block: four paths concatenated along channels (``c1 + c2[1] + c3[1] + c4``).

    ``p1``: 1x1 conv ``c1``; ``p2``: 1x1 ``c2[0]`` -> 3x3 ``c2[1]``; ``p3``: 1x1 ``c3[0]`` ->
    5x5 ``c3[1]``; ``p4``: 3x3 max-pool (stride 1) -> 1x1 ``c4``; every conv followed by ReLU.
    Spatial size is preserved.
    """
    relu = nn.relu
    return nn.parallel(
        ("p1", nn.serial(("conv", _conv(c1, 1)), ("act", relu()))),
        ("p2", nn.serial(("conv1", _conv(c2[0], 1)), ("act1", relu()),
                         ("conv2", _conv(c2[1], 3, padding=1)), ("act2", relu()))),
        ("p3", nn.serial(("conv1", _conv(c3[0], 1)), ("act1", relu()),
                         ("conv2", _conv(c3[1], 5, padding=2)), ("act2", relu()))),
        ("p4", nn.serial(("pool", nn.max_pool2d(3, stride=1, padding=1)),
                         ("conv", _conv(c4, 1)), ("act", relu()))),
        combine="concat",
    )


_B3 = ((64, (96, 128), (16, 32), 32), (128, (128, 192), (32, 96), 64))
_B4 = ((192, (96, 208), (16, 48), 64), (160, (112, 224), (24, 64), 64),
       (128, (128, 256), (24, 64), 64), (112, (144, 288), (32, 64), 64),
       (256, (160, 320), (32, 128), 128))
_B5 = ((256, (160, 320), (32, 128), 128), (384, (192, 384), (48, 128), 128))


def googlenet(
    num_classes: int = 10,
    in_channels: int = 1,
    *,
    width: float = 1.0,
    small_input: bool = False,
) -> Layer:
    """GoogLeNet: ``(N, 96, 96, C)`` (the book; 224 works too) -> logits.

    Features: ``b1`` (7x7/2 conv 64 -> relu -> 3x3/2 max-pool), ``b2`` (1x1 64 -> 3x3 192 ->
    pool), ``b3`` (2 Inception blocks -> pool), ``b4`` (5 -> pool), ``b5`` (2 -> global
    average pool): output ``(N, 1024 * width)``. Head: ``dense(num_classes)``. ``width``
    scales every channel count; ``small_input=True`` makes b1 a 3x3 stride-1 conv without the
    pool (for 28x28 / 32x32 inputs). Params ``features/b3/inc1/p2/conv2/w``, ...
    """
    s = lambda c: scaled(c, width)

    def inc(cfg):
        c1, c2, c3, c4 = cfg
        return inception(s(c1), (s(c2[0]), s(c2[1])), (s(c3[0]), s(c3[1])), s(c4))

    if small_input:
        b1 = nn.serial(("conv", _conv(s(64), 3, padding=1)), ("act", nn.relu()))
    else:
        b1 = nn.serial(("conv", _conv(s(64), 7, stride=2, padding=3)), ("act", nn.relu()),
                       ("pool", nn.max_pool2d(3, stride=2, padding=1)))
    b2 = nn.serial(("conv1", _conv(s(64), 1)), ("act1", nn.relu()),
                   ("conv2", _conv(s(192), 3, padding=1)), ("act2", nn.relu()),
                   ("pool", nn.max_pool2d(3, stride=2, padding=1)))
    b3 = nn.serial(*[(f"inc{i}", inc(c)) for i, c in enumerate(_B3, 1)],
                   ("pool", nn.max_pool2d(3, stride=2, padding=1)))
    b4 = nn.serial(*[(f"inc{i}", inc(c)) for i, c in enumerate(_B4, 1)],
                   ("pool", nn.max_pool2d(3, stride=2, padding=1)))
    b5 = nn.serial(*[(f"inc{i}", inc(c)) for i, c in enumerate(_B5, 1)],
                   ("pool", nn.global_avg_pool2d()))
    feats = nn.serial(("b1", b1), ("b2", b2), ("b3", b3), ("b4", b4), ("b5", b5))
    return classifier(
        "googlenet", feats, nn.dense(num_classes), in_channels=in_channels,
        input_size=(32, 32) if small_input else (96, 96), num_classes=num_classes,
        width=width, small_input=small_input,
    )


# ----------------------------------------------------------------------------- torchvision's


def _basic(out: int, k: int, *, stride: int = 1, padding: int = 0) -> Layer:
    """torchvision's ``BasicConv2d``: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""
    return nn.serial(("conv", nn.conv2d(out, k, stride=stride, padding=padding, use_bias=False)),
                     ("bn", nn.batch_norm(eps=1e-3)), ("act", nn.relu()))


def inception_bn(c1: int, c2: Sequence[int], c3: Sequence[int], c4: int) -> Layer:
    """torchvision's Inception block: ``branch1`` 1x1; ``branch2`` 1x1 -> 3x3; ``branch3`` 1x1
    -> 3x3 (torchvision's 3x3 where the paper has 5x5, kept for its weights); ``branch4`` 3x3/1
    max-pool -> 1x1; each conv a :func:`_basic` conv-BN-ReLU; concatenated along channels."""
    return nn.parallel(
        ("branch1", _basic(c1, 1)),
        ("branch2", nn.serial(("0", _basic(c2[0], 1)), ("1", _basic(c2[1], 3, padding=1)))),
        ("branch3", nn.serial(("0", _basic(c3[0], 1)), ("1", _basic(c3[1], 3, padding=1)))),
        ("branch4", nn.serial(("0", nn.max_pool2d(3, stride=1, padding=1, ceil_mode=True)),
                              ("1", _basic(c4, 1)))),
        combine="concat",
    )


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def googlenet_torchvision(num_classes: int = 1000, in_channels: int = 3, *,
                          transform_input: bool = False, dropout: float = 0.2) -> Layer:
    """GoogLeNet as torchvision builds it (``torchvision.models.googlenet``, without the
    auxiliary classifiers, which only its training uses): BatchNorm after every convolution,
    ``ceil_mode`` max-pools, 3x3 convolutions in the third branch. ``(N, 224, 224, 3)`` ->
    logits.

    Features: ``conv1`` 7x7/2 64, ``maxpool1`` 3x3/2, ``conv2`` 1x1 64, ``conv3`` 3x3 192,
    ``maxpool2``, ``inception3a/3b``, ``maxpool3``, ``inception4a..4e``, ``maxpool4`` 2x2/2,
    ``inception5a/5b``, global average pool, dropout: ``(N, 1024)``; head ``dense`` (``fc``).
    ``transform_input=True`` (torchvision's pretrained weights expect it) re-normalises
    ImageNet-normalised input from the ImageNet mean/std to mean 0.5, std 0.5 per channel.
    """
    pool = lambda k=3: nn.max_pool2d(k, stride=2, ceil_mode=True)  # noqa: E731
    feats = []
    if transform_input:
        mean = jnp.asarray(_IMAGENET_MEAN, jnp.float32)
        std = jnp.asarray(_IMAGENET_STD, jnp.float32)
        feats.append(("transform_input", nn.lambda_layer(
            lambda x: x * (std / 0.5).astype(x.dtype) + ((mean - 0.5) / 0.5).astype(x.dtype),
            name="transform_input", shape_fn=lambda s: s)))
    feats += [("conv1", _basic(64, 7, stride=2, padding=3)), ("maxpool1", pool()),
              ("conv2", _basic(64, 1)), ("conv3", _basic(192, 3, padding=1)),
              ("maxpool2", pool())]
    names = {3: ("3a", "3b"), 4: ("4a", "4b", "4c", "4d", "4e"), 5: ("5a", "5b")}
    for stage, cfgs in ((3, _B3), (4, _B4), (5, _B5)):
        for nm, (c1, c2, c3, c4) in zip(names[stage], cfgs, strict=True):
            feats.append((f"inception{nm}", inception_bn(c1, c2, c3, c4)))
        if stage == 3:
            feats.append(("maxpool3", pool()))
        elif stage == 4:
            feats.append(("maxpool4", pool(2)))
    feats += [("avgpool", nn.global_avg_pool2d()), ("dropout", nn.dropout(dropout))]
    return classifier(
        "googlenet", nn.serial(*feats), nn.dense(num_classes), in_channels=in_channels,
        input_size=(224, 224), num_classes=num_classes, transform_input=transform_input,
    )
