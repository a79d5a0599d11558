"""Vision model zoo (d2l chapters 7-8): LeNet to DenseNet, ResNet v1/v2, ResNeXt, SE,
MobileNet v1/v2.

Every model is a function returning an :class:`fdl.nn.Layer` ``serial(("features", ...),
("head", ...))`` over NHWC images: params ``{"features": {...}, "head": {...}}``, BatchNorm
running statistics in ``state``. ``features`` maps images to ``(N, D)`` (NiN: to a feature
map) and ``head`` to logits; :func:`replace_head` swaps the head for fine-tuning.

Names used by the benchmark workloads (``scripts/bench/workloads``):
- ``lenet5(batch_norm=True)``: the book's BatchNorm LeNet (sigmoid, average pooling) for
  ``(N, 28, 28, 1)``; ``lenet5(batch_norm=True, activation="relu", pool="max")`` the
  ReLU/max-pool form.
- ``resnet18(num_classes=10, small_input=True)``: CIFAR-style ResNet-18 (3x3 stem, no
  max-pool) for ``(N, 32, 32, 3)``.

torchvision-compatible builders (weights via :mod:`fdl.interop.torchvision`): ``resnet18``,
``resnet34``, ``resnet50``, ``resnet101``, ``vgg11``, ``vgg16``, ``alexnet_torchvision``,
``densenet121`` with their defaults.
"""

from fdl.models.vision._common import classifier, replace_head
from fdl.models.vision.alexnet import alexnet, alexnet_torchvision
from fdl.models.vision.densenet import (
    dense_block,
    dense_layer,
    densenet,
    densenet121,
    densenet_book,
    transition,
)
from fdl.models.vision.googlenet import googlenet, inception
from fdl.models.vision.lenet import lenet5
from fdl.models.vision.mobilenet import (
    depthwise_separable,
    inverted_residual,
    mobilenet_v1,
    mobilenet_v2,
)
from fdl.models.vision.nin import nin, nin_block
from fdl.models.vision.resnet import (
    basic_block,
    bottleneck_block,
    resnet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnext50_32x4d,
    se_block,
)
from fdl.models.vision.vgg import VGG11_ARCH, VGG16_ARCH, vgg, vgg11, vgg16, vgg_block

__all__ = [
    "VGG11_ARCH", "VGG16_ARCH", "alexnet", "alexnet_torchvision", "basic_block",
    "bottleneck_block", "classifier", "dense_block", "dense_layer", "densenet", "densenet121",
    "densenet_book", "depthwise_separable", "googlenet", "inception", "inverted_residual",
    "lenet5", "mobilenet_v1", "mobilenet_v2", "nin", "nin_block", "replace_head", "resnet",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "se_block",
    "transition", "vgg", "vgg11", "vgg16", "vgg_block",
]
