"""Optimizer state survives a checkpoint round trip (``fdl.train.checkpoint``) and training
resumes identically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdl.optim as fo
from fdl.testing import count_compilations

checkpoint = pytest.importorskip("fdl.train.checkpoint")

OPTS = {
    "momentum_schedule": lambda: fo.sgd(fo.step_schedule(0.1, 3, 0.5), 0.9),
    "adamw_amsgrad_mask": lambda: fo.adamw(1e-2, amsgrad=True, mask="no_bias_norm"),
    "rmsprop_centered": lambda: fo.rmsprop(1e-2, centered=True, momentum=0.5),
    "adagrad": lambda: fo.adagrad(0.1),
    "adadelta": lambda: fo.adadelta(),
    "injected_accumulated": lambda: fo.skip_nonfinite(fo.multi_steps(
        fo.inject_hyperparams(fo.adam)(lr=fo.cosine_decay_schedule(1e-2, 20)), 3)),
    "masked_frozen": lambda: fo.chain(fo.masked(fo.nesterov(0.1), "head"), fo.freeze("body")),
}


def loss(p, x):
    h = jnp.tanh(x @ p["body"]["w"] + p["body"]["b"])
    return jnp.mean((h @ p["head"]["w"] + p["head"]["b"]) ** 2)


def init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"body": {"w": jax.random.normal(k1, (4, 3)), "b": jnp.zeros(3)},
            "head": {"w": jax.random.normal(k2, (3, 2)), "b": jnp.ones(2)}}


CASES = [(name, ".safetensors") for name in sorted(OPTS)] + [("injected_accumulated", ".npz")]


@pytest.mark.parametrize("name, suffix", CASES)
def test_resume_from_checkpoint_is_identical(name, suffix, tmp_path):
    opt = OPTS[name]()
    xs = jax.random.normal(jax.random.key(1), (10, 8, 4))

    @jax.jit
    def step(params, state, x):
        updates, state = opt.update(jax.grad(loss)(params, x), state, params)
        return fo.apply_updates(params, updates), state

    params, state = init_params(), opt.init(init_params())
    for i in range(10):
        params, state = step(params, state, xs[i])
    straight = params

    params, state = init_params(), opt.init(init_params())
    for i in range(5):
        params, state = step(params, state, xs[i])
    path = str(tmp_path / f"ckpt{suffix}")
    checkpoint.save(path, {"params": params, "opt_state": state}, metadata={"step": 5})
    template = {"params": init_params(), "opt_state": opt.init(init_params())}
    restored = checkpoint.load(path, template)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves({"params": params,
                                                                 "opt_state": state}),
                    strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    params, state = restored["params"], restored["opt_state"]
    with count_compilations(step) as compiled:  # restored state has the same types
        for i in range(5, 10):
            params, state = step(params, state, xs[i])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    assert compiled == []
