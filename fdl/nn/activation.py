"""Activations, as functions (``fdl.nn.functional``) and as layers (``fdl.nn``).

Layer constructors share the function names with a ``_layer``-free spelling in
``fdl.nn``: ``nn.relu()`` is a :class:`Layer`, ``fdl.nn.functional.relu(x)`` computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fdl.nn import initializers as inits
from fdl.nn.core import Layer, ShapeError

__all__ = [
    "relu_fn",
    "leaky_relu_fn",
    "prelu_fn",
    "elu_fn",
    "selu_fn",
    "gelu_fn",
    "sigmoid_fn",
    "tanh_fn",
    "softmax_fn",
    "log_softmax_fn",
    "silu_fn",
    "mish_fn",
    "hard_sigmoid_fn",
    "hard_swish_fn",
    "relu6_fn",
    "relu",
    "leaky_relu",
    "prelu",
    "elu",
    "selu",
    "gelu",
    "sigmoid",
    "tanh",
    "softmax",
    "log_softmax",
    "silu",
    "swish",
    "mish",
    "hard_sigmoid",
    "hard_swish",
    "relu6",
    "activation",
]

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def relu_fn(x):
    """max(x, 0)."""
    return jnp.maximum(x, 0)


def leaky_relu_fn(x, negative_slope: float = 0.01):
    """x if x >= 0 else negative_slope * x."""
    return jnp.where(x >= 0, x, negative_slope * x)


def prelu_fn(x, alpha):
    """x if x >= 0 else alpha * x (``alpha`` broadcasts over the last axis)."""
    return jnp.where(x >= 0, x, alpha * x)


def elu_fn(x, alpha: float = 1.0):
    """x if x > 0 else alpha * (exp(x) - 1)."""
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))


def selu_fn(x):
    """scale * elu(x, alpha) with the self-normalising constants."""
    return _SELU_SCALE * elu_fn(x, _SELU_ALPHA)


def gelu_fn(x, approximate: bool = False):
    """Gaussian error linear unit; ``approximate=True`` is the tanh form."""
    return jax.nn.gelu(x, approximate=approximate)


def sigmoid_fn(x):
    """1 / (1 + exp(-x))."""
    return jax.nn.sigmoid(x)


def tanh_fn(x):
    """tanh(x)."""
    return jnp.tanh(x)


def softmax_fn(x, axis: int = -1):
    """exp(x - max) / sum(exp(x - max)) along ``axis``."""
    return jax.nn.softmax(x, axis=axis)


def log_softmax_fn(x, axis: int = -1):
    """x - logsumexp(x) along ``axis``."""
    return jax.nn.log_softmax(x, axis=axis)


def silu_fn(x):
    """SiLU / Swish (beta = 1): ``x * sigmoid(x)`` (PyTorch ``SiLU``, Keras ``swish``)."""
    return x * jax.nn.sigmoid(x)


def mish_fn(x):
    """Mish: ``x * tanh(softplus(x))`` (PyTorch ``Mish``)."""
    return x * jnp.tanh(jax.nn.softplus(x))


def relu6_fn(x):
    """``min(max(x, 0), 6)`` (MobileNet's activation; PyTorch ``ReLU6``)."""
    return jnp.clip(x, 0, 6)


def hard_sigmoid_fn(x):
    """``relu6(x + 3) / 6`` (PyTorch ``Hardsigmoid``; MobileNet v3's gate)."""
    return jnp.clip(x + 3, 0, 6) / 6


def hard_swish_fn(x):
    """``x * relu6(x + 3) / 6`` (PyTorch ``Hardswish``; MobileNet v3)."""
    return x * jnp.clip(x + 3, 0, 6) / 6


def activation(fn, name: str) -> Layer:
    """Wrap an elementwise (shape-preserving) function as a parameter-free layer."""

    def init(key, in_shape):
        return tuple(in_shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return fn(x), state

    return Layer(init, apply, name=name)


def relu() -> Layer:
    """ReLU layer."""
    return activation(relu_fn, "relu")


def leaky_relu(negative_slope: float = 0.01) -> Layer:
    """Leaky ReLU layer."""
    return activation(lambda x: leaky_relu_fn(x, negative_slope), "leaky_relu")


def elu(alpha: float = 1.0) -> Layer:
    """ELU layer."""
    return activation(lambda x: elu_fn(x, alpha), "elu")


def selu() -> Layer:
    """SELU layer."""
    return activation(selu_fn, "selu")


def gelu(approximate: bool = False) -> Layer:
    """GELU layer."""
    return activation(lambda x: gelu_fn(x, approximate), "gelu")


def sigmoid() -> Layer:
    """Sigmoid layer."""
    return activation(sigmoid_fn, "sigmoid")


def tanh() -> Layer:
    """Tanh layer."""
    return activation(tanh_fn, "tanh")


def softmax(axis: int = -1) -> Layer:
    """Softmax layer along ``axis``."""
    return activation(lambda x: softmax_fn(x, axis), "softmax")


def log_softmax(axis: int = -1) -> Layer:
    """Log-softmax layer along ``axis``."""
    return activation(lambda x: log_softmax_fn(x, axis), "log_softmax")


def silu() -> Layer:
    """SiLU (Swish with beta = 1) layer: ``x * sigmoid(x)``."""
    return activation(silu_fn, "silu")


def swish() -> Layer:
    """Swish layer: the same function as :func:`silu` (Keras' and the EfficientNet paper's
    name)."""
    return activation(silu_fn, "swish")


def mish() -> Layer:
    """Mish layer: ``x * tanh(softplus(x))``."""
    return activation(mish_fn, "mish")


def relu6() -> Layer:
    """ReLU6 layer: ``min(max(x, 0), 6)``."""
    return activation(relu6_fn, "relu6")


def hard_sigmoid() -> Layer:
    """Hard sigmoid layer: ``relu6(x + 3) / 6``."""
    return activation(hard_sigmoid_fn, "hard_sigmoid")


def hard_swish() -> Layer:
    """Hard swish layer: ``x * relu6(x + 3) / 6``."""
    return activation(hard_swish_fn, "hard_swish")


def prelu(init_slope: float = 0.25, per_channel: bool = True) -> Layer:
    """PReLU with a learnable slope: params ``{"alpha": (channels,)}`` (last axis) or ``()``."""

    def init(key, in_shape):
        if per_channel and len(in_shape) < 1:
            raise ShapeError("prelu", f"per-channel PReLU needs rank >= 1, got {in_shape}")
        shape = (in_shape[-1],) if per_channel else ()
        return tuple(in_shape), {"alpha": inits.constant(init_slope)(key, shape)}, {}

    def apply(params, state, x, *, key=None, train=False):
        return prelu_fn(x, params["alpha"]), state

    return Layer(init, apply, name="prelu", config={"init_slope": init_slope})
