"""Convergence table: every optimizer reaches the optimum of d2l's ill-conditioned quadratic
``0.1 x1^2 + 2 x2^2`` and of Rosenbrock's function, the whole loop jitted (``lax.scan``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdl.optim as fo


def quadratic(p):
    x = p["x"]
    return 0.1 * x[0] ** 2 + 2.0 * x[1] ** 2


def rosenbrock(p):
    x = p["x"]
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


def minimise(opt, f, x0, steps):
    params = {"x": jnp.asarray(x0, jnp.float64)}

    def body(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(f)(p), s, p)
        return (fo.apply_updates(p, u), s), None

    run = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=steps)[0])
    p, _ = run(params, opt.init(params))
    return np.asarray(p["x"])


# name: (optimizer on the quadratic, optimizer on Rosenbrock)
TABLE = {
    "sgd": (lambda: fo.sgd(0.4), lambda: fo.sgd(1.5e-3)),
    "momentum": (lambda: fo.momentum(0.1, 0.9), lambda: fo.momentum(1e-3, 0.9)),
    "momentum_gluon": (lambda: fo.momentum(0.1, 0.9, momentum_form="gluon"),
                       lambda: fo.momentum(1e-3, 0.9, momentum_form="gluon")),
    "nesterov": (lambda: fo.nesterov(0.1, 0.9), lambda: fo.nesterov(1e-3, 0.9)),
    "adagrad": (lambda: fo.adagrad(1.0), lambda: fo.adagrad(1.0)),
    "rmsprop": (lambda: fo.rmsprop(fo.cosine_decay_schedule(0.05, 2000)),
                lambda: fo.rmsprop(fo.exponential_decay(1e-2, 0.1, 5000))),
    "rmsprop_centered_momentum": (
        lambda: fo.rmsprop(0.01, centered=True, momentum=0.5),
        lambda: fo.rmsprop(1e-3, centered=True, momentum=0.5)),
    "adadelta": (lambda: fo.adadelta(0.4, eps=1e-4), lambda: fo.adadelta(1e-3, eps=1e-2)),
    "adam": (lambda: fo.adam(0.1), lambda: fo.adam(0.02)),
    "amsgrad": (lambda: fo.adam(0.1, amsgrad=True),
                lambda: fo.adam(fo.exponential_decay(0.02, 0.1, 10000), amsgrad=True)),
    "adamw": (lambda: fo.adamw(0.1, weight_decay=1e-4), lambda: fo.adamw(0.02, weight_decay=0.0)),
    "clipped_adam_warmup_cosine": (
        lambda: fo.chain(fo.clip_by_global_norm(1.0),
                         fo.adam(fo.warmup_cosine_decay_schedule(0.0, 0.2, 100, 2000))),
        lambda: fo.chain(fo.clip_by_global_norm(10.0),
                         fo.adam(fo.warmup_cosine_decay_schedule(0.0, 0.02, 500, 20000)))),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_reaches_optimum(name):
    make_q, make_r = TABLE[name]
    xq = minimise(make_q(), quadratic, [-5.0, -2.0], 2000)
    np.testing.assert_allclose(xq, [0.0, 0.0], atol=2e-3, err_msg=f"{name} on the quadratic")
    xr = minimise(make_r(), rosenbrock, [-1.5, 2.0], 20000)
    np.testing.assert_allclose(xr, [1.0, 1.0], atol=2e-3, err_msg=f"{name} on Rosenbrock")
