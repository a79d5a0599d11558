"""Building blocks: gradient transformations that compose with :func:`fdl.optim.chain`.

Every block is a :class:`~fdl.optim.GradientTransformation`. Hyperparameters are validated at
construction (``ValueError`` with the valid range); they may also be arrays (traced under
``jit`` when changed through :func:`inject_hyperparams`). Per-leaf arithmetic is done in each
leaf's dtype, so float32 parameters stay float32 even when float64 is enabled.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.nn.tree import path_mask
from fdl.optim.base import (
    EmptyState,
    GradientTransformation,
    MaskedNode,
    Schedule,
    check_lr,
    check_range,
    check_same_structure,
    safe_increment,
)

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

_tmap = jax.tree_util.tree_map


def _zeros_like(tree):
    return _tmap(jnp.zeros_like, tree)


def _c(x, dtype):
    """A hyperparameter as a scalar of ``dtype`` (Python numbers stay weakly typed)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    return jnp.asarray(x).astype(dtype)


def _static_zero(x) -> bool:
    """True only for a Python number equal to 0 (arrays may be injected later)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _count0():
    return jnp.zeros([], jnp.int32)


def _unzip(tree_of_tuples, like, n: int):
    """Split a tree whose leaves became ``n``-tuples into ``n`` trees shaped like ``like``."""
    treedef = jax.tree_util.tree_structure(like)
    leaves = treedef.flatten_up_to(tree_of_tuples)
    return tuple(jax.tree_util.tree_unflatten(treedef, [lf[i] for lf in leaves])
                 for i in range(n))


# ----------------------------------------------------------------------------- scaling


def scale(factor: float) -> GradientTransformation:
    """``u = factor * g`` (stateless)."""
    check_range("factor", factor, where="scale")

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        return _tmap(lambda g: g * _c(factor, g.dtype), grads), state

    return GradientTransformation(init, update)


class ScaleByLearningRateState(NamedTuple):
    """``count``: updates applied (int32); ``lr``: the learning rate the last update used."""

    count: jax.Array
    lr: jax.Array


def scale_by_learning_rate(lr: float | Schedule, *, flip_sign: bool = True
                           ) -> GradientTransformation:
    """``u = -lr(t) * g`` (``+`` with ``flip_sign=False``); ``lr`` a number or a schedule.

    The state records the step count and the learning rate last applied, so
    :func:`fdl.optim.current_lr` can read it for logging.
    """
    check_lr(lr, where="scale_by_learning_rate")
    sign = -1.0 if flip_sign else 1.0

    def value(count):
        v = lr(count) if callable(lr) else lr
        return jnp.asarray(v, dtype=float)

    def init(params):
        del params
        return ScaleByLearningRateState(_count0(), value(_count0()))

    def update(grads, state, params=None):
        del params
        if callable(lr) or not isinstance(lr, (int, float)):
            v = value(state.count)
            step = sign * v
        else:  # a Python constant: stays weakly typed, exact in every dtype
            v = state.lr
            step = sign * lr
        updates = _tmap(lambda g: g * _c(step, g.dtype), grads)
        return updates, ScaleByLearningRateState(safe_increment(state.count), v)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- momentum


class TraceState(NamedTuple):
    """``momentum``: the momentum buffer, one leaf per parameter."""

    momentum: Any


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum buffer ``b = decay * b + g``; ``u = b`` (or ``g + decay * b``).

    With ``nesterov``, ``u = g + decay * b`` (PyTorch's / Sutskever's Nesterov form). The
    buffer starts at zero, which equals PyTorch's ``b_1 = g_1`` (no dampening).
    Placed *before* ``scale_by_learning_rate`` this is PyTorch's SGD momentum; placed after
    it (accumulating ``-lr * g``), Gluon's / d2l's form ``v = mu v - lr g; w += v``.
    """
    check_range("momentum decay", decay, 0.0, 1.0, hi_open=True, where="trace")

    def init(params):
        return TraceState(_zeros_like(params))

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.momentum, "grads", "momentum buffer")

        def leaf(g, b):
            d = _c(decay, g.dtype)
            b = d * b + g
            return (g + d * b if nesterov else b), b

        out = _tmap(leaf, grads, state.momentum)
        updates, buf = _unzip(out, grads, 2)
        return updates, TraceState(buf)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- adaptive


