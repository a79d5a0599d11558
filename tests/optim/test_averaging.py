"""EMA of the params (fdl.optim.ema) against torch's AveragedModel; dynamic loss scaling;
SGD dampening's validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import fdl.optim as fo
from tests.optim.test_torch_equality import (
    assert_same,
    fdl_trajectory,
    make_problem,
    params_list,
    problems,
    torch_trajectory,
)

torch = pytest.importorskip("torch")


@settings(max_examples=2)
@given(problem=problems)
def test_ema_equals_torch_averaged_model(problem):
    names, p0, targets, coefs = make_problem(*problem)
    decay = 0.9
    holder = {}

    def make_torch_opt(ps):
        module = torch.nn.Module()
        module.ps = torch.nn.ParameterList([ps[n] for n in names])
        avg = torch.optim.swa_utils.AveragedModel(
            module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))
        avg.update_parameters(module)  # the average starts at the initial params
        holder["module"], holder["avg"], holder["traj"] = module, avg, []
        opt = torch.optim.SGD(params_list(ps), lr=0.05, momentum=0.9)
        orig_step = opt.step

        def step(*a, **k):
            orig_step(*a, **k)
            avg.update_parameters(module)
            holder["traj"].append({n: p.detach().numpy().copy()
                                   for n, p in zip(names, avg.module.ps, strict=True)})

        opt.step = step
        return opt

    ref = torch_trajectory(names, p0, targets, coefs, make_torch_opt)
    got, state = fdl_trajectory(names, p0, targets, coefs,
                                fo.ema(fo.sgd(0.05, momentum=0.9), decay))
    assert_same(got, ref, names)  # the wrapped optimizer is unchanged
    avg = fo.ema_params(state)
    flat = {f"{a}/{b}": np.asarray(v) for a, sub in avg.items() for b, v in sub.items()}
    assert_same([flat], [holder["traj"][-1]], names)
    assert any(not np.allclose(flat[n], got[-1][n]) for n in names)  # it is an average


def test_ema_warmup_and_errors():
    params = {"w": jnp.ones(3)}
    opt = fo.ema(fo.sgd(1.0), 0.99, warmup=True)
    state = opt.init(params)
    grads = {"w": jnp.full(3, 0.5)}
    _, state = opt.update(grads, state, params)
    d = min(0.99, 2 / 11)
    np.testing.assert_allclose(fo.ema_params(state)["w"], d * 1 + (1 - d) * 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(grads, state)
    with pytest.raises(ValueError, match="decay"):
        fo.ema(fo.sgd(1.0), 1.5)
    with pytest.raises(ValueError, match="no ema"):
        fo.ema_params(fo.sgd(1.0).init(params))


def test_dynamic_loss_scale_skips_overflow_and_adapts():
    params = {"w": jnp.ones(2, jnp.float32)}
    opt = fo.dynamic_loss_scale(fo.sgd(0.1), init_scale=8.0, growth_interval=2, factor=2.0)
    state = opt.init(params)
    assert float(fo.loss_scale(state)) == 8.0
    step = jax.jit(opt.update)
    # finite: unscaled gradient applied
    u, state = step({"w": jnp.full(2, 8.0)}, state, params)
    np.testing.assert_allclose(u["w"], -0.1)
    assert float(fo.loss_scale(state)) == 8.0
    u, state = step({"w": jnp.full(2, 8.0)}, state, params)
    assert float(fo.loss_scale(state)) == 16.0  # two good steps in a row: grow
    # overflow: skipped, scale halved, counter reset
    u, state = step({"w": jnp.array([jnp.inf, 1.0])}, state, params)
    np.testing.assert_array_equal(u["w"], 0.0)
    assert float(fo.loss_scale(state)) == 8.0
    assert int(state.skipped) == 1 and int(state.good_steps) == 0
    u, state = step({"w": jnp.array([jnp.nan, 1.0])}, state, params)
    assert float(fo.loss_scale(state)) == 4.0
    assert fo.loss_scale(fo.sgd(0.1).init(params)) == 1.0
    with pytest.raises(ValueError, match="factor"):
        fo.dynamic_loss_scale(fo.sgd(0.1), factor=1.0)


def test_float16_training_with_loss_scaling_converges_where_unscaled_underflows():
    """A float16 least-squares fit whose gradients (~1e-8) underflow in float16 without
    scaling: the scaled run learns, the unscaled run does not move."""
    x = jnp.linspace(-1, 1, 64).reshape(64, 1)
    y = 3.0 * x

    def loss(w):
        pred = (x.astype(jnp.float16) @ w.astype(jnp.float16)).astype(jnp.float32)
        return 1e-7 * jnp.mean((pred - y) ** 2)

    def train(opt):
        w = jnp.zeros((1, 1), jnp.float32)
        state = opt.init(w)

        @jax.jit
        def step(w, state):
            s = fo.loss_scale(state)
            g = jax.grad(lambda w: (loss(w) * s).astype(jnp.float16))(w)
            u, state = opt.update(g, state, w)
            return fo.apply_updates(w, u), state

        for _ in range(50):
            w, state = step(w, state)
        return float(w[0, 0])

    assert train(fo.sgd(3e6)) == 0.0
    w = train(fo.dynamic_loss_scale(fo.sgd(3e6), init_scale=2.0 ** 20))
    assert abs(w - 3.0) < 0.05, w


def test_sgd_dampening_validation():
    with pytest.raises(ValueError, match="dampening"):
        fo.sgd(0.1, momentum=0.9, nesterov=True, dampening=0.1)
    with pytest.raises(ValueError, match="dampening"):
        fo.sgd(0.1, momentum=0.9, dampening=1.5)
    with pytest.raises(ValueError, match="pytorch"):
        fo.sgd(0.1, momentum=0.9, dampening=0.5, momentum_form="gluon")
    state = fo.sgd(0.1, momentum=0.9, dampening=0.5).init({"w": jnp.zeros(2)})
    assert isinstance(state[1], fo.DampedTraceState)
