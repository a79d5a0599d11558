"""Network in Network (d2l chapter 8.3): 1x1 convolutions and global average pooling."""

from __future__ import annotations

from fdl import nn
from fdl.models.vision._common import classifier, scaled
from fdl.nn.core import Layer


def _conv(*args, **kw):
    """conv2d with He-normal init (PyTorch's default init shrinks the signal by ~sqrt(6) per
    ReLU layer; these BatchNorm-free nets then do not train)."""
    return nn.conv2d(*args, w_init=nn.initializers.kaiming_normal(), **kw)


__all__ = ["nin", "nin_block"]


def nin_block(out_channels: int, kernel_size: int, stride: int, padding: int) -> Layer:
    """``conv kxk -> relu -> conv 1x1 -> relu -> conv 1x1 -> relu``; params
    ``{conv1, conv2, conv3}``."""
    return nn.serial(
        ("conv1", _conv(out_channels, kernel_size, stride=stride, padding=padding)),
        ("act1", nn.relu()),
        ("conv2", _conv(out_channels, 1)), ("act2", nn.relu()),
        ("conv3", _conv(out_channels, 1)), ("act3", nn.relu()),
    )


def nin(
    num_classes: int = 10,
    in_channels: int = 1,
    *,
    width: float = 1.0,
    dropout: float = 0.5,
    small_input: bool = False,
) -> Layer:
    """NiN: ``(N, 224, 224, C)`` (``small_input``: ``(N, 32, 32, C)``) -> logits.

    Features: ``block1 (96, 11x11/4) -> pool 3x3/2 -> block2 (256, 5x5 pad 2) -> pool ->
    block3 (384, 3x3 pad 1) -> pool -> dropout``; head: ``nin_block(num_classes, 3x3 pad 1) ->
    global average pool`` (no dense layer; replace the head with any layer mapping
    ``(N, h, w, 384)`` to logits). ``small_input`` makes block1 a 3x3 stride-1 conv.
    """
    c = [scaled(v, width) for v in (96, 256, 384)]
    first = nin_block(c[0], 3, 1, 1) if small_input else nin_block(c[0], 11, 4, 0)
    feats = nn.serial(
        ("block1", first), ("pool1", nn.max_pool2d(3, stride=2)),
        ("block2", nin_block(c[1], 5, 1, 2)), ("pool2", nn.max_pool2d(3, stride=2)),
        ("block3", nin_block(c[2], 3, 1, 1)), ("pool3", nn.max_pool2d(3, stride=2)),
        ("dropout", nn.dropout(dropout)),
    )
    head = nn.serial(("block", nin_block(num_classes, 3, 1, 1)),
                     ("pool", nn.global_avg_pool2d()))
    return classifier(
        "nin", feats, head, in_channels=in_channels,
        input_size=(32, 32) if small_input else (224, 224), num_classes=num_classes,
        width=width, small_input=small_input,
    )