class ScaleByAdamState(NamedTuple):
    """``count`` (int32), first/second moments ``mu``/``nu``, ``nu_max`` (AMSGrad, else None)."""

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def _check_betas(where: str, **betas) -> None:
    for name, b in betas.items():
        check_range(name, b, 0.0, 1.0, hi_open=True, where=where)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                  amsgrad: bool = False) -> GradientTransformation:
    """Adam's direction with bias correction (Kingma & Ba), in PyTorch's arithmetic::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  t = count + 1
        u = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``eps`` sits *outside* the square root, added to the bias-corrected ``sqrt(v_hat)``
    (PyTorch and optax; TensorFlow's Keras adds it to the uncorrected ``sqrt(v)``).
    AMSGrad keeps ``v_max = max(v_max, v)`` of the *uncorrected* ``v`` and uses it in place
    of ``v`` (PyTorch; optax takes the maximum of the corrected ``v_hat`` instead).
    """
    where = "scale_by_adam"
    _check_betas(where, b1=b1, b2=b2)
    check_range("eps", eps, 0.0, lo_open=True, where=where)

    def init(params):
        return ScaleByAdamState(_count0(), _zeros_like(params), _zeros_like(params),
                                _zeros_like(params) if amsgrad else None)

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.mu, "grads", "optimizer state")
        count = safe_increment(state.count)
        t = count.astype(float)
        bc1 = 1.0 - jnp.asarray(b1, float) ** t
        bc2 = 1.0 - jnp.asarray(b2, float) ** t
        inv_bc1 = 1.0 / bc1
        inv_sqrt_bc2 = 1.0 / jnp.sqrt(bc2)

        def leaf(g, m, v, vmax=None):
            dt = g.dtype
            m = m + (1 - _c(b1, dt)) * (g - m)  # = b1 m + (1 - b1) g, as PyTorch's lerp
            v = _c(b2, dt) * v + (1 - _c(b2, dt)) * (g * g)
            vv = v
            if vmax is not None:
                vmax = jnp.maximum(vmax, v)
                vv = vmax
            u = (m * inv_bc1.astype(dt)) / (jnp.sqrt(vv) * inv_sqrt_bc2.astype(dt)
                                            + _c(eps, dt))
            return (u, m, v, vmax) if vmax is not None else (u, m, v)

        if amsgrad:
            out = _tmap(leaf, grads, state.mu, state.nu, state.nu_max)
            u, mu, nu, nu_max = _unzip(out, grads, 4)
        else:
            out = _tmap(leaf, grads, state.mu, state.nu)
            (u, mu, nu), nu_max = _unzip(out, grads, 3), None
        return u, ScaleByAdamState(count, mu, nu, nu_max)

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    """``nu``: running mean of ``g^2``; ``mu``: running mean of ``g`` (centered, else None)."""

    nu: Any
    mu: Any


def scale_by_rms(alpha: float = 0.99, eps: float = 1e-8, *, centered: bool = False
                 ) -> GradientTransformation:
    """RMSProp's direction (Tieleman & Hinton), PyTorch's arithmetic::

        s = alpha s + (1 - alpha) g^2;       u = g / (sqrt(s) + eps)
        centered: a = alpha a + (1 - alpha) g;  u = g / (sqrt(s - a^2) + eps)

    ``eps`` outside the root, state starting at 0 (PyTorch; optax puts ``eps`` inside the
    root; d2l's ``rmsprop`` adds it outside as here). ``alpha`` is d2l's ``gamma``.
    """
    where = "scale_by_rms"
    check_range("alpha", alpha, 0.0, 1.0, hi_open=True, where=where)
    check_range("eps", eps, 0.0, lo_open=True, where=where)

    def init(params):
        return ScaleByRmsState(_zeros_like(params), _zeros_like(params) if centered else None)

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.nu, "grads", "optimizer state")

        def leaf(g, s, a=None):
            dt = g.dtype
            al = _c(alpha, dt)
            s = al * s + (1 - al) * (g * g)
            if a is not None:
                a = a + (1 - al) * (g - a)  # PyTorch's lerp: fewer roundings in s - a^2
                return g / (jnp.sqrt(s - a * a) + _c(eps, dt)), s, a
            return g / (jnp.sqrt(s) + _c(eps, dt)), s

        if centered:
            u, nu, mu = _unzip(_tmap(leaf, grads, state.nu, state.mu), grads, 3)
        else:
            (u, nu), mu = _unzip(_tmap(leaf, grads, state.nu), grads, 2), None
        return u, ScaleByRmsState(nu, mu)

    return GradientTransformation(init, update)


