"""Functional forms of the activations (``import fdl.nn.functional as F``)."""

from fdl.nn.activation import elu_fn as elu
from fdl.nn.activation import gelu_fn as gelu
from fdl.nn.activation import leaky_relu_fn as leaky_relu
from fdl.nn.activation import log_softmax_fn as log_softmax
from fdl.nn.activation import prelu_fn as prelu
from fdl.nn.activation import relu_fn as relu
from fdl.nn.activation import selu_fn as selu
from fdl.nn.activation import sigmoid_fn as sigmoid
from fdl.nn.activation import softmax_fn as softmax
from fdl.nn.activation import tanh_fn as tanh

__all__ = [
    "elu", "gelu", "leaky_relu", "log_softmax", "prelu", "relu", "selu", "sigmoid", "softmax",
    "tanh",
]
