"""Vision model zoo (d2l chapters 7-8): LeNet to DenseNet, ResNet v1/v2, ResNeXt, SE,
MobileNet v1/v2/v3.

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

torchvision-compatible builders (weights via :mod:`fdl.interop.torchvision`, which lists
them in ``SUPPORTED``): ``resnet18/34/50/101/152``, ``resnext50_32x4d``,
``resnext101_32x8d/64x4d``, ``wide_resnet50_2/101_2``, ``vgg11/13/16/19`` (``batch_norm=True``
for the ``_bn`` variants), ``alexnet_torchvision``, ``densenet121/161/169/201``,
``googlenet_torchvision``, ``mobilenet_v2``, ``mobilenet_v3_large/small``, with their
defaults.
"""

from fdl.models.vision._common import classifier, replace_head
from fdl.models.vision.alexnet import alexnet, alexnet_torchvision
from fdl.models.vision.densenet import (
    dense_block,
    dense_layer,
    densenet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet_book,
    transition,
)
from fdl.models.vision.googlenet import googlenet, googlenet_torchvision, inception, inception_bn
from fdl.models.vision.lenet import lenet5
from fdl.models.vision.mobilenet import (
    depthwise_separable,
    inverted_residual,
    inverted_residual_v3,
    make_divisible,
    mobilenet_v1,
    mobilenet_v2,
    mobilenet_v3_large,
    mobilenet_v3_small,
    squeeze_excite,
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
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    se_block,
    wide_resnet50_2,
    wide_resnet101_2,
)
from fdl.models.vision.vgg import (
    VGG11_ARCH,
    VGG13_ARCH,
    VGG16_ARCH,
    VGG19_ARCH,
    vgg,
    vgg11,
    vgg13,
    vgg16,
    vgg19,
    vgg_block,
)

__all__ = [
    "VGG11_ARCH", "VGG16_ARCH", "alexnet", "alexnet_torchvision", "basic_block",
    "bottleneck_block", "classifier", "dense_block", "dense_layer", "densenet", "densenet121",
    "densenet_book", "depthwise_separable", "googlenet", "inception", "inverted_residual",
    "lenet5", "mobilenet_v1", "mobilenet_v2", "nin", "nin_block", "replace_head", "resnet",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "se_block",
    "transition", "vgg", "vgg11", "vgg16", "vgg_block",
]
__all__ += [  # torchvision's other classification architectures
    "VGG13_ARCH", "VGG19_ARCH", "densenet161", "densenet169", "densenet201",
    "googlenet_torchvision", "inception_bn", "inverted_residual_v3", "make_divisible",
    "mobilenet_v3_large", "mobilenet_v3_small", "resnet152", "resnext101_32x8d",
    "resnext101_64x4d", "squeeze_excite", "vgg13", "vgg19", "wide_resnet50_2",
    "wide_resnet101_2",
]