class ScaleByAdagradState(NamedTuple):
    """``sum_of_squares``: the running sum of ``g^2``."""

    sum_of_squares: Any


def scale_by_adagrad(initial_accumulator_value: float = 0.0, eps: float = 1e-10
                     ) -> GradientTransformation:
    """AdaGrad's direction (Duchi et al.): ``s += g^2;  u = g / (sqrt(s) + eps)``.

    ``eps`` outside the root as PyTorch (default 1e-10) and d2l (1e-6); optax puts it
    inside (``rsqrt(s + eps)``).
    """
    where = "scale_by_adagrad"
    check_range("initial_accumulator_value", initial_accumulator_value, 0.0, where=where)
    check_range("eps", eps, 0.0, lo_open=True, where=where)

    def init(params):
        return ScaleByAdagradState(_tmap(
            lambda p: jnp.full_like(p, initial_accumulator_value), params))

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.sum_of_squares, "grads", "optimizer state")

        def leaf(g, s):
            s = s + g * g
            return g / (jnp.sqrt(s) + _c(eps, g.dtype)), s

        u, s = _unzip(_tmap(leaf, grads, state.sum_of_squares), grads, 2)
        return u, ScaleByAdagradState(s)

    return GradientTransformation(init, update)


class ScaleByAdadeltaState(NamedTuple):
    """``sq_avg``: running mean of ``g^2``; ``delta_avg``: running mean of the squared steps."""

    sq_avg: Any
    delta_avg: Any


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> GradientTransformation:
    """AdaDelta's step (Zeiler), without a learning rate::

        s = rho s + (1 - rho) g^2;  d = sqrt(D + eps) / sqrt(s + eps) * g
        D = rho D + (1 - rho) d^2;  u = d

    ``eps`` inside both roots (Zeiler, PyTorch, d2l). PyTorch multiplies ``d`` by an extra
    ``lr`` (default 1.0): chain with :func:`scale_by_learning_rate` for that.
    """
    where = "scale_by_adadelta"
    check_range("rho", rho, 0.0, 1.0, where=where)
    check_range("eps", eps, 0.0, lo_open=True, where=where)

    def init(params):
        return ScaleByAdadeltaState(_zeros_like(params), _zeros_like(params))

    def update(grads, state, params=None):
        del params
        check_same_structure(grads, state.sq_avg, "grads", "optimizer state")

        def leaf(g, s, dsum):
            dt = g.dtype
            r, e = _c(rho, dt), _c(eps, dt)
            s = r * s + (1 - r) * (g * g)
            d = jnp.sqrt(dsum + e) / jnp.sqrt(s + e) * g
            dsum = r * dsum + (1 - r) * (d * d)
            return d, s, dsum

        u, s, dsum = _unzip(_tmap(leaf, grads, state.sq_avg, state.delta_avg), grads, 3)
        return u, ScaleByAdadeltaState(s, dsum)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- weight decay

_NO_DECAY_SUFFIXES = ("b", "offset", "scale")


def no_bias_norm_mask(params) -> Any:
    """A bool tree, False for biases and norm parameters (paths ending in ``b``/``offset``/
    ``scale``), True elsewhere: the usual "no weight decay on biases and norms" mask."""
    return path_mask(params, lambda p: p.rsplit("/", 1)[-1] not in _NO_DECAY_SUFFIXES)


def _resolve_mask(mask, tree):
    """``mask`` (None, bool tree, ``params -> bool tree``, path pattern, ``"no_bias_norm"``)
    to a bool tree shaped like ``tree``; None means all True."""
    if mask is None:
        return _tmap(lambda _: True, tree)
    if isinstance(mask, str):
        if mask == "no_bias_norm":
            return no_bias_norm_mask(tree)
        return path_mask(tree, mask)
    if callable(mask):
        mask = mask(tree)
    check_same_structure(mask, tree, "mask", "params", check_shapes=False)
    return mask


