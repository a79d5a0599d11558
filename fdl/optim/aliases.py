"""One-line optimizers built from the building blocks (:mod:`fdl.optim.transforms`).

``adam``, ``adamw`` and ``sgd`` with momentum also carry a fused ``step`` (one pass per
element; :mod:`fdl.optim.fused`), which :func:`fdl.optim.apply_gradients` and
``fdl.train.make_train_step`` use.

Defaults and arithmetic follow ``torch.optim`` (tested to 1e-6 over 100 steps in float64);
each docstring gives the update and names where other conventions differ. ``lr`` may be a
number or a schedule ``step -> value``; :func:`fdl.optim.current_lr` reads the rate last
applied from the state.
"""

from __future__ import annotations

from typing import Any

from fdl.optim.adaptive import scale_by_adadelta, scale_by_adagrad, scale_by_adam, scale_by_rms
from fdl.optim.base import GradientTransformation, Schedule, chain, check_lr, check_range
from fdl.optim.fused import adam_step, momentum_step
from fdl.optim.masking import add_decayed_weights
from fdl.optim.momentum import trace
from fdl.optim.scaling import scale_by_learning_rate

__all__ = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adadelta", "adam", "adamw"]

LR = float | Schedule


def _numbers(*values) -> bool:
    """Whether every value is a Python number (a fused step needs static hyperparameters)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _lr_fusable(lr) -> bool:
    return callable(lr) or _numbers(lr)


def _wd(weight_decay, where):
    check_range("weight_decay", weight_decay, 0.0, where=where)
    return add_decayed_weights(weight_decay)


def sgd(lr: LR, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, *,
        dampening: float | None = None, momentum_form: str = "pytorch"
        ) -> GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum and coupled L2 decay.

    ``g <- g + wd * p`` (coupled L2, Gluon's ``wd``), then with ``momentum_form="pytorch"``
    (default, PyTorch ``SGD``)::

        b = mu b + (1 - dampening) g;   p -= lr * b     (nesterov: p -= lr * (g + mu b))

    (``b_1 = g_1`` on the first step, undamped, as PyTorch; Nesterov needs no dampening;
    ``dampening=None``, the default, is 0 and stays static under :func:`inject_hyperparams`)

    and with ``momentum_form="gluon"`` (d2l's and MXNet Gluon's heavy ball, the learning rate
    inside the buffer)::

        v = mu v - lr g;   p += v              (nesterov: p += mu v - lr g)

    The two agree while ``lr`` is constant; under a schedule the Gluon form keeps the old
    rates in its buffer, the PyTorch form rescales the whole buffer by the new rate.
    """
    where = "sgd"
    check_lr(lr, where)
    check_range("momentum", momentum, 0.0, 1.0, hi_open=True, where=where)
    if momentum_form not in ("pytorch", "gluon"):
        raise ValueError(f"{where}: momentum_form must be 'pytorch' or 'gluon', "
                         f"got {momentum_form!r}")
    if nesterov and isinstance(momentum, (int, float)) and momentum == 0:
        raise ValueError(f"{where}: nesterov=True needs momentum in (0, 1), got 0")
    damped = dampening is not None and not (
        isinstance(dampening, (int, float)) and dampening == 0)
    if damped:
        check_range("dampening", dampening, 0.0, 1.0, where=where)
        if momentum_form != "pytorch":
            raise ValueError(f"{where}: dampening is PyTorch's option; it needs "
                             f"momentum_form='pytorch', got {momentum_form!r}")
    parts = [_wd(weight_decay, where)]
    use_mom = not (isinstance(momentum, (int, float)) and momentum == 0)
    if momentum_form == "pytorch":
        if use_mom:
            parts.append(trace(momentum, nesterov, dampening))
        parts.append(scale_by_learning_rate(lr))
    else:
        parts.append(scale_by_learning_rate(lr))
        if use_mom:
            parts.append(trace(momentum, nesterov))
    opt = chain(*parts)
    if (momentum_form == "pytorch" and use_mom and not damped and _lr_fusable(lr)
            and _numbers(momentum, weight_decay)):
        opt = opt._replace(step=momentum_step(lr, momentum, weight_decay, nesterov))
    return opt


def momentum(lr: LR, momentum: float = 0.9, weight_decay: float = 0.0, *,
             momentum_form: str = "pytorch") -> GradientTransformation:
    """SGD with heavy-ball momentum: ``sgd(lr, momentum, ...)``."""
    return sgd(lr, momentum, False, weight_decay, momentum_form=momentum_form)


def nesterov(lr: LR, momentum: float = 0.9, weight_decay: float = 0.0, *,
             momentum_form: str = "pytorch") -> GradientTransformation:
    """SGD with Nesterov momentum: ``sgd(lr, momentum, nesterov=True, ...)``."""
    return sgd(lr, momentum, True, weight_decay, momentum_form=momentum_form)


