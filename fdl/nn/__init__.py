"""Layers, combinators and losses: every layer is an immutable ``(init, apply)`` pair.

See :mod:`fdl.nn.core` for the protocol. Activations as functions live in
:mod:`fdl.nn.functional`.
"""

from fdl.nn import functional, initializers, losses, tree
from fdl.nn.activation import (
    activation,
    elu,
    gelu,
    hard_sigmoid,
    hard_swish,
    leaky_relu,
    log_softmax,
    mish,
    prelu,
    relu,
    relu6,
    selu,
    sigmoid,
    silu,
    softmax,
    swish,
    tanh,
)
from fdl.nn.attention import (
    additive_attention,
    attention_mask,
    causal_mask,
    combine_masks,
    dot_product_attention,
    masked_softmax,
    padding_mask,
    valid_lens_mask,
)
from fdl.nn.conv import conv1d, conv2d, conv3d, conv_transpose2d
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
from fdl.nn.dropout import dropout
from fdl.nn.embedding import attend_embedding, embedding
from fdl.nn.linear import dense, flatten
from fdl.nn.losses import (
    huber_loss,
    kl_divergence,
    l1_loss,
    multiclass_hinge_loss,
    sigmoid_binary_cross_entropy,
    smooth_l1_loss,
    softmax_cross_entropy,
    squared_error,
)
from fdl.nn.multi_head import init_kv_cache, multi_head_attention, self_attention
from fdl.nn.norm import batch_norm, group_norm, instance_norm, layer_norm, rms_norm
from fdl.nn.pool import (
    adaptive_avg_pool2d,
    avg_pool1d,
    avg_pool2d,
    avg_pool3d,
    global_avg_pool1d,
    global_avg_pool2d,
    global_avg_pool3d,
    global_max_pool1d,
    global_max_pool2d,
    global_max_pool3d,
    max_pool1d,
    max_pool2d,
    max_pool3d,
)
from fdl.nn.precision import mixed_precision
from fdl.nn.recurrent import (
    RecurrentLayer,
    detach_state,
    gru,
    gru_cell,
    lstm,
    lstm_cell,
    rnn,
    rnn_cell,
    scan_cell,
)
from fdl.nn.state import init_state, reset_state
from fdl.nn.tree import count_params, flatten_dict, path_mask, select, unflatten_dict
from fdl.nn.upsample import upsample
from fdl.nn.wrappers import at_paths, frozen, remat

__all__ = [
    "Layer", "ShapeError", "activation", "apply_child", "check_positive_int", "check_rank",
    "child_key", "count_params", "dense", "elu", "flatten", "flatten_dict", "functional", "gelu",
    "identity", "init_child", "initializers", "lambda_layer", "leaky_relu", "log_softmax",
    "parallel", "path_mask", "prelu", "relu", "require_key", "residual", "select", "selu",
    "serial", "shared", "sigmoid", "softmax", "summary", "tanh", "tree", "unflatten_dict",
]

__all__ += [  # normalisation, dropout, embedding, losses
    "attend_embedding", "batch_norm", "dropout", "embedding", "huber_loss", "kl_divergence",
    "l1_loss", "layer_norm",
    "losses", "multiclass_hinge_loss", "sigmoid_binary_cross_entropy", "smooth_l1_loss",
    "softmax_cross_entropy", "squared_error",
]

__all__ += [  # convolution and pooling
    "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "conv1d", "conv2d", "conv_transpose2d",
    "global_avg_pool2d", "max_pool1d", "max_pool2d",
]

__all__ += [  # attention
    "additive_attention", "attention_mask", "causal_mask", "combine_masks",
    "dot_product_attention", "init_kv_cache", "masked_softmax", "multi_head_attention",
    "padding_mask", "self_attention", "valid_lens_mask",
]

__all__ += [  # recurrent, state helpers
    "RecurrentLayer", "detach_state", "gru", "gru_cell", "init_state", "lstm", "lstm_cell",
    "reset_state", "rnn", "rnn_cell", "scan_cell",
]

__all__ += [  # 3-D convolution and pooling, global max pooling, upsampling
    "avg_pool3d", "conv3d", "global_avg_pool1d", "global_avg_pool3d", "global_max_pool1d",
    "global_max_pool2d", "global_max_pool3d", "max_pool3d", "upsample",
]

__all__ += [  # more normalisation layers
    "group_norm", "instance_norm", "rms_norm",
]

__all__ += [  # more activations
    "hard_sigmoid", "hard_swish", "mish", "relu6", "silu", "swish",
]

__all__ += [  # wrappers: inference mode, rematerialisation, precision
    "at_paths", "frozen", "mixed_precision", "remat",
]
