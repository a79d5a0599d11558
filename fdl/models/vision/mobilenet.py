"""MobileNet v1 (depthwise separable convolutions) and v2 (inverted residuals, linear
bottlenecks)."""

from __future__ import annotations

from fdl import nn
from fdl.models.vision._common import classifier, conv_bn_act, flat_block, relu6, scaled
from fdl.nn.core import Layer

__all__ = ["depthwise_separable", "inverted_residual", "mobilenet_v1", "mobilenet_v2"]

_V1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
       (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
       (6, 160, 3, 2), (6, 320, 1, 1))


def depthwise_separable(in_channels: int, out_channels: int, stride: int = 1) -> Layer:
    """3x3 depthwise conv (``groups=in_channels``, stride) -> BN -> ReLU -> 1x1 pointwise ->
    BN -> ReLU. Params ``{dw: {conv, bn}, pw: {conv, bn}}``."""
    return nn.serial(
        ("dw", conv_bn_act(in_channels, 3, stride=stride, padding=1, groups=in_channels,
                           act=nn.relu())),
        ("pw", conv_bn_act(out_channels, 1, act=nn.relu())),
    )


def inverted_residual(in_channels: int, out_channels: int, stride: int, expand: int) -> Layer:
    """MobileNet v2 block: [1x1 expand (``in * expand``) -> BN -> ReLU6] -> 3x3 depthwise
    (stride) -> BN -> ReLU6 -> 1x1 project -> BN (linear); plus ``x`` when ``stride == 1`` and
    ``in == out``. Params ``{[expand,] dw, project}`` (each ``{conv, bn}``)."""
    hidden = in_channels * expand
    layers = []
    if expand != 1:
        layers.append(("expand", conv_bn_act(hidden, 1, act=relu6())))
    layers += [
        ("dw", conv_bn_act(hidden, 3, stride=stride, padding=1, groups=hidden, act=relu6())),
        ("project", conv_bn_act(out_channels, 1)),
    ]
    body = nn.serial(*layers)
    if stride == 1 and in_channels == out_channels:
        return flat_block("inverted_residual", body, (), lambda x, y, _: x + y)
    return body


def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3, *, width: float = 1.0,
                 small_input: bool = False, dropout: float = 0.0) -> Layer:
    """MobileNet v1: ``(N, 224, 224, C)`` -> logits. Stem 3x3/2 conv (32 x ``width``), 13
    depthwise-separable blocks, global average pool; head ``[dropout ->] dense``.
    ``small_input`` makes the stem stride 1 (32x32 inputs)."""
    c = scaled(32, width)
    layers = [("stem", conv_bn_act(c, 3, stride=1 if small_input else 2, padding=1,
                                   act=nn.relu()))]
    for i, (out, s) in enumerate(_V1, 1):
        o = scaled(out, width)
        layers.append((f"block{i}", depthwise_separable(c, o, s)))
        c = o
    layers.append(("avgpool", nn.global_avg_pool2d()))
    head = nn.serial(("dropout", nn.dropout(dropout)), ("fc", nn.dense(num_classes)))
    return classifier(
        "mobilenet_v1", nn.serial(*layers), head, in_channels=in_channels,
        input_size=(32, 32) if small_input else (224, 224), num_classes=num_classes,
        width=width, small_input=small_input,
    )


def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, *, width: float = 1.0,
                 small_input: bool = False, dropout: float = 0.2) -> Layer:
    """MobileNet v2: ``(N, 224, 224, C)`` -> logits. Stem 3x3/2 conv 32, inverted residual
    blocks ``(t, c, n, s)`` = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1)
    (6,160,3,2) (6,320,1,1), 1x1 conv 1280 (``last``), global average pool; head ``dropout ->
    dense``. ``small_input``: stem stride 1 and the (6,24,2,2) stage at stride 1 (32x32)."""
    c = scaled(32, width)
    layers = [("stem", conv_bn_act(c, 3, stride=1 if small_input else 2, padding=1,
                                   act=relu6()))]
    idx = 1
    for t, out, n, s in _V2:
        o = scaled(out, width)
        if small_input and out == 24:
            s = 1
        for j in range(n):
            layers.append((f"block{idx}", inverted_residual(c, o, s if j == 0 else 1, t)))
            c = o
            idx += 1
    last = max(1280, scaled(1280, width)) if width > 1.0 else 1280
    layers += [("last", conv_bn_act(last, 1, act=relu6())), ("avgpool", nn.global_avg_pool2d())]
    head = nn.serial(("dropout", nn.dropout(dropout)), ("fc", nn.dense(num_classes)))
    return classifier(
        "mobilenet_v2", nn.serial(*layers), head, in_channels=in_channels,
        input_size=(32, 32) if small_input else (224, 224), num_classes=num_classes,
        width=width, small_input=small_input,
    )