def add_decayed_weights(weight_decay: float, mask: Any = None) -> GradientTransformation:
    """``u = g + weight_decay * p`` on the leaves selected by ``mask`` (needs ``params``).

    Before the learning-rate scaling and any adaptive scaling this is *coupled* L2
    regularisation (Gluon's ``wd``, PyTorch's ``weight_decay`` in SGD/Adam); placed after
    Adam's scaling (``adamw``) it is *decoupled* weight decay (Loshchilov & Hutter).
    ``mask``: None (decay everything), a bool tree, a function ``params -> bool tree``, a
    path pattern selecting the decayed leaves, or ``"no_bias_norm"`` (skip paths ending in
    ``b``, ``offset``, ``scale``; see :func:`no_bias_norm_mask`).
    """
    check_range("weight_decay", weight_decay, 0.0, where="add_decayed_weights")

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        if _static_zero(weight_decay):
            return grads, state
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        check_same_structure(grads, params)
        m = _resolve_mask(mask, params)
        out = _tmap(lambda g, p, f: g + _c(weight_decay, g.dtype) * p if f else g,
                    grads, params, m)
        return out, state

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- clipping


def global_norm(tree) -> jax.Array:
    """``sqrt(sum of squares of every leaf)``, accumulated in at least float32."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    sq = [jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))
          for x in leaves]
    return jnp.sqrt(sum(sq[1:], sq[0]))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale all gradients together so their global L2 norm is at most ``max_norm``::

        n = sqrt(sum_i ||g_i||^2);  u = g * min(1, max_norm / n)

    d2l's ``grad_clipping(net, theta)``. PyTorch's ``clip_grad_norm_`` divides by
    ``n + 1e-6`` instead of ``n``. Inside :func:`multi_steps`, it sees the accumulated gradient.
    """
    check_range("max_norm", max_norm, 0.0, lo_open=True, where="clip_by_global_norm")

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        n = global_norm(grads)
        factor = jnp.where(n > max_norm, max_norm / jnp.where(n > 0, n, 1.0), 1.0)
        return _tmap(lambda g: g * factor.astype(g.dtype), grads), state

    return GradientTransformation(init, update)


def clip_by_value(lo: float, hi: float | None = None) -> GradientTransformation:
    """Clip every gradient element to ``[lo, hi]``; ``clip_by_value(c)`` clips to ``[-c, c]``
    (PyTorch ``clip_grad_value_(c)``)."""
    if hi is None:
        check_range("clip value", lo, 0.0, lo_open=True, where="clip_by_value")
        lo, hi = -lo, lo
    check_range("lo", lo, where="clip_by_value")
    check_range("hi", hi, where="clip_by_value")
    if lo > hi:
        raise ValueError(f"clip_by_value: need lo <= hi, got lo={lo}, hi={hi}")

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        return _tmap(lambda g: jnp.clip(g, _c(lo, g.dtype), _c(hi, g.dtype)), grads), state

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- masking


class MaskedState(NamedTuple):
    """The inner transformation's state, over the masked leaves only."""

    inner_state: Any


def _hide(tree, mask):
    return _tmap(lambda x, f: x if f else MaskedNode(), tree, mask)


