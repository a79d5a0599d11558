"""ResNet (d2l chapters 8.6, 8.7): v1 (post-activation) and v2 (pre-activation), basic and
bottleneck blocks, ResNeXt (grouped 3x3 convolutions), squeeze-and-excitation.

Parameter paths mirror torchvision's module names: ``features/conv1``, ``features/bn1``,
``features/layer1/0/conv1``, ``features/layer1/0/downsample/{conv, bn}``, ``head`` (``fc``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fdl import nn
from fdl.models.vision._common import classifier
from fdl.nn.core import (
    Layer,
    ShapeError,
    apply_child,
    check_positive_int,
    child_key,
    init_child,
)

__all__ = [
    "basic_block",
    "bottleneck_block",
    "se_block",
    "resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


def se_block(reduction: int = 16, *, min_hidden: int = 1) -> Layer:
    """Squeeze-and-excitation: ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))`` per channel.

    Input/output ``(N, H, W, C)``; params ``{fc1: {w: (C, C//reduction), b}, fc2: {w:
    (C//reduction, C), b}}`` (hidden width at least ``min_hidden``).
    """
    check_positive_int("se_block", "reduction", reduction)

    def layers(c):
        hidden = max(min_hidden, c // reduction)
        return nn.dense(hidden), nn.dense(c)

    def init(key, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 4:
            raise ShapeError("se_block", f"expected NHWC input (N, H, W, C), got {in_shape}")
        fc1, fc2 = layers(in_shape[-1])
        n = in_shape[0]
        h, p1, _ = init_child("fc1", fc1, child_key(key, 0), (n, in_shape[-1]))
        _, p2, _ = init_child("fc2", fc2, child_key(key, 1), h)
        return in_shape, {"fc1": p1, "fc2": p2}, {}

    def apply(params, state, x, *, key=None, train=False):
        if x.ndim != 4 or x.shape[-1] != params["fc2"]["w"].shape[1]:
            raise ShapeError(
                "se_block",
                f"expected (N, H, W, {params['fc2']['w'].shape[1]}), got {tuple(x.shape)}",
            )
        s = jnp.mean(x, axis=(1, 2))
        s = jax.nn.relu(s @ params["fc1"]["w"] + params["fc1"]["b"])
        s = jax.nn.sigmoid(s @ params["fc2"]["w"] + params["fc2"]["b"])
        return x * s[:, None, None, :].astype(x.dtype), state

    return Layer(init, apply, name="se_block", config={"reduction": reduction})


def _conv(c, k, stride=1, groups=1):
    return nn.conv2d(c, k, stride=stride, padding=k // 2, groups=groups, use_bias=False)


def _merged(name: str, parts: Sequence[Layer], shortcut: Layer | None, version: int) -> Layer:
    """A residual block whose params are the union of the serial ``parts``' params (flat:
    ``conv1, bn1, ...``) plus ``downsample``.

    v1: ``relu(parts(x) + shortcut(x))``. v2: ``parts[0]`` is the pre-activation
    (``bn1 -> relu``); ``a = parts[0](x)``, ``out = parts[1](a) + (shortcut(a) or x)``.
    """

    def init(key, in_shape):
        params, state, shape, pre = {}, {}, tuple(in_shape), tuple(in_shape)
        for i, part in enumerate(parts):
            shape, p, s = part.init(child_key(key, i), shape)
            params.update(p)
            state.update(s)
            if i == 0:
                pre = shape
        sc_shape = tuple(in_shape)
        if shortcut is not None:
            src = pre if version == 2 else tuple(in_shape)
            sc_shape, p, s = init_child("downsample", shortcut, child_key(key, 9), src)
            params["downsample"] = p
            if s:
                state["downsample"] = s
        if tuple(shape) != sc_shape:
            raise ShapeError(
                name,
                f"residual branch output {tuple(shape)} and shortcut {sc_shape} differ "
                "(a projection shortcut is needed: downsample=True)",
            )
        return tuple(shape), params, state

    def apply(params, state, x, *, key=None, train=False):
        new_state = dict(state)
        y, pre = x, x
        for i, part in enumerate(parts):
            y, new_state = part.apply(params, new_state, y, key=child_key(key, i), train=train)
            if i == 0:
                pre = y
        sc = x
        if shortcut is not None:
            src = pre if version == 2 else x
            sc, s = apply_child("downsample", shortcut, params["downsample"],
                                state.get("downsample", {}), src, key=None, train=train)
            new_state = dict(new_state)
            if s:
                new_state["downsample"] = s
        y = y + sc
        return (jax.nn.relu(y) if version == 1 else y), new_state

    children = tuple(c for part in parts for c in part.children)
    if shortcut is not None:
        children += (("downsample", shortcut),)
    return Layer(init, apply, name=name, children=children)


def _auto_downsample(name: str, build, stride: int, out_channels: int) -> Layer:
    """Pick the projection shortcut at ``init`` (stride != 1 or channel change); at ``apply``
    from the presence of ``downsample`` in params."""
    plain, proj = build(False), build(True)

    def init(key, in_shape):
        need = stride != 1 or tuple(in_shape)[-1] != out_channels
        return (proj if need else plain).init(key, in_shape)

    def apply(params, state, x, *, key=None, train=False):
        layer = proj if "downsample" in params else plain
        return layer.apply(params, state, x, key=key, train=train)

    return Layer(init, apply, name=name, children=proj.children,
                 config={"out_channels": out_channels, "stride": stride})


def _shortcut(out_channels: int, stride: int, version: int) -> Layer:
    layers = [("conv", _conv(out_channels, 1, stride))]
    if version == 1:
        layers.append(("bn", nn.batch_norm()))
    return nn.serial(*layers)


def _check_version(version):
    if version not in (1, 2):
        raise ValueError(f"resnet: version must be 1 (post-activation) or 2 (pre-activation), "
                         f"got {version!r}")


def basic_block(
    out_channels: int,
    stride: int = 1,
    *,
    version: int = 1,
    se_reduction: int | None = None,
    downsample: bool | None = None,
) -> Layer:
    """Basic residual block (two 3x3 convs). Input ``(N, H, W, C)`` -> ``(N, H/stride,
    W/stride, out_channels)``.

    v1: ``relu(bn2(conv2(relu(bn1(conv1(x))))) [* se] + shortcut(x))``; v2 (pre-activation):
    ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``. The projection shortcut
    (``downsample``: 1x1 conv stride ``stride`` [+ BN in v1]) is used when ``downsample`` is
    True, or, when None, exactly when the stride or channel count changes.
    Params ``{conv1, bn1, conv2, bn2, [se,] [downsample]}``. Each ``relu`` that follows a batch
    norm is that layer's (``batch_norm(relu=True)``: computed in its passes).
    """
    _check_version(version)

    def build(ds):
        if version == 1:
            body = [("conv1", _conv(out_channels, 3, stride)), ("bn1", nn.batch_norm(relu=True)),
                    ("conv2", _conv(out_channels, 3)), ("bn2", nn.batch_norm())]
            if se_reduction:
                body.append(("se", se_block(se_reduction)))
            parts = [nn.serial(*body)]
        else:
            rest = [("conv1", _conv(out_channels, 3, stride)), ("bn2", nn.batch_norm(relu=True)),
                    ("conv2", _conv(out_channels, 3))]
            if se_reduction:
                rest.append(("se", se_block(se_reduction)))
            parts = [nn.serial(("bn1", nn.batch_norm(relu=True))), nn.serial(*rest)]
        sc = _shortcut(out_channels, stride, version) if ds else None
        return _merged("basic_block", parts, sc, version)

    if downsample is None:
        return _auto_downsample("basic_block", build, stride, out_channels)
    return build(downsample)


def bottleneck_block(
    channels: int,
    stride: int = 1,
    *,
    expansion: int = 4,
    groups: int = 1,
    base_width: int = 64,
    version: int = 1,
    se_reduction: int | None = None,
    downsample: bool | None = None,
) -> Layer:
    """Bottleneck block: 1x1 (width) -> 3x3 (width, stride, ``groups``) -> 1x1
    (``channels * expansion``), output ``(N, H/stride, W/stride, channels * expansion)``.

    ``width = int(channels * base_width / 64) * groups`` (torchvision; ResNeXt-50 32x4d is
    ``groups=32, base_width=4``). The stride sits on the 3x3 conv (ResNet v1.5, torchvision).
    v1 post-activation / v2 pre-activation and the shortcut rule as :func:`basic_block`.
    Params ``{conv1, bn1, conv2, bn2, conv3, bn3, [se,] [downsample]}``.
    """
    _check_version(version)
    width = int(channels * (base_width / 64.0)) * groups
    out = channels * expansion

    def build(ds):
        if version == 1:
            body = [("conv1", _conv(width, 1)), ("bn1", nn.batch_norm(relu=True)),
                    ("conv2", _conv(width, 3, stride, groups)), ("bn2", nn.batch_norm(relu=True)),
                    ("conv3", _conv(out, 1)), ("bn3", nn.batch_norm())]
            if se_reduction:
                body.append(("se", se_block(se_reduction)))
            parts = [nn.serial(*body)]
        else:
            rest = [("conv1", _conv(width, 1)), ("bn2", nn.batch_norm(relu=True)),
                    ("conv2", _conv(width, 3, stride, groups)), ("bn3", nn.batch_norm(relu=True)),
                    ("conv3", _conv(out, 1))]
            if se_reduction:
                rest.append(("se", se_block(se_reduction)))
            parts = [nn.serial(("bn1", nn.batch_norm(relu=True))), nn.serial(*rest)]
        sc = _shortcut(out, stride, version) if ds else None
        return _merged("bottleneck_block", parts, sc, version)

    if downsample is None:
        return _auto_downsample("bottleneck_block", build, stride, out)
    return build(downsample)


def resnet(
    block: str = "basic",
    layers: Sequence[int] = (2, 2, 2, 2),
    num_classes: int = 1000,
    in_channels: int = 3,
    *,
    version: int = 1,
    small_input: bool = False,
    base_channels: int = 64,
    groups: int = 1,
    width_per_group: int = 64,
    se_reduction: int | None = None,
) -> Layer:
    """ResNet: ``(N, 224, 224, C)`` (``small_input``: ``(N, 32, 32, C)``) -> logits.

    Features: stem ``conv1`` (7x7/2, ``base_channels``) -> ``bn1`` (with its relu) -> ``maxpool``
    3x3/2 (``small_input=True``: 3x3/1 conv, no max-pool: the CIFAR stem), then stages
    ``layer1..layer4`` of ``layers[i]`` blocks (``"basic"`` or ``"bottleneck"``), widths
    ``base_channels * (1, 2, 4, 8)``, the first block of stages 2-4 with stride 2; v2 adds a
    final ``bn_final`` (with its relu); then global average pooling: ``(N, 8 * base_channels *
    expansion)``. Head: ``dense(num_classes)`` (torchvision's ``fc``). ``groups`` /
    ``width_per_group`` give ResNeXt; ``se_reduction`` adds an SE block to every block.
    """
    _check_version(version)
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"resnet: block must be 'basic' or 'bottleneck', got {block!r}")
    if small_input:
        stem = [("conv1", _conv(base_channels, 3)), ("bn1", nn.batch_norm(relu=True))]
    else:
        stem = [("conv1", nn.conv2d(base_channels, 7, stride=2, padding=3, use_bias=False)),
                ("bn1", nn.batch_norm(relu=True)),
                ("maxpool", nn.max_pool2d(3, stride=2, padding=1))]
    stages = []
    for i, n in enumerate(layers):
        planes = base_channels * 2**i
        blocks = []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            if block == "basic":
                b = basic_block(planes, stride, version=version, se_reduction=se_reduction)
            else:
                b = bottleneck_block(planes, stride, groups=groups, base_width=width_per_group,
                                     version=version, se_reduction=se_reduction)
            blocks.append((str(j), b))
        stages.append((f"layer{i + 1}", nn.serial(*blocks)))
    tail = []
    if version == 2:
        tail = [("bn_final", nn.batch_norm(relu=True))]
    feats = nn.serial(*stem, *stages, *tail, ("avgpool", nn.global_avg_pool2d()))
    return classifier(
        "resnet", feats, nn.dense(num_classes), in_channels=in_channels,
        input_size=(32, 32) if small_input else (224, 224), num_classes=num_classes,
        block=block, layers=tuple(layers), version=version, small_input=small_input,
        base_channels=base_channels, groups=groups, width_per_group=width_per_group,
        se_reduction=se_reduction,
    )


def resnet18(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """ResNet-18 (basic, [2, 2, 2, 2]); ``small_input=True`` for 32x32 (CIFAR stem)."""
    return resnet("basic", (2, 2, 2, 2), num_classes, in_channels, **kw)


def resnet34(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """ResNet-34 (basic, [3, 4, 6, 3])."""
    return resnet("basic", (3, 4, 6, 3), num_classes, in_channels, **kw)


def resnet50(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """ResNet-50 (bottleneck, [3, 4, 6, 3])."""
    return resnet("bottleneck", (3, 4, 6, 3), num_classes, in_channels, **kw)


def resnet101(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """ResNet-101 (bottleneck, [3, 4, 23, 3])."""
    return resnet("bottleneck", (3, 4, 23, 3), num_classes, in_channels, **kw)


def resnext50_32x4d(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """ResNeXt-50 32x4d (bottleneck, [3, 4, 6, 3], 32 groups of width 4)."""
    return resnet("bottleneck", (3, 4, 6, 3), num_classes, in_channels, groups=32,
                  width_per_group=4, **kw)


def resnet152(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """ResNet-152 (bottleneck, [3, 8, 36, 3])."""
    return resnet("bottleneck", (3, 8, 36, 3), num_classes, in_channels, **kw)


def resnext101_32x8d(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """ResNeXt-101 32x8d (bottleneck, [3, 4, 23, 3], 32 groups of width 8)."""
    return resnet("bottleneck", (3, 4, 23, 3), num_classes, in_channels, groups=32,
                  width_per_group=8, **kw)


def resnext101_64x4d(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """ResNeXt-101 64x4d (bottleneck, [3, 4, 23, 3], 64 groups of width 4)."""
    return resnet("bottleneck", (3, 4, 23, 3), num_classes, in_channels, groups=64,
                  width_per_group=4, **kw)


def wide_resnet50_2(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """Wide ResNet-50-2 (bottleneck, [3, 4, 6, 3], bottleneck width doubled: 128 per group)."""
    return resnet("bottleneck", (3, 4, 6, 3), num_classes, in_channels, width_per_group=128,
                  **kw)


def wide_resnet101_2(num_classes: int = 1000, in_channels: int = 3, **kw) -> Layer:
    """Wide ResNet-101-2 (bottleneck, [3, 4, 23, 3], width 128 per group)."""
    return resnet("bottleneck", (3, 4, 23, 3), num_classes, in_channels, width_per_group=128,
                  **kw)
