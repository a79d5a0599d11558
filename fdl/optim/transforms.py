"""Building blocks: gradient transformations that compose with :func:`fdl.optim.chain`.

Every block is a :class:`~fdl.optim.GradientTransformation`. Hyperparameters are validated at
construction (``ValueError`` with the valid range); they may also be arrays (traced under
``jit`` when changed through :func:`inject_hyperparams`). Per-leaf arithmetic is done in each
leaf's dtype, so float32 parameters stay float32 even when float64 is enabled.

The blocks live in one module per concern (as Optax's): :mod:`~fdl.optim.scaling`,
:mod:`~fdl.optim.momentum`, :mod:`~fdl.optim.adaptive`, :mod:`~fdl.optim.clipping`,
:mod:`~fdl.optim.masking` (masks, freezing, per-path factors, weight decay),
:mod:`~fdl.optim.wrappers` (accumulation, non-finite skipping), :mod:`~fdl.optim.inject`.
This module re-exports them all, so ``fdl.optim.transforms.<name>`` keeps working.
"""

from fdl.optim.adaptive import (
    ScaleByAdadeltaState,
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByRmsState,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_rms,
)
from fdl.optim.clipping import clip_by_global_norm, clip_by_value, global_norm
from fdl.optim.inject import InjectHyperparamsState, inject_hyperparams, set_hyperparams
from fdl.optim.masking import (
    MaskedState,
    add_decayed_weights,
    freeze,
    masked,
    no_bias_norm_mask,
    scale_by_path,
)
from fdl.optim.momentum import TraceState, trace
from fdl.optim.scaling import ScaleByLearningRateState, scale, scale_by_learning_rate
from fdl.optim.wrappers import MultiStepsState, SkipNonfiniteState, multi_steps, skip_nonfinite

__all__ = [
    "ScaleByLearningRateState",
    "TraceState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByAdagradState",
    "ScaleByAdadeltaState",
    "MaskedState",
    "MultiStepsState",
    "InjectHyperparamsState",
    "SkipNonfiniteState",
    "scale",
    "scale_by_learning_rate",
    "trace",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_adagrad",
    "scale_by_adadelta",
    "add_decayed_weights",
    "no_bias_norm_mask",
    "clip_by_global_norm",
    "clip_by_value",
    "global_norm",
    "masked",
    "freeze",
    "scale_by_path",
    "multi_steps",
    "inject_hyperparams",
    "set_hyperparams",
    "skip_nonfinite",
]