def masked(inner: GradientTransformation, mask: Any) -> GradientTransformation:
    """Apply ``inner`` only to the leaves selected by ``mask``; the others pass unchanged.

    ``mask`` as in :func:`add_decayed_weights` (bool tree, function of the params, path
    pattern such as ``"head/*"``). ``inner`` keeps state only for the selected leaves.
    """

    def init(params):
        m = _resolve_mask(mask, params)
        return MaskedState(inner.init(_hide(params, m)))

    def update(grads, state, params=None):
        m = _resolve_mask(mask, params if params is not None and callable(mask) else grads)
        check_same_structure(m, grads, "mask", "grads", check_shapes=False)
        sub_p = None if params is None else _hide(params, m)
        sub_u, inner_state = inner.update(_hide(grads, m), state.inner_state, sub_p)
        treedef = jax.tree_util.tree_structure(grads)
        g_leaves = treedef.flatten_up_to(grads)
        flags = treedef.flatten_up_to(m)
        u_leaves = jax.tree_util.tree_leaves(
            sub_u, is_leaf=lambda x: isinstance(x, MaskedNode))
        out = [u if f else g for g, u, f in zip(g_leaves, u_leaves, flags, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out), MaskedState(inner_state)

    return GradientTransformation(init, update)


def freeze(pattern: Any) -> GradientTransformation:
    """Zero the updates of the leaves whose path matches ``pattern`` (stateless).

    Fine-tuning with a frozen backbone: ``chain(masked(adam(1e-3), "head"), freeze("backbone"))``
    keeps no optimizer state for the frozen leaves; ``chain(adam(1e-3), freeze("backbone"))``
    is simpler but keeps it. ``pattern`` as :func:`fdl.nn.tree.path_mask` (or a bool tree).
    """

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        m = _resolve_mask(pattern, grads)
        return _tmap(lambda g, f: jnp.zeros_like(g) if f else g, grads, m), state

    return GradientTransformation(init, update)


def scale_by_path(factors: Mapping[str, float] | Sequence[tuple[str, float]],
                  default: float = 1.0) -> GradientTransformation:
    """Multiply each leaf's update by the factor of the first path pattern it matches.

    Per-layer learning-rate multipliers: ``chain(sgd(0.01, 0.9), scale_by_path({"head": 10.}))``
    trains the head at 10x the backbone's rate (PyTorch: two param groups). Patterns as
    :func:`fdl.nn.tree.path_mask`; unmatched leaves get ``default``.
    """
    items = list(factors.items()) if isinstance(factors, Mapping) else list(factors)
    for pat, f in items:
        check_range(f"factor for {pat!r}", f, 0.0, where="scale_by_path")
    check_range("default", default, 0.0, where="scale_by_path")

    def leaf_factors(tree):
        treedef = jax.tree_util.tree_structure(tree)
        out: list[Any] = [None] * treedef.num_leaves
        for pat, f in items:
            hits = treedef.flatten_up_to(path_mask(tree, pat))
            out = [f if cur is None and hit else cur for cur, hit in zip(out, hits, strict=True)]
        return jax.tree_util.tree_unflatten(
            treedef, [default if cur is None else cur for cur in out])

    def init(params):
        del params
        return EmptyState()

    def update(grads, state, params=None):
        del params
        fs = leaf_factors(grads)
        return _tmap(lambda g, f: g if f == 1.0 else g * _c(f, g.dtype), grads, fs), state

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- accumulation


class MultiStepsState(NamedTuple):
    """``mini_step`` in ``[0, k)``; ``count``: inner updates made; ``acc``: gradient sum."""

    mini_step: jax.Array
    count: jax.Array
    acc: Any
    inner_state: Any


def multi_steps(inner: GradientTransformation, every_k: int) -> GradientTransformation:
    """Gradient accumulation over ``every_k`` micro-batches.

    Each call adds ``g`` to an accumulator and returns zero updates, except every
    ``every_k``-th call, which feeds the *mean* accumulated gradient to ``inner`` (so clipping
    inside ``inner`` applies to the accumulated gradient) and returns its updates. With equal
    micro-batches and a mean loss, this equals one step on the whole batch.
    """
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"multi_steps: every_k must be an int >= 1, got {every_k!r}")

    def init(params):
        return MultiStepsState(_count0(), _count0(), _zeros_like(params), inner.init(params))

    def update(grads, state, params=None):
        check_same_structure(grads, state.acc, "grads", "accumulator")
        acc = _tmap(lambda a, g: a + g, state.acc, grads)
        last = state.mini_step == every_k - 1

        def emit(_):
            mean = _tmap(lambda a: a / _c(every_k, a.dtype), acc)
            u, s = inner.update(mean, state.inner_state, params)
            return u, s, _zeros_like(acc), _count0(), safe_increment(state.count)

        def hold(_):
            return (_zeros_like(grads), state.inner_state, acc,
                    safe_increment(state.mini_step), state.count)

        u, s, new_acc, mini, count = jax.lax.cond(last, emit, hold, None)
        return u, MultiStepsState(mini, count, new_acc, s)

    return GradientTransformation(init, update)


# ----------------------------------------------------------------------------- injection


class InjectHyperparamsState(NamedTuple):
    """``count`` (int32), ``hyperparams`` (name -> scalar array), the inner state."""

    count: jax.Array
    hyperparams: dict[str, jax.Array]
    inner_state: Any


