"""VGG from an architecture spec (d2l chapter 8.2): VGG-11/13/16/19 (``batch_norm=True``:
torchvision's ``vgg*_bn``) and the book's channel-reduced variant."""

from __future__ import annotations

from collections.abc import Sequence

from fdl import nn
from fdl.models.vision._common import classifier, scaled
from fdl.nn.core import Layer

__all__ = ["vgg", "vgg_block", "vgg11", "vgg13", "vgg16", "vgg19", "VGG11_ARCH", "VGG13_ARCH",
           "VGG16_ARCH", "VGG19_ARCH"]

VGG11_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
VGG13_ARCH = ((2, 64), (2, 128), (2, 256), (2, 512), (2, 512))
VGG16_ARCH = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
VGG19_ARCH = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))


def vgg_block(num_convs: int, out_channels: int, *, batch_norm: bool = False) -> Layer:
    """``num_convs`` x (3x3 conv pad 1 [-> BN] -> ReLU) -> 2x2 max-pool. Params
    ``{conv1, [bn1,] conv2, ...}``; halves H and W."""
    layers = []
    for i in range(1, num_convs + 1):
        layers.append((f"conv{i}", nn.conv2d(out_channels, 3, padding=1)))
        if batch_norm:
            layers.append((f"bn{i}", nn.batch_norm()))
        layers.append((f"act{i}", nn.relu()))
    layers.append(("pool", nn.max_pool2d(2, stride=2)))
    return nn.serial(*layers)


def vgg(
    arch: Sequence[tuple[int, int]] = VGG11_ARCH,
    num_classes: int = 1000,
    in_channels: int = 3,
    *,
    width: float = 1.0,
    fc_features: int = 4096,
    dropout: float = 0.5,
    batch_norm: bool = False,
    pool_to: int | None = 7,
) -> Layer:
    """VGG: ``arch`` is a sequence of ``(num_convs, out_channels)`` blocks (each halves H, W).

    Features: ``block1..blockN`` (:func:`vgg_block`) -> [adaptive average pool to
    ``pool_to`` x ``pool_to``, torchvision's; an identity for 224x224 input] -> flatten ->
    fc1 -> relu -> dropout -> fc2 -> relu -> dropout; head ``dense(num_classes)``.
    ``width`` multiplies every block's channels (the book's small VGG is ``width=1/4``).
    Input: 224x224 documented; any size >= 2**len(arch) works (``pool_to=None`` makes the
    fc1 width depend on the input size). Params: ``features/block1/conv1/w``, ...
    """
    arch = tuple((int(n), int(c)) for n, c in arch)
    feats = [
        (f"block{i}", vgg_block(n, scaled(c, width), batch_norm=batch_norm))
        for i, (n, c) in enumerate(arch, 1)
    ]
    if pool_to is not None:
        feats.append(("avgpool", nn.adaptive_avg_pool2d(pool_to)))
    feats += [
        ("flatten", nn.flatten()),
        ("fc1", nn.dense(fc_features)), ("act_fc1", nn.relu()), ("drop1", nn.dropout(dropout)),
        ("fc2", nn.dense(fc_features)), ("act_fc2", nn.relu()), ("drop2", nn.dropout(dropout)),
    ]
    return classifier(
        "vgg", nn.serial(*feats), nn.dense(num_classes),
        in_channels=in_channels, input_size=(224, 224), num_classes=num_classes, arch=arch,
        width=width, fc_features=fc_features, batch_norm=batch_norm, pool_to=pool_to,
    )


def vgg11(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """VGG-11 (torchvision's ``vgg11`` layout with the defaults)."""
    return vgg(VGG11_ARCH, num_classes, in_channels, **kw)


def vgg13(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """VGG-13 (torchvision's ``vgg13`` layout with the defaults)."""
    return vgg(VGG13_ARCH, num_classes, in_channels, **kw)


def vgg16(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """VGG-16 (torchvision's ``vgg16`` layout with the defaults)."""
    return vgg(VGG16_ARCH, num_classes, in_channels, **kw)


def vgg19(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """VGG-19 (torchvision's ``vgg19`` layout with the defaults)."""
    return vgg(VGG19_ARCH, num_classes, in_channels, **kw)
