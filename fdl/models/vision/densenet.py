"""DenseNet (d2l chapter 8.7): dense blocks and transition layers; DenseNet-121 in
torchvision's layout and the book's small DenseNet.

Paths follow torchvision: ``features/conv0``, ``features/denseblock1/denselayer1/{norm1,
conv1, norm2, conv2}``, ``features/transition1/{norm, conv}``, ``features/norm5``, ``head``
(``classifier``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from fdl import nn
from fdl.models.vision._common import classifier, flat_block
from fdl.nn.core import Layer

__all__ = ["dense_layer", "dense_block", "transition", "densenet", "densenet121", "densenet161",
           "densenet169", "densenet201", "densenet_book"]


def dense_layer(growth_rate: int, bn_size: int | None = 4) -> Layer:
    """``concat([x, f(x)], channels)``: ``f`` = BN -> ReLU -> 1x1 conv (``bn_size *
    growth_rate``) -> BN -> ReLU -> 3x3 conv (``growth_rate``) (DenseNet-B, torchvision), or
    with ``bn_size=None`` BN -> ReLU -> 3x3 conv (the book's ``conv_block``). Output channels
    ``C + growth_rate``. Params ``{norm1, conv1, [norm2, conv2]}``."""
    if bn_size:
        body = nn.serial(
            ("norm1", nn.batch_norm()), ("relu1", nn.relu()),
            ("conv1", nn.conv2d(bn_size * growth_rate, 1, use_bias=False)),
            ("norm2", nn.batch_norm()), ("relu2", nn.relu()),
            ("conv2", nn.conv2d(growth_rate, 3, padding=1, use_bias=False)),
        )
    else:
        body = nn.serial(
            ("norm1", nn.batch_norm()), ("relu1", nn.relu()),
            ("conv1", nn.conv2d(growth_rate, 3, padding=1, use_bias=False)),
        )
    return flat_block("dense_layer", body, (),
                      lambda x, y, _: jnp.concatenate([x, y.astype(x.dtype)], axis=-1))


def dense_block(num_layers: int, growth_rate: int, bn_size: int | None = 4) -> Layer:
    """``num_layers`` dense layers (``denselayer1``, ...): adds ``num_layers * growth_rate``
    channels."""
    return nn.serial(*[(f"denselayer{i}", dense_layer(growth_rate, bn_size))
                       for i in range(1, num_layers + 1)])


def transition(out_channels: int) -> Layer:
    """BN -> ReLU -> 1x1 conv (``out_channels``) -> 2x2 average pool. Params ``{norm, conv}``."""
    return nn.serial(("norm", nn.batch_norm()), ("relu", nn.relu()),
                     ("conv", nn.conv2d(out_channels, 1, use_bias=False)),
                     ("pool", nn.avg_pool2d(2, stride=2)))


def densenet(
    block_config: Sequence[int] = (6, 12, 24, 16),
    num_classes: int = 1000,
    in_channels: int = 3,
    *,
    growth_rate: int = 32,
    num_init_features: int = 64,
    bn_size: int | None = 4,
    compression: float = 0.5,
    small_input: bool = False,
) -> Layer:
    """DenseNet: ``(N, 224, 224, C)`` (the book: 96x96; ``small_input``: 32x32) -> logits.

    Features: ``conv0`` 7x7/2 -> ``norm0`` -> relu -> ``pool0`` 3x3/2 pad 1
    (``small_input``: 3x3/1 conv, no pool), dense blocks with a transition (channels x
    ``compression``, 2x2 average pool) between consecutive blocks, ``norm5`` -> relu ->
    global average pool. Head: ``dense(num_classes)`` (torchvision's ``classifier``).
    """
    if small_input:
        stem = [("conv0", nn.conv2d(num_init_features, 3, padding=1, use_bias=False))]
    else:
        stem = [("conv0", nn.conv2d(num_init_features, 7, stride=2, padding=3, use_bias=False))]
    stem += [("norm0", nn.batch_norm()), ("relu0", nn.relu())]
    if not small_input:
        stem.append(("pool0", nn.max_pool2d(3, stride=2, padding=1)))
    layers = list(stem)
    c = num_init_features
    for i, n in enumerate(block_config, 1):
        layers.append((f"denseblock{i}", dense_block(n, growth_rate, bn_size)))
        c += n * growth_rate
        if i != len(block_config):
            c = int(c * compression)
            layers.append((f"transition{i}", transition(c)))
    layers += [("norm5", nn.batch_norm()), ("relu5", nn.relu()),
               ("avgpool", nn.global_avg_pool2d())]
    return classifier(
        "densenet", nn.serial(*layers), nn.dense(num_classes), in_channels=in_channels,
        input_size=(32, 32) if small_input else (224, 224), num_classes=num_classes,
        block_config=tuple(block_config), growth_rate=growth_rate,
        num_init_features=num_init_features, bn_size=bn_size, small_input=small_input,
    )


def densenet121(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """DenseNet-121 (torchvision layout: blocks (6, 12, 24, 16), growth 32, bn_size 4)."""
    return densenet((6, 12, 24, 16), num_classes, in_channels, **kw)


def densenet161(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """DenseNet-161 (torchvision: blocks (6, 12, 36, 24), growth 48, 96 initial features)."""
    return densenet((6, 12, 36, 24), num_classes, in_channels, growth_rate=48,
                    num_init_features=96, **kw)


def densenet169(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """DenseNet-169 (torchvision: blocks (6, 12, 32, 32), growth 32)."""
    return densenet((6, 12, 32, 32), num_classes, in_channels, **kw)


def densenet201(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """DenseNet-201 (torchvision: blocks (6, 12, 48, 32), growth 32)."""
    return densenet((6, 12, 48, 32), num_classes, in_channels, **kw)


def densenet_book(num_classes: int = 10, in_channels: int = 1, *, growth_rate: int = 32,
                  num_init_features: int = 64, block_config: Sequence[int] = (4, 4, 4, 4),
                  small_input: bool = False) -> Layer:
    """The book's DenseNet: 4 blocks of 4 BN-ReLU-3x3-conv layers (no bottleneck), growth
    32, 96x96 input (``small_input=True`` for 32x32)."""
    return densenet(block_config, num_classes, in_channels, growth_rate=growth_rate,
                    num_init_features=num_init_features, bn_size=None,
                    small_input=small_input)
