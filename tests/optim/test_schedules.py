"""Schedules: hand-computed golden values, torch.optim.lr_scheduler equality, jit, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdl.optim as fo

GOLDEN = [
    (fo.constant_schedule(0.3), {0: 0.3, 7: 0.3}),
    (fo.piecewise_constant_schedule([2, 5], [1.0, 0.1, 0.01]),
     {0: 1.0, 1: 1.0, 2: 0.1, 4: 0.1, 5: 0.01, 100: 0.01}),
    (fo.step_schedule(0.5, 3, 0.1), {0: 0.5, 2: 0.5, 3: 0.05, 6: 0.005}),
    (fo.multi_factor_schedule(1.0, [2, 5], 0.5), {0: 1.0, 1: 1.0, 2: 0.5, 4: 0.5, 5: 0.25}),
    (fo.exponential_decay(2.0, 0.5, 2), {0: 2.0, 1: 2.0 * 0.5 ** 0.5, 2: 1.0, 4: 0.5}),
    (fo.exponential_decay(2.0, 0.5, 2, staircase=True, end_value=0.3),
     {1: 2.0, 3: 1.0, 4: 0.5, 100: 0.3}),
    (fo.exponential_decay(1.0, 0.5, transition_begin=3), {0: 1.0, 3: 1.0, 4: 0.5}),
    (fo.cosine_decay_schedule(1.0, 10, 0.1), {0: 1.0, 5: 0.55, 10: 0.1, 20: 0.1}),
    (fo.warmup_cosine_decay_schedule(0.0, 1.0, 4, 14, 0.0),
     {0: 0.0, 2: 0.5, 4: 1.0, 9: 0.5, 14: 0.0, 30: 0.0}),
    (fo.linear_schedule(1.0, 0.0, 4, transition_begin=2), {0: 1.0, 2: 1.0, 3: 0.75, 6: 0.0}),
    (fo.inverse_sqrt_schedule(1.0, 4), {0: 0.25, 3: 1.0, 15: 0.5, 63: 0.25}),
    (fo.polynomial_schedule(1.0, 0.0, 2.0, 4), {0: 1.0, 2: 0.25, 3: 0.0625, 4: 0.0, 9: 0.0}),
    (fo.polynomial_schedule(1.0, 0.5, 1.0, 4, transition_begin=1), {1: 1.0, 3: 0.75, 5: 0.5}),
    # T = 10, pct 0.3: phase ends at steps 2 (peak) and 9 (min = 1/25/1e4)
    (fo.one_cycle_schedule(10, 1.0), {0: 0.04, 1: 0.52, 2: 1.0, 9: 4e-6,
                                      5: 4e-6 + (1 - 4e-6) / 2 * (math.cos(math.pi * 3 / 7) + 1)}),
    (fo.one_cycle_schedule(10, 1.0, anneal_strategy="linear"), {1: 0.52, 2: 1.0, 9: 4e-6}),
    (fo.join_schedules([fo.constant_schedule(1.0), fo.linear_schedule(1.0, 0.0, 2)], [3]),
     {2: 1.0, 3: 1.0, 4: 0.5, 5: 0.0, 50: 0.0}),
]


@pytest.mark.parametrize("case", range(len(GOLDEN)))
def test_golden_values(case):
    sched, values = GOLDEN[case]
    for step, want in values.items():
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-12, atol=1e-15,
                                   err_msg=f"step {step}")
        # the same under jit with a traced int32 step
        got = jax.jit(sched)(jnp.asarray(step, jnp.int32))
        np.testing.assert_allclose(float(got), want, rtol=1e-12, atol=1e-15)


torch = pytest.importorskip("torch")


def torch_lrs(make_sched, n, base_lr=1.0):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = make_sched(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.asarray(out)


S = torch.optim.lr_scheduler
TORCH_CASES = {
    "step": (fo.step_schedule(0.5, 7, 0.3), lambda o: S.StepLR(o, 7, gamma=0.3), 0.5),
    "multistep": (fo.multi_factor_schedule(0.5, [5, 12, 30], 0.2),
                  lambda o: S.MultiStepLR(o, [5, 12, 30], gamma=0.2), 0.5),
    "exponential": (fo.exponential_decay(0.5, 0.95), lambda o: S.ExponentialLR(o, 0.95), 0.5),
    "cosine": (fo.cosine_decay_schedule(0.5, 40, 0.01),
               lambda o: S.CosineAnnealingLR(o, 40, eta_min=0.01), 0.5),
    "linear": (fo.linear_schedule(0.25, 0.45, 20),
               lambda o: S.LinearLR(o, start_factor=0.5, end_factor=0.9, total_iters=20), 0.5),
    "polynomial": (fo.polynomial_schedule(0.5, 0.0, 2.0, 30),
                   lambda o: S.PolynomialLR(o, total_iters=30, power=2.0), 0.5),
    "one_cycle_cos": (fo.one_cycle_schedule(50, 0.8),
                      lambda o: S.OneCycleLR(o, max_lr=0.8, total_steps=50,
                                             cycle_momentum=False), 0.8),
    "one_cycle_linear": (fo.one_cycle_schedule(50, 0.8, 0.25, 10.0, 100.0, "linear"),
                         lambda o: S.OneCycleLR(o, max_lr=0.8, total_steps=50, pct_start=0.25,
                                                div_factor=10.0, final_div_factor=100.0,
                                                anneal_strategy="linear",
                                                cycle_momentum=False), 0.8),
    "sequential": (fo.join_schedules([fo.linear_schedule(0.05, 0.5, 10),
                                      fo.exponential_decay(0.5, 0.9)], [10]),
                   lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.1, 1.0, total_iters=10),
                                                S.ExponentialLR(o, 0.9)], milestones=[10]), 0.5),
}


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_equals_torch_lr_scheduler(name):
    sched, make, base = TORCH_CASES[name]
    n = 50 if name.startswith("one_cycle") else 60
    want = torch_lrs(make, n if not name.startswith("cosine") else 41, base)
    got = np.asarray(jax.vmap(sched)(jnp.arange(len(want))))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_values_use_default_float_dtype_and_accept_arrays():
    s = fo.cosine_decay_schedule(1.0, 10)
    assert s(3).dtype == jnp.zeros(()).dtype
    np.testing.assert_allclose(np.asarray(s(jnp.arange(3))), [float(s(i)) for i in range(3)])


@pytest.mark.parametrize("make, match", [
    (lambda: fo.constant_schedule(-1.0), r"\[0.0, inf\]"),
    (lambda: fo.constant_schedule(float("nan")), "finite"),
    (lambda: fo.piecewise_constant_schedule([3, 2], [1, 2, 3]), "strictly increasing"),
    (lambda: fo.piecewise_constant_schedule([2], [1.0]), "len"),
    (lambda: fo.step_schedule(1.0, 0), ">= 1"),
    (lambda: fo.exponential_decay(1.0, 0.0), r"\(0.0, inf\]"),
    (lambda: fo.cosine_decay_schedule(1.0, 0), "decay_steps"),
    (lambda: fo.warmup_cosine_decay_schedule(0.0, 1.0, 10, 5), "exceed"),
    (lambda: fo.one_cycle_schedule(10, 1.0, pct_start=1.5), r"\(0.0, 1.0\)"),
    (lambda: fo.one_cycle_schedule(10, 1.0, anneal_strategy="exp"), "'cos' or 'linear'"),
    (lambda: fo.join_schedules([fo.constant_schedule(1.0)], [3]), "len"),
    (lambda: fo.inverse_sqrt_schedule(1.0, 0), ">= 1"),
    (lambda: fo.polynomial_schedule(1.0, 0.0, -1.0, 5), "power"),
])
def test_bad_schedule_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
