"""Layers, combinators and losses: every layer is an immutable ``(init, apply)`` pair.

See :mod:`fdl.nn.core` for the protocol. Activations as functions live in
:mod:`fdl.nn.functional`.
"""

from fdl.nn import functional, initializers, tree
from fdl.nn.activation import (
    activation,
    elu,
    gelu,
    leaky_relu,
    log_softmax,
    prelu,
    relu,
    selu,
    sigmoid,
    softmax,
    tanh,
)
from fdl.nn.core import (
    Layer,
    ShapeError,
    apply_child,
    check_positive_int,
    check_rank,
    child_key,
    identity,
    init_child,
    lambda_layer,
    parallel,
    require_key,
    residual,
    serial,
    shared,
    summary,
)
from fdl.nn.linear import dense, flatten
from fdl.nn.tree import count_params, flatten_dict, path_mask, select, unflatten_dict

__all__ = [
    "Layer", "ShapeError", "activation", "apply_child", "check_positive_int", "check_rank",
    "child_key", "count_params", "dense", "elu", "flatten", "flatten_dict", "functional", "gelu",
    "identity", "init_child", "initializers", "lambda_layer", "leaky_relu", "log_softmax",
    "parallel", "path_mask", "prelu", "relu", "require_key", "residual", "select", "selu",
    "serial", "shared", "sigmoid", "softmax", "summary", "tanh", "tree", "unflatten_dict",
]
