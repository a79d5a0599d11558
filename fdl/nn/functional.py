"""Functional forms of the activations (``import fdl.nn.functional as F``)."""

from fdl.nn.activation import elu_fn as elu
from fdl.nn.activation import gelu_fn as gelu
from fdl.nn.activation import hard_sigmoid_fn as hard_sigmoid
from fdl.nn.activation import hard_swish_fn as hard_swish
from fdl.nn.activation import leaky_relu_fn as leaky_relu
from fdl.nn.activation import log_softmax_fn as log_softmax
from fdl.nn.activation import mish_fn as mish
from fdl.nn.activation import prelu_fn as prelu
from fdl.nn.activation import relu6_fn as relu6
from fdl.nn.activation import relu_fn as relu
from fdl.nn.activation import selu_fn as selu
from fdl.nn.activation import sigmoid_fn as sigmoid
from fdl.nn.activation import silu_fn as silu
from fdl.nn.activation import silu_fn as swish
from fdl.nn.activation import softmax_fn as softmax
from fdl.nn.activation import tanh_fn as tanh

__all__ = [
    "elu", "gelu", "leaky_relu", "log_softmax", "prelu", "relu", "selu", "sigmoid", "softmax",
    "tanh", "silu", "swish", "mish", "relu6", "hard_sigmoid", "hard_swish",
]