def adagrad(lr: LR = 0.01, lr_decay: float = 0.0, weight_decay: float = 0.0,
            initial_accumulator_value: float = 0.0, eps: float = 1e-10
            ) -> GradientTransformation:
    """AdaGrad (PyTorch ``Adagrad``)::

        g <- g + wd p;  s += g^2;  p -= lr / (1 + t lr_decay) * g / (sqrt(s) + eps)

    ``eps`` outside the root (PyTorch, d2l); optax puts it inside.
    """
    where = "adagrad"
    check_lr(lr, where)
    check_range("lr_decay", lr_decay, 0.0, where=where)
    rate = lr
    if not (isinstance(lr_decay, (int, float)) and lr_decay == 0):
        base = lr
        rate = (lambda t: (base(t) if callable(base) else base) / (1.0 + t * lr_decay))
    return chain(_wd(weight_decay, where), scale_by_adagrad(initial_accumulator_value, eps),
                 scale_by_learning_rate(rate))


def rmsprop(lr: LR = 0.01, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False) -> GradientTransformation:
    """RMSProp (PyTorch ``RMSprop``)::

        g <- g + wd p;  s = alpha s + (1 - alpha) g^2
        centered: a = alpha a + (1 - alpha) g;  d = sqrt(s - a^2) + eps,  else d = sqrt(s) + eps
        momentum: b = mu b + g / d;  p -= lr b      else  p -= lr g / d

    ``eps`` outside the root (PyTorch, d2l); optax puts it inside and calls ``alpha`` decay.
    """
    where = "rmsprop"
    check_lr(lr, where)
    check_range("momentum", momentum, 0.0, 1.0, hi_open=True, where=where)
    parts = [_wd(weight_decay, where), scale_by_rms(alpha, eps, centered=centered)]
    if not (isinstance(momentum, (int, float)) and momentum == 0):
        parts.append(trace(momentum))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def adadelta(lr: LR | None = None, rho: float = 0.9, eps: float = 1e-6,
             weight_decay: float = 0.0) -> GradientTransformation:
    """AdaDelta (Zeiler 2012; PyTorch ``Adadelta``)::

        g <- g + wd p;  s = rho s + (1 - rho) g^2
        d = sqrt(D + eps) / sqrt(s + eps) * g;  D = rho D + (1 - rho) d^2;  p -= lr d

    Zeiler's AdaDelta has no learning rate: ``lr=None`` (default) means ``lr = 1``, as
    PyTorch's default; give ``lr`` for PyTorch's extra scale. ``eps`` inside both roots.
    """
    where = "adadelta"
    if lr is not None:
        check_lr(lr, where)
    return chain(_wd(weight_decay, where), scale_by_adadelta(rho, eps),
                 scale_by_learning_rate(1.0 if lr is None else lr))


def adam(lr: LR = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False) -> GradientTransformation:
    """Adam with bias correction (PyTorch ``Adam``), optional AMSGrad and coupled L2::

        g <- g + wd p   (coupled: the decay goes through Adam's scaling; prefer adamw)
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    See :func:`fdl.optim.scale_by_adam` for where ``eps`` sits and AMSGrad's maximum.
    """
    where = "adam"
    check_lr(lr, where)
    opt = chain(_wd(weight_decay, where), scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
                scale_by_learning_rate(lr))
    if not amsgrad and _lr_fusable(lr) and _numbers(b1, b2, eps, weight_decay):
        opt = opt._replace(step=adam_step(lr, b1, b2, eps, weight_decay, decoupled=False))
    return opt


def adamw(lr: LR = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2, amsgrad: bool = False, mask: Any = None
          ) -> GradientTransformation:
    """AdamW: Adam with *decoupled* weight decay (Loshchilov & Hutter; PyTorch ``AdamW``)::

        u = adam_direction(g) + wd * p   (on the leaves selected by ``mask``)
        p -= lr * u                      (PyTorch: p *= 1 - lr wd, then the Adam step)

    Order: :func:`scale_by_adam`, :func:`add_decayed_weights`, then the learning rate.
    Default ``weight_decay=1e-2`` as PyTorch (optax: 1e-4). ``mask`` None decays every leaf;
    ``mask="no_bias_norm"`` skips biases and norm scales/offsets; or a bool tree, a
    function of the params, a path pattern.
    """
    where = "adamw"
    check_lr(lr, where)
    check_range("weight_decay", weight_decay, 0.0, where=where)
    opt = chain(scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
                add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))
    if (not amsgrad and mask is None and _lr_fusable(lr)
            and _numbers(b1, b2, eps, weight_decay)):
        opt = opt._replace(step=adam_step(lr, b1, b2, eps, weight_decay, decoupled=True))
    return opt