def inject_hyperparams(factory: Callable[..., GradientTransformation],
                       static_args: Sequence[str] = ()) -> Callable[..., GradientTransformation]:
    """Wrap an optimizer factory so its numeric hyperparameters live in the state.

    ``opt = inject_hyperparams(adam)(lr=1e-3, b1=0.9)``: every int/float argument becomes a
    scalar array in ``state.hyperparams`` that :func:`set_hyperparams` changes between steps
    without recompiling a jitted step; callable arguments are schedules evaluated at the step
    count. Bools, strings, None and the names in ``static_args`` stay fixed.
    """
    sig = inspect.signature(factory)
    static_args = set(static_args)

    def build(*args, **kwargs) -> GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        static, numeric, scheds = {}, {}, {}
        for name, v in bound.arguments.items():
            if name in static_args or v is None or isinstance(v, (bool, str)):
                static[name] = v
            elif callable(v):
                scheds[name] = v
            elif isinstance(v, (int, float)) or (hasattr(v, "dtype") and jnp.ndim(v) == 0):
                numeric[name] = v
            else:
                static[name] = v
        factory(**bound.arguments)  # validate the initial values now

        def hp_at(count, stored):
            hps = dict(stored)
            for name, s in scheds.items():
                hps[name] = jnp.asarray(s(count), dtype=float)
            return hps

        def init(params):
            hps = {n: jnp.asarray(v, dtype=float) for n, v in numeric.items()}
            hps = hp_at(_count0(), hps)
            inner = factory(**static, **hps)
            return InjectHyperparamsState(_count0(), hps, inner.init(params))

        def update(grads, state, params=None):
            hps = hp_at(state.count, state.hyperparams)
            inner = factory(**static, **hps)
            u, s = inner.update(grads, state.inner_state, params)
            return u, InjectHyperparamsState(safe_increment(state.count), hps, s)

        return GradientTransformation(init, update)

    return build


def _replace_inject(state, fn):
    if isinstance(state, InjectHyperparamsState):
        return fn(state), True
    if isinstance(state, tuple):
        parts, hit = [], False
        for s in state:
            s2, h = (s, False) if hit else _replace_inject(s, fn)
            parts.append(s2)
            hit |= h
        return (type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)), hit
    return state, False


def set_hyperparams(opt_state, **values) -> Any:
    """A copy of ``opt_state`` with the injected hyperparameters ``values`` replaced.

    Values keep the stored dtype and shape, so a jitted step does not recompile. Names that
    were not injected, and negative or non-finite learning rates, raise ``ValueError``.
    """
    def fn(s: InjectHyperparamsState):
        hps = dict(s.hyperparams)
        for name, v in values.items():
            if name not in hps:
                raise ValueError(f"set_hyperparams: {name!r} is not an injected hyperparameter; "
                                 f"injected: {sorted(hps)}")
            if name in ("lr", "learning_rate"):
                check_range(name, v, 0.0, where="set_hyperparams")
            hps[name] = jnp.asarray(v, dtype=hps[name].dtype).reshape(hps[name].shape)
        return s._replace(hyperparams=hps)

    new, hit = _replace_inject(opt_state, fn)
    if not hit:
        raise ValueError("set_hyperparams: no inject_hyperparams state found in opt_state")
    return new


# ----------------------------------------------------------------------------- non-finite


class SkipNonfiniteState(NamedTuple):
    """``skipped``: steps skipped for NaN/Inf gradients (int32); the inner state."""

    skipped: jax.Array
    inner_state: Any


def skip_nonfinite(inner: GradientTransformation) -> GradientTransformation:
    """Skip steps whose gradients contain NaN or Inf: zero updates, inner state unchanged,
    ``skipped`` incremented. Otherwise exactly ``inner``."""

    def init(params):
        return SkipNonfiniteState(_count0(), inner.init(params))

    def update(grads, state, params=None):
        leaves = jax.tree_util.tree_leaves(grads)
        ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in leaves])) if leaves \
            else jnp.asarray(True)

        def step(_):
            u, s = inner.update(grads, state.inner_state, params)
            return u, s, state.skipped

        def skip(_):
            return _zeros_like(grads), state.inner_state, safe_increment(state.skipped)

        u, s, skipped = jax.lax.cond(ok, step, skip, None)
        return u, SkipNonfiniteState(skipped, s)

    return GradientTransformation(init, update)

