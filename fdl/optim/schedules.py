"""Learning-rate schedules: pure functions ``step -> value``.

``step`` is the number of updates already applied (0 for the first update), a Python int or an
int32 array (traced under ``jit``: schedules use only ``jnp`` operations, so a changing
learning rate never recompiles). Values come back as scalar arrays of the default float dtype.

Conventions are PyTorch's ``torch.optim.lr_scheduler`` where an equivalent exists (named in
each docstring); its "epoch" is our ``step`` when the scheduler is stepped once per update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

from fdl.optim.base import Schedule, check_range

__all__ = [
    "constant_schedule",
    "piecewise_constant_schedule",
    "step_schedule",
    "multi_factor_schedule",
    "exponential_decay",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "linear_schedule",
    "inverse_sqrt_schedule",
    "polynomial_schedule",
    "one_cycle_schedule",
    "join_schedules",
]


def _t(step):
    return jnp.asarray(step, dtype=float)


def _f(x):
    return jnp.asarray(x, dtype=float)


def _check_steps(name: str, value, where: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        rng = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{where}: {name} must be an int {rng}, got {value!r}")
    return value


def constant_schedule(value: float) -> Schedule:
    """``lr(t) = value``."""
    check_range("value", value, 0.0, where="constant_schedule")
    return lambda step: jnp.broadcast_to(_f(value), jnp.shape(step))


def piecewise_constant_schedule(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    """``values[i]`` for ``boundaries[i-1] <= t < boundaries[i]`` (``len(values) = len(b)+1``).

    Gluon's "decay by 0.1 after epoch 2" with ``n`` steps per epoch:
    ``piecewise_constant_schedule([2 * n], [lr, 0.1 * lr])``.
    """
    where = "piecewise_constant_schedule"
    boundaries = [_check_steps("boundary", b, where, True) for b in boundaries]
    if any(b1 <= b0 for b0, b1 in zip(boundaries, boundaries[1:], strict=False)):
        raise ValueError(f"{where}: boundaries must be strictly increasing, got {boundaries}")
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"{where}: need len(values) == len(boundaries) + 1 = "
                         f"{len(boundaries) + 1}, got {len(values)}")
    for v in values:
        check_range("value", v, 0.0, where=where)
    b = jnp.asarray(boundaries, dtype=jnp.int32)
    vals = _f(list(values))

    def schedule(step):
        idx = jnp.sum(jnp.asarray(step)[..., None] >= b, axis=-1)
        return vals[idx]

    return schedule


def step_schedule(init_value: float, step_size: int, factor: float = 0.1) -> Schedule:
    """``lr(t) = init * factor ** floor(t / step_size)``.

    PyTorch ``StepLR(step_size, gamma=factor)``; Gluon ``FactorScheduler(step, factor)``.
    """
    where = "step_schedule"
    check_range("init_value", init_value, 0.0, where=where)
    _check_steps("step_size", step_size, where)
    check_range("factor", factor, 0.0, where=where)
    return lambda step: _f(init_value) * _f(factor) ** jnp.floor_divide(
        jnp.asarray(step), step_size).astype(float)


def multi_factor_schedule(init_value: float, milestones: Sequence[int],
                          factor: float = 0.1) -> Schedule:
    """``lr(t) = init * factor ** (number of milestones <= t)``.

    PyTorch ``MultiStepLR(milestones, gamma=factor)``; Gluon ``MultiFactorScheduler``.
    """
    where = "multi_factor_schedule"
    check_range("init_value", init_value, 0.0, where=where)
    check_range("factor", factor, 0.0, where=where)
    ms = [_check_steps("milestone", m, where, True) for m in milestones]
    if any(m1 <= m0 for m0, m1 in zip(ms, ms[1:], strict=False)):
        raise ValueError(f"{where}: milestones must be strictly increasing, got {ms}")
    m = jnp.asarray(ms, dtype=jnp.int32)

    def schedule(step):
        n = jnp.sum(jnp.asarray(step)[..., None] >= m, axis=-1)
        return _f(init_value) * _f(factor) ** n.astype(float)

    return schedule


def exponential_decay(init_value: float, decay_rate: float, transition_steps: int = 1, *,
                      staircase: bool = False, transition_begin: int = 0,
                      end_value: float | None = None) -> Schedule:
    """``lr(t) = init * decay_rate ** ((t - begin) / transition_steps)`` (``t >= begin``).

    ``staircase`` floors the exponent; ``end_value`` bounds the value (below for decay, above
    for growth). PyTorch ``ExponentialLR(gamma)`` is ``transition_steps=1``.
    """
    where = "exponential_decay"
    check_range("init_value", init_value, 0.0, where=where)
    check_range("decay_rate", decay_rate, 0.0, lo_open=True, where=where)
    _check_steps("transition_steps", transition_steps, where)
    _check_steps("transition_begin", transition_begin, where, True)

    def schedule(step):
        t = jnp.maximum(_t(step) - transition_begin, 0.0) / transition_steps
        if staircase:
            t = jnp.floor(t)
        v = _f(init_value) * _f(decay_rate) ** t
        if end_value is not None:
            v = jnp.maximum(v, end_value) if decay_rate < 1 else jnp.minimum(v, end_value)
        return v

    return schedule


def cosine_decay_schedule(init_value: float, decay_steps: int, end_value: float = 0.0
                          ) -> Schedule:
    """``lr(t) = end + (init - end) * (1 + cos(pi * min(t, T) / T)) / 2``, ``T = decay_steps``.

    PyTorch ``CosineAnnealingLR(T_max=T, eta_min=end)`` for ``t <= T`` (after ``T`` PyTorch
    rises again; this schedule stays at ``end``).
    """
    where = "cosine_decay_schedule"
    check_range("init_value", init_value, 0.0, where=where)
    check_range("end_value", end_value, 0.0, where=where)
    _check_steps("decay_steps", decay_steps, where)

    def schedule(step):
        t = jnp.minimum(_t(step), decay_steps)
        return end_value + (init_value - end_value) * 0.5 * (1 + jnp.cos(math.pi * t / decay_steps))

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int,
                    transition_begin: int = 0) -> Schedule:
    """Linear from ``init`` (until ``transition_begin``) to ``end`` over ``transition_steps``.

    PyTorch ``LinearLR(start_factor=init/base, end_factor=end/base, total_iters=T)``.
    """
    where = "linear_schedule"
    check_range("init_value", init_value, 0.0, where=where)
    check_range("end_value", end_value, 0.0, where=where)
    _check_steps("transition_steps", transition_steps, where)
    _check_steps("transition_begin", transition_begin, where, True)

    def schedule(step):
        frac = jnp.clip((_t(step) - transition_begin) / transition_steps, 0.0, 1.0)
        return init_value + (end_value - init_value) * frac

    return schedule


def warmup_cosine_decay_schedule(init_value: float, peak_value: float, warmup_steps: int,
                                 decay_steps: int, end_value: float = 0.0) -> Schedule:
    """Linear warm-up ``init -> peak`` over ``warmup_steps``, then cosine ``peak -> end``.

    ``decay_steps`` counts the whole schedule including the warm-up (as optax); the cosine
    part lasts ``decay_steps - warmup_steps`` steps.
    """
    where = "warmup_cosine_decay_schedule"
    check_range("peak_value", peak_value, 0.0, where=where)
    _check_steps("warmup_steps", warmup_steps, where, True)
    _check_steps("decay_steps", decay_steps, where)
    if decay_steps <= warmup_steps:
        raise ValueError(f"{where}: decay_steps ({decay_steps}) must exceed warmup_steps "
                         f"({warmup_steps})")
    cos = cosine_decay_schedule(peak_value, decay_steps - warmup_steps, end_value)
    if warmup_steps == 0:
        return cos
    warm = linear_schedule(init_value, peak_value, warmup_steps)
    return join_schedules([warm, cos], [warmup_steps])


def inverse_sqrt_schedule(peak_value: float, warmup_steps: int) -> Schedule:
    """Transformer schedule: ``lr(t) = peak * min((t+1) / w, sqrt(w / (t+1)))``, ``w = warmup``.

    Vaswani et al.'s ``d**-0.5 * min(s**-0.5, s * w**-1.5)`` with ``s = t + 1`` is
    ``peak = d**-0.5 * w**-0.5``.
    """
    where = "inverse_sqrt_schedule"
    check_range("peak_value", peak_value, 0.0, where=where)
    _check_steps("warmup_steps", warmup_steps, where)

    def schedule(step):
        s = _t(step) + 1.0
        return peak_value * jnp.minimum(s / warmup_steps, jnp.sqrt(warmup_steps / s))

    return schedule


def polynomial_schedule(init_value: float, end_value: float, power: float,
                        transition_steps: int, transition_begin: int = 0) -> Schedule:
    """``lr(t) = end + (init - end) * (1 - min(t', T) / T) ** power``, ``t' = t - begin``.

    PyTorch ``PolynomialLR(total_iters=T, power)`` is ``end_value=0``.
    """
    where = "polynomial_schedule"
    check_range("init_value", init_value, 0.0, where=where)
    check_range("end_value", end_value, 0.0, where=where)
    check_range("power", power, 0.0, lo_open=True, where=where)
    _check_steps("transition_steps", transition_steps, where)
    _check_steps("transition_begin", transition_begin, where, True)

    def schedule(step):
        t = jnp.clip(_t(step) - transition_begin, 0.0, transition_steps)
        return end_value + (init_value - end_value) * (1.0 - t / transition_steps) ** power

    return schedule


def one_cycle_schedule(transition_steps: int, peak_value: float, pct_start: float = 0.3,
                       div_factor: float = 25.0, final_div_factor: float = 1e4,
                       anneal_strategy: str = "cos") -> Schedule:
    """Smith's one-cycle policy, as PyTorch ``OneCycleLR`` (two phases, ``three_phase=False``).

    Starts at ``peak / div_factor``, anneals up to ``peak`` until step
    ``pct_start * T - 1``, then down to ``peak / (div_factor * final_div_factor)`` at step
    ``T - 1`` (``T = transition_steps``). ``anneal_strategy`` is ``"cos"`` or ``"linear"``.
    """
    where = "one_cycle_schedule"
    _check_steps("transition_steps", transition_steps, where)
    check_range("peak_value", peak_value, 0.0, where=where)
    check_range("pct_start", pct_start, 0.0, 1.0, lo_open=True, hi_open=True, where=where)
    check_range("div_factor", div_factor, 0.0, lo_open=True, where=where)
    check_range("final_div_factor", final_div_factor, 0.0, lo_open=True, where=where)
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"{where}: anneal_strategy must be 'cos' or 'linear', "
                         f"got {anneal_strategy!r}")
    initial = peak_value / div_factor
    final = initial / final_div_factor
    end1 = float(pct_start * transition_steps) - 1.0
    end2 = float(transition_steps - 1)
    if not 0 < end1 < end2:
        raise ValueError(f"{where}: pct_start * transition_steps - 1 = {end1} must lie in "
                         f"(0, {end2}); use more steps or another pct_start")

    def anneal(start, end, pct):
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (jnp.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(step):
        t = jnp.minimum(_t(step), end2)
        up = anneal(initial, peak_value, jnp.clip(t / end1, 0.0, 1.0))
        down = anneal(peak_value, final, jnp.clip((t - end1) / (end2 - end1), 0.0, 1.0))
        return jnp.where(t <= end1, up, down)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedule ``i`` on ``[boundaries[i-1], boundaries[i])``, fed ``t - boundaries[i-1]``.

    PyTorch ``SequentialLR(schedulers, milestones=boundaries)``.
    """
    where = "join_schedules"
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(f"{where}: need len(schedules) == len(boundaries) + 1, got "
                         f"{len(schedules)} and {len(boundaries)}")
    bs = [_check_steps("boundary", b, where, True) for b in boundaries]
    if any(b1 <= b0 for b0, b1 in zip(bs, bs[1:], strict=False)):
        raise ValueError(f"{where}: boundaries must be strictly increasing, got {bs}")

    def schedule(step):
        step = jnp.asarray(step)
        out = _f(schedules[0](step))
        for b, s in zip(bs, schedules[1:], strict=True):
            out = jnp.where(step >= b, _f(s(step - b)), out)
        return out

    return schedule
