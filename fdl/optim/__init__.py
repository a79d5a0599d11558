"""Hand-written optimizers: optax-shaped pure ``(init, update)`` transformations.

``opt = fdl.optim.adamw(1e-3)``; ``state = opt.init(params)``;
``updates, state = opt.update(grads, state, params)``;
``params = fdl.optim.apply_updates(params, updates)``;
``fdl.optim.current_lr(state)`` reads the learning rate last applied.
``params, state = fdl.optim.apply_gradients(opt, grads, state, params)`` does both in one
step, fused into one pass over the leaves for ``adam``, ``adamw`` and ``sgd`` with momentum.

Modules (one concern each): ``base`` (protocol, ``chain``), ``scaling``, ``momentum``,
``adaptive``, ``clipping``, ``masking`` (masks, freezing, per-path factors, weight decay),
``wrappers`` (accumulation, non-finite skipping), ``inject`` (hyperparameters in the state),
``averaging`` (EMA of the params), ``loss_scale`` (float16), ``schedules``, ``aliases``,
``fused`` (one-pass steps).
"""

from fdl.optim.aliases import adadelta, adagrad, adam, adamw, momentum, nesterov, rmsprop, sgd
from fdl.optim.averaging import EmaState, ema, ema_params
from fdl.optim.base import (
    EmptyState,
    GradientTransformation,
    MaskedNode,
    Schedule,
    apply_updates,
    chain,
    check_same_structure,
    current_lr,
    identity,
)
from fdl.optim.fused import apply_gradients
from fdl.optim.loss_scale import DynamicLossScaleState, dynamic_loss_scale, loss_scale
from fdl.optim.momentum import DampedTraceState
from fdl.optim.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    inverse_sqrt_schedule,
    join_schedules,
    linear_schedule,
    multi_factor_schedule,
    one_cycle_schedule,
    piecewise_constant_schedule,
    polynomial_schedule,
    step_schedule,
    warmup_cosine_decay_schedule,
)
from fdl.optim.transforms import (
    InjectHyperparamsState,
    MaskedState,
    MultiStepsState,
    ScaleByAdadeltaState,
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByRmsState,
    SkipNonfiniteState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    clip_by_value,
    freeze,
    global_norm,
    inject_hyperparams,
    masked,
    multi_steps,
    no_bias_norm_mask,
    scale,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_path,
    scale_by_rms,
    set_hyperparams,
    skip_nonfinite,
    trace,
)

__all__ = [
    # base
    "GradientTransformation", "EmptyState", "MaskedNode", "Schedule", "apply_updates",
    "apply_gradients", "chain",
    "identity", "check_same_structure", "current_lr",
    # aliases
    "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw",
    # transforms
    "scale", "scale_by_learning_rate", "trace", "scale_by_adam", "scale_by_rms",
    "scale_by_adagrad", "scale_by_adadelta", "add_decayed_weights", "no_bias_norm_mask",
    "clip_by_global_norm", "clip_by_value", "global_norm", "masked", "freeze", "scale_by_path",
    "multi_steps", "inject_hyperparams", "set_hyperparams", "skip_nonfinite",
    # states
    "ScaleByLearningRateState", "TraceState", "ScaleByAdamState", "ScaleByRmsState",
    "ScaleByAdagradState", "ScaleByAdadeltaState", "MaskedState", "MultiStepsState",
    "InjectHyperparamsState", "SkipNonfiniteState",
    # averaging, loss scaling
    "ema", "ema_params", "EmaState", "dynamic_loss_scale", "loss_scale", "DynamicLossScaleState",
    "DampedTraceState",
    # schedules
    "constant_schedule", "piecewise_constant_schedule", "step_schedule",
    "multi_factor_schedule", "exponential_decay", "cosine_decay_schedule",
    "warmup_cosine_decay_schedule", "linear_schedule", "inverse_sqrt_schedule",
    "polynomial_schedule", "one_cycle_schedule", "join_schedules",
]
