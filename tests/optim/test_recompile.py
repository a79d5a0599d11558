"""No recompilation on the second and later jitted updates, also when the learning rate
changes through a schedule or through injected hyperparameters."""

import jax
import jax.numpy as jnp
import pytest

import fdl.optim as fo
from fdl.testing import count_compilations

OPTS = {
    "sgd_momentum_schedule": lambda: fo.sgd(fo.step_schedule(0.1, 2), 0.9, weight_decay=1e-4),
    "gluon_nesterov": lambda: fo.nesterov(fo.linear_schedule(0.1, 0.0, 5),
                                          momentum_form="gluon"),
    "adam_warmup_cosine": lambda: fo.adam(fo.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10)),
    "adamw_masked_amsgrad": lambda: fo.adamw(fo.one_cycle_schedule(20, 1e-2), amsgrad=True,
                                             mask="no_bias_norm"),
    "rmsprop_centered_momentum": lambda: fo.rmsprop(fo.inverse_sqrt_schedule(1e-2, 3),
                                                    centered=True, momentum=0.9),
    "adagrad_lr_decay": lambda: fo.adagrad(0.1, lr_decay=0.1),
    "adadelta": lambda: fo.adadelta(),
    "clip_accumulate_skip": lambda: fo.skip_nonfinite(fo.multi_steps(
        fo.chain(fo.clip_by_global_norm(1.0), fo.masked(fo.adam(1e-3), "head"),
                 fo.freeze("body"), fo.scale_by_path({"head": 10.0})), 2)),
    "injected": lambda: fo.inject_hyperparams(fo.adamw)(lr=fo.exponential_decay(1e-3, 0.9),
                                                        b1=0.9, weight_decay=1e-2),
}


def tree(dtype):
    return {"body": {"w": jnp.ones((3, 2), dtype), "b": jnp.zeros((2,), dtype)},
            "head": {"w": jnp.ones((2, 4), dtype), "b": jnp.zeros((4,), dtype)}}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", sorted(OPTS))
def test_update_compiles_once(name, dtype):
    opt = OPTS[name]()
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = opt.update(grads, state, params)
        return fo.apply_updates(params, updates), state

    params = tree(dtype)
    state = opt.init(params)
    lrs = []
    with count_compilations(step) as compiled:
        for i in range(6):
            grads = jax.tree.map(lambda x, i=i: x + 0.1 * (i + 1), params)
            if name == "injected" and i == 3:
                state = fo.set_hyperparams(state, b1=0.5, weight_decay=0.0)
            params, state = step(params, state, grads)
            lrs.append(float(fo.current_lr(state)))
    assert len(traces) == 1, f"traced {len(traces)} times"
    assert len(compiled) == 1, compiled
    if name not in ("adadelta", "clip_accumulate_skip"):  # constant rates there
        assert len(set(lrs)) > 1, "the learning rate should have changed"
    for x in jax.tree.leaves(params):
        assert x.dtype == dtype


def test_set_hyperparams_lr_does_not_recompile():
    opt = fo.inject_hyperparams(fo.sgd)(lr=0.1, momentum=0.9)
    step = jax.jit(opt.update)
    params = tree(jnp.float32)
    state = opt.init(params)
    with count_compilations(step) as compiled:
        for lr in [0.1, 0.05, 0.02, 0.01]:
            state = fo.set_hyperparams(state, lr=lr)
            _, state = step(params, state, params)
            assert float(fo.current_lr(state)) == pytest.approx(lr)
    assert len(compiled) == 1, compiled
