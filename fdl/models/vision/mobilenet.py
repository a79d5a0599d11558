"""MobileNet v1 (depthwise separable convolutions), v2 (inverted residuals, linear
bottlenecks) and v3 (hard swish, squeeze-and-excitation; Large and Small)."""

from __future__ import annotations

from fdl import nn
from fdl.models.vision._common import classifier, conv_bn_act, flat_block, relu6, scaled
from fdl.nn.core import Layer

__all__ = ["depthwise_separable", "inverted_residual", "mobilenet_v1", "mobilenet_v2",
           "inverted_residual_v3", "squeeze_excite", "make_divisible", "mobilenet_v3_large",
           "mobilenet_v3_small"]

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


# ----------------------------------------------------------------------------- MobileNet v3

# (kernel, expanded, out, use_se, activation, stride) per block, torchvision's tables
_V3_LARGE = ((3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2),
             (3, 72, 24, False, "RE", 1), (5, 72, 40, True, "RE", 2),
             (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
             (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1),
             (3, 184, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
             (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
             (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1),
             (5, 960, 160, True, "HS", 1))
_V3_SMALL = ((3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2),
             (3, 88, 24, False, "RE", 1), (5, 96, 40, True, "HS", 2),
             (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
             (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1),
             (5, 288, 96, True, "HS", 2), (5, 576, 96, True, "HS", 1),
             (5, 576, 96, True, "HS", 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor`` to ``v``, at least ``divisor`` and not below 90% of
    ``v`` (the channel rounding of the MobileNet papers and torchvision)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def squeeze_excite(channels: int, squeeze: int) -> Layer:
    """MobileNet v3's squeeze-and-excitation: ``x * hard_sigmoid(fc2(relu(fc1(mean_hw(x)))))``.
    Params ``{fc1: {w: (C, squeeze), b}, fc2: {w: (squeeze, C), b}}`` (torchvision's 1x1
    convolutions ``fc1``/``fc2``, as dense layers)."""
    gate = nn.serial(("pool", nn.global_avg_pool2d()), ("fc1", nn.dense(squeeze)), nn.relu(),
                     ("fc2", nn.dense(channels)), nn.hard_sigmoid())
    return flat_block("squeeze_excite", gate, (), lambda x, g, _: x * g[:, None, None, :])


def _cba(out, k, *, stride=1, groups=1, act=None) -> Layer:
    """conv (no bias, padding (k-1)/2) -> BatchNorm (eps 1e-3, PyTorch momentum 0.01) [-> act]."""
    layers = [("conv", nn.conv2d(out, k, stride=stride, padding=(k - 1) // 2, groups=groups,
                                 use_bias=False)),
              ("bn", nn.batch_norm(eps=1e-3, decay=0.99))]
    if act is not None:
        layers.append(("act", act))
    return nn.serial(*layers)


def inverted_residual_v3(in_channels: int, kernel: int, expanded: int, out_channels: int,
                         use_se: bool, activation: str, stride: int) -> Layer:
    """MobileNet v3 block: [1x1 expand -> BN -> act] -> k x k depthwise (stride) -> BN -> act
    [-> squeeze-excite] -> 1x1 project -> BN; plus ``x`` when ``stride == 1`` and ``in ==
    out``. ``activation``: ``"RE"`` (ReLU) or ``"HS"`` (hard swish). Params
    ``{[expand,] dw, [se,] project}``."""
    act = nn.relu if activation == "RE" else nn.hard_swish
    layers = []
    if expanded != in_channels:
        layers.append(("expand", _cba(expanded, 1, act=act())))
    layers.append(("dw", _cba(expanded, kernel, stride=stride, groups=expanded, act=act())))
    if use_se:
        layers.append(("se", squeeze_excite(expanded, make_divisible(expanded // 4))))
    layers.append(("project", _cba(out_channels, 1)))
    body = nn.serial(*layers)
    if stride == 1 and in_channels == out_channels:
        return flat_block("inverted_residual_v3", body, (), lambda x, y, _: x + y)
    return body


def _mobilenet_v3(name, table, last_channel, num_classes, in_channels, width, dropout,
                  small_input) -> Layer:
    ch = lambda c: make_divisible(c * width)  # noqa: E731
    c = ch(16)
    layers = [("stem", _cba(c, 3, stride=1 if small_input else 2, act=nn.hard_swish()))]
    for i, (k, exp, out, se, act, s) in enumerate(table, 1):
        o = ch(out)
        layers.append((f"block{i}", inverted_residual_v3(c, k, ch(exp), o, se, act, s)))
        c = o
    last = make_divisible(last_channel * width)
    layers += [("last", _cba(6 * c, 1, act=nn.hard_swish())),
               ("avgpool", nn.global_avg_pool2d()),
               ("fc1", nn.dense(last)), ("act_fc1", nn.hard_swish()),
               ("dropout", nn.dropout(dropout))]
    return classifier(
        name, nn.serial(*layers), nn.dense(num_classes), in_channels=in_channels,
        input_size=(32, 32) if small_input else (224, 224), num_classes=num_classes,
        width=width, small_input=small_input,
    )


def mobilenet_v3_large(num_classes: int = 1000, in_channels: int = 3, *, width: float = 1.0,
                       dropout: float = 0.2, small_input: bool = False) -> Layer:
    """MobileNet v3 Large (Howard et al. 2019; torchvision's ``mobilenet_v3_large``):
    ``(N, 224, 224, C)`` -> logits. Stem 3x3/2 conv 16 -> hard swish, 15 inverted residual
    blocks (ReLU or hard swish, squeeze-excite with a hard-sigmoid gate in some), 1x1 conv to
    960 -> hard swish, global average pool, ``fc1`` 1280 -> hard swish -> dropout (features);
    head ``dense(num_classes)``. BatchNorm eps 1e-3, momentum 0.01. ``width`` multiplies the
    channels (rounded to multiples of 8); ``small_input`` makes the stem stride 1."""
    return _mobilenet_v3("mobilenet_v3_large", _V3_LARGE, 1280, num_classes, in_channels,
                         width, dropout, small_input)


def mobilenet_v3_small(num_classes: int = 1000, in_channels: int = 3, *, width: float = 1.0,
                       dropout: float = 0.2, small_input: bool = False) -> Layer:
    """MobileNet v3 Small (torchvision's ``mobilenet_v3_small``): 11 blocks, last conv 576,
    ``fc1`` 1024; otherwise as :func:`mobilenet_v3_large`."""
    return _mobilenet_v3("mobilenet_v3_small", _V3_SMALL, 1024, num_classes, in_channels,
                         width, dropout, small_input)
