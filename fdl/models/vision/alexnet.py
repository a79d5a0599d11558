"""AlexNet (d2l chapter 8.1) in the book's form, torchvision's form, and a small-input
variant for 28x28 / 32x32 images."""

from __future__ import annotations

from collections.abc import Sequence

from fdl import nn
from fdl.models.vision._common import classifier, scaled
from fdl.nn.core import Layer

__all__ = ["alexnet", "alexnet_torchvision"]

BOOK_CHANNELS = (96, 256, 384, 384, 256)
TORCHVISION_CHANNELS = (64, 192, 384, 256, 256)


def _fc_block(fc_features: int, dropout: float, dropout_first: bool):
    """fc1 -> relu -> dropout -> fc2 -> relu -> dropout (book) or dropout before each fc
    (torchvision)."""
    layers = []
    for i in (1, 2):
        if dropout_first:
            layers.append((f"drop{i}", nn.dropout(dropout)))
        layers += [(f"fc{i}", nn.dense(fc_features)), (f"act_fc{i}", nn.relu())]
        if not dropout_first:
            layers.append((f"drop{i}", nn.dropout(dropout)))
    return layers


def alexnet(
    num_classes: int = 1000,
    in_channels: int = 3,
    *,
    channels: Sequence[int] = BOOK_CHANNELS,
    width: float = 1.0,
    fc_features: int = 4096,
    dropout: float = 0.5,
    small_input: bool = False,
    first_padding: int = 1,
    pool_to: int | None = None,
    dropout_first: bool = False,
) -> Layer:
    """AlexNet: ``(N, 224, 224, C)`` (or ``(N, 32, 32, C)`` with ``small_input``) -> logits.

    Features: ``conv1 11x11/4 -> relu -> pool1 3x3/2 -> conv2 5x5 pad 2 -> relu -> pool2 ->
    conv3, conv4, conv5 3x3 pad 1 (relu) -> pool3 -> [adaptive pool to pool_to] -> flatten ->
    fc1 -> relu -> dropout -> fc2 -> relu -> dropout``; head: ``dense(num_classes)``.
    ``channels`` are the five conv widths (the book's 96..256; torchvision's via
    :func:`alexnet_torchvision`), multiplied by ``width``. ``small_input=True`` makes conv1 a
    3x3 stride-1 conv (pad 1), so 28x28..64x64 inputs work. The smallest input for the
    ImageNet form is 65x65 (``first_padding=1``): smaller inputs fail at ``init`` naming the
    layer whose output size reaches zero.
    """
    ch = [scaled(c, width) for c in channels]
    if len(ch) != 5:
        raise ValueError(f"alexnet: channels must have 5 entries, got {channels!r}")
    if small_input:
        conv1 = nn.conv2d(ch[0], 3, padding=1)
    else:
        conv1 = nn.conv2d(ch[0], 11, stride=4, padding=first_padding)
    feats = [
        ("conv1", conv1), ("act1", nn.relu()), ("pool1", nn.max_pool2d(3, stride=2)),
        ("conv2", nn.conv2d(ch[1], 5, padding=2)), ("act2", nn.relu()),
        ("pool2", nn.max_pool2d(3, stride=2)),
        ("conv3", nn.conv2d(ch[2], 3, padding=1)), ("act3", nn.relu()),
        ("conv4", nn.conv2d(ch[3], 3, padding=1)), ("act4", nn.relu()),
        ("conv5", nn.conv2d(ch[4], 3, padding=1)), ("act5", nn.relu()),
        ("pool3", nn.max_pool2d(3, stride=2)),
    ]
    if pool_to is not None:
        feats.append(("avgpool", nn.adaptive_avg_pool2d(pool_to)))
    feats.append(("flatten", nn.flatten()))
    feats += _fc_block(fc_features, dropout, dropout_first)
    return classifier(
        "alexnet", nn.serial(*feats), nn.dense(num_classes),
        in_channels=in_channels, input_size=(32, 32) if small_input else (224, 224),
        num_classes=num_classes, channels=tuple(ch), fc_features=fc_features,
        small_input=small_input,
    )


def alexnet_torchvision(num_classes: int = 1000, in_channels: int = 3, *,
                        fc_features: int = 4096) -> Layer:
    """torchvision's ``alexnet`` layout: channels 64-192-384-256-256, conv1 padding 2,
    adaptive average pool to 6x6, dropout before fc1/fc2 (load its weights with
    :func:`fdl.interop.torchvision.from_torchvision`)."""
    return alexnet(num_classes, in_channels, channels=TORCHVISION_CHANNELS, first_padding=2,
                   pool_to=6, dropout_first=True, fc_features=fc_features)
