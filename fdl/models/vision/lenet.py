"""LeNet-5 (d2l chapter 7.6): the book's sigmoid + average-pool version, the ReLU / max-pool
variant and the BatchNorm variant (chapter 8.5)."""

from __future__ import annotations

from fdl import nn
from fdl.models.vision._common import classifier
from fdl.nn.core import Layer

__all__ = ["lenet5"]


def lenet5(
    num_classes: int = 10,
    in_channels: int = 1,
    *,
    activation: str = "sigmoid",
    pool: str = "avg",
    batch_norm: bool = False,
) -> Layer:
    """LeNet-5 for ``(N, 28, 28, in_channels)`` images -> logits ``(N, num_classes)``.

    ``conv 6@5x5 (pad 2) -> act -> pool 2x2 -> conv 16@5x5 -> act -> pool 2x2 -> flatten ->
    dense 120 -> act -> dense 84 -> act -> head dense num_classes``. ``activation`` is
    ``"sigmoid"`` (the book) or ``"relu"``; ``pool`` ``"avg"`` (the book) or ``"max"``.
    ``batch_norm=True`` inserts BatchNorm after each conv / hidden dense, before the activation
    (the book's ``BNLeNet``). Any input of at least 12x12 works (28x28 documented).

    Params: ``features/{conv1, bn1, conv2, bn2, fc1, bn3, fc2, bn4}``, ``head/{w, b}``.
    """
    if activation not in ("sigmoid", "relu"):
        raise ValueError(f"lenet5: activation must be 'sigmoid' or 'relu', got {activation!r}")
    if pool not in ("avg", "max"):
        raise ValueError(f"lenet5: pool must be 'avg' or 'max', got {pool!r}")
    act = nn.sigmoid if activation == "sigmoid" else nn.relu
    pool_fn = nn.avg_pool2d if pool == "avg" else nn.max_pool2d

    def unit(i, layer, bn_name):
        out = [(f"{layer[0]}", layer[1])]
        if batch_norm:
            out.append((bn_name, nn.batch_norm()))
        out.append((f"act{i}", act()))
        return out

    feats = [
        *unit(1, ("conv1", nn.conv2d(6, 5, padding=2)), "bn1"),
        ("pool1", pool_fn(2, stride=2)),
        *unit(2, ("conv2", nn.conv2d(16, 5)), "bn2"),
        ("pool2", pool_fn(2, stride=2)),
        ("flatten", nn.flatten()),
        *unit(3, ("fc1", nn.dense(120)), "bn3"),
        *unit(4, ("fc2", nn.dense(84)), "bn4"),
    ]
    return classifier(
        "lenet5", nn.serial(*feats), nn.dense(num_classes),
        in_channels=in_channels, input_size=(28, 28), num_classes=num_classes,
        activation=activation, pool=pool, batch_norm=batch_norm,
    )
