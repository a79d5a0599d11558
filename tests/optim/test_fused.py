"""Fused optimizer steps (fdl.optim.fused): the same values as ``update`` + ``apply_updates``,
on the native CPU kernel and on XLA; in place when donated; derivatives, vmap, export, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fdl
import fdl.optim as fo
from fdl import config
from fdl.optim import fused
from fdl.testing import arrays, check_gradients, check_lowers_on_all_platforms, shapes

FUSED = {
    "adam": lambda lr: fo.adam(lr),
    "adam_l2": lambda lr: fo.adam(lr, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1),
    "adamw": lambda lr: fo.adamw(lr, weight_decay=0.05),
    "sgd_momentum": lambda lr: fo.sgd(lr, 0.9),
    "sgd_momentum_l2": lambda lr: fo.sgd(lr, 0.5, weight_decay=1e-2),
    "nesterov": lambda lr: fo.nesterov(lr, 0.9, weight_decay=1e-3),
}
LRS = {"constant": 0.05, "schedule": fo.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10)}


def native() -> bool:
    return fused.native_available()


def tree(shape_a, shape_b, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"a": jax.random.normal(k1, shape_a, jnp.float32),
            "b": {"c": jax.random.normal(k2, shape_b, jnp.float32)}}


def grads_at(params, i):
    return jax.tree_util.tree_map(lambda x: jnp.sin(x * (i + 1)) + 0.1 * i, params)


def run(opt, params, steps, fused_step: bool, backend="auto"):
    state = opt.init(params)

    def chain(g, s, p):
        u, s = opt.update(g, s, p)
        return fo.apply_updates(p, u), s

    with config.override(optim_backend=backend):
        f = jax.jit(functools.partial(fo.apply_gradients, opt) if fused_step else chain)
        for i in range(steps):
            params, state = f(grads_at(params, i), state, params)
    return params, state


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    """Equal to rounding: the kernel and XLA may contract ``a * b + c`` into FMAs differently
    (both do where the CPU has FMA; they agree bitwise on such a machine)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol)


@pytest.mark.parametrize("lr", sorted(LRS))
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_step_equals_update_then_apply(name, lr):
    opt = FUSED[name](LRS[lr])
    assert opt.step is not None
    params = tree((3, 5), (70_001,))  # one leaf large enough to be split across threads
    want = run(opt, params, 4, fused_step=False)
    for backend in ("auto", "xla"):
        got = run(opt, params, 4, fused_step=True, backend=backend)
        assert_trees_close(got, want)
    assert fo.current_lr(got[1]) == fo.current_lr(want[1])


@given(shape_a=shapes(max_dims=3, max_side=6), shape_b=shapes(max_dims=1, max_side=40),
       name=st.sampled_from(sorted(FUSED)), seed=st.integers(0, 2**16))
def test_fused_step_equals_update_then_apply_any_shapes(shape_a, shape_b, name, seed):
    opt = FUSED[name](0.03)
    params = tree(shape_a, shape_b, seed)
    assert_trees_close(run(opt, params, 2, fused_step=True),
                       run(opt, params, 2, fused_step=False))


def _hlo(fn, *args, donate=()):
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile().as_text()


def test_native_kernel_runs_in_place_when_donated():
    if not native():
        pytest.skip("the native optimizer library is unavailable here")
    opt = fo.adam(1e-3)
    params = tree((64, 32), (1000,))
    state = opt.init(params)
    grads = grads_at(params, 0)
    step = functools.partial(fo.apply_gradients, opt)
    text = _hlo(lambda p, s, g: step(g, s, p), params, state, grads, donate=(0, 1))
    assert "fdl_adam_step" in text
    assert " copy(" not in text  # every donated leaf is updated where it lies
    assert "input_output_alias" in text.splitlines()[0]
    with config.override(optim_backend="xla"):
        assert "fdl_adam_step" not in _hlo(lambda p, s, g: step(g, s, p), params, state, grads)
    sgd = fo.sgd(0.1, 0.9)
    assert "fdl_momentum_step" in _hlo(functools.partial(fo.apply_gradients, sgd), grads,
                                       sgd.init(params), params)


def test_which_optimizers_are_fused():
    for opt in (fo.adam(1e-3), fo.adamw(1e-3), fo.sgd(0.1, 0.9), fo.nesterov(0.1),
                fo.adam(fo.exponential_decay(1e-3, 0.9))):
        assert opt.step is not None
    for opt in (fo.sgd(0.1), fo.adam(1e-3, amsgrad=True), fo.adamw(1e-3, mask="no_bias_norm"),
                fo.sgd(0.1, 0.9, dampening=0.1), fo.sgd(0.1, 0.9, momentum_form="gluon"),
                fo.adam(jnp.asarray(1e-3)), fo.chain(fo.clip_by_global_norm(1.0), fo.adam(1e-3)),
                fo.inject_hyperparams(fo.adam)(lr=1e-3), fo.rmsprop(0.01)):
        assert opt.step is None
        # apply_gradients takes update + apply_updates for them
        params = {"w": jnp.ones(3)}
        state = opt.init(params)
        p, _ = fo.apply_gradients(opt, {"w": jnp.full(3, 0.5)}, state, params)
        u, _ = opt.update({"w": jnp.full(3, 0.5)}, state, params)
        np.testing.assert_array_equal(p["w"], fo.apply_updates(params, u)["w"])


@pytest.mark.parametrize("name", ["adam", "sgd_momentum"])
def test_other_dtypes_take_the_xla_form(name):
    opt = FUSED[name](0.05)
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tree((4, 3), (9,)))
    state = opt.init(params)
    g = grads_at(params, 0)
    text = _hlo(functools.partial(fo.apply_gradients, opt), g, state, params)
    assert "fdl_adam_step" not in text and "fdl_momentum_step" not in text
    got = fo.apply_gradients(opt, g, state, params)
    u, s = opt.update(g, state, params)
    assert_trees_close(got, (fo.apply_updates(params, u), s), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["adam_l2", "adamw", "nesterov"])
def test_derivatives_through_a_step_match_finite_differences(name):
    """Meta-gradients: d(loss(step(params)))/d(params, grads), in float64 (the XLA form)."""
    opt = FUSED[name](0.1)
    with jax.enable_x64(True):
        params = {"w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)}
        state = jax.tree_util.tree_map(
            lambda x: x + 0.3 if jnp.issubdtype(x.dtype, jnp.floating) else x,
            opt.init(params))

        def f(p, g):
            new_p, new_s = fo.apply_gradients(opt, g, state, p)
            return jnp.sum(jnp.sin(new_p["w"])) + sum(
                jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(new_s)
                if jnp.issubdtype(x.dtype, jnp.floating))

        check_gradients(f, (params, {"w": jnp.linspace(0.5, -0.7, 5, dtype=jnp.float64)}),
                        order=1)


@pytest.mark.parametrize("name", ["adamw", "nesterov"])
def test_derivatives_through_the_native_step_equal_the_chain(name):
    opt = FUSED[name](0.1)
    params = tree((3, 4), (6,))
    state = opt.init(params)
    g0 = grads_at(params, 0)

    def loss(step_fn, p, g):
        new_p, _ = step_fn(g, state, p)
        return sum(jnp.sum(jnp.cos(x)) for x in jax.tree_util.tree_leaves(new_p))

    def chain(g, s, p):
        u, s = opt.update(g, s, p)
        return fo.apply_updates(p, u), s

    fused_step = functools.partial(fo.apply_gradients, opt)
    want = jax.jit(jax.grad(functools.partial(loss, chain), argnums=(0, 1)))(params, g0)
    got = jax.jit(jax.grad(functools.partial(loss, fused_step), argnums=(0, 1)))(params, g0)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    tangent = jax.tree_util.tree_map(jnp.ones_like, params)
    _, t_want = jax.jvp(lambda p: chain(g0, state, p)[0], (params,), (tangent,))
    _, t_got = jax.jvp(lambda p: fused_step(g0, state, p)[0], (params,), (tangent,))
    assert_trees_close(t_got, t_want, rtol=1e-5, atol=1e-6)


def test_vmap_over_an_ensemble_equals_each_member():
    opt = fo.adam(0.01)
    members = [tree((3, 2), (5,), seed) for seed in range(3)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)
    states = jax.vmap(opt.init)(stacked)
    grads = jax.tree_util.tree_map(jnp.cos, stacked)
    got_p, _ = jax.jit(jax.vmap(functools.partial(fo.apply_gradients, opt)))(
        grads, states, stacked)
    for i, member in enumerate(members):
        want_p, _ = fo.apply_gradients(opt, jax.tree_util.tree_map(jnp.cos, member),
                                       opt.init(member), member)
        assert_trees_close(jax.tree_util.tree_map(lambda x, i=i: x[i], got_p), want_p)


def test_lowers_for_gpu_and_tpu_without_the_native_call():
    opt = fo.adamw(1e-3)
    params = tree((8, 4), (4,))
    texts = check_lowers_on_all_platforms(functools.partial(fo.apply_gradients, opt),
                                          grads_at(params, 0), opt.init(params), params)
    if native():
        assert "fdl_adam_step" in texts["all"]  # the CPU branch of the multi-platform module


def test_bad_input_names_the_path():
    opt = fo.adam(1e-3)
    params = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.float32)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="'b'"):
        fo.apply_gradients(opt, {"w": jnp.ones(3)}, state, params)
    with pytest.raises(ValueError, match="shape"):
        fo.apply_gradients(opt, {"w": jnp.ones(3), "b": jnp.ones(3)}, state, params)
    with pytest.raises(ValueError, match="optim_backend"):
        config.update("optim_backend", "fast")


def test_kernels_report_the_optimizer_step():
    k = fdl.kernels()["optim"]
    assert k.backend == ("native" if native() else "xla")
    with config.override(optim_backend="xla"):
        assert fdl.kernels()["optim"].backend == "xla"


@given(arrays((7,)), arrays((7,), min_value=0.0, max_value=1.0))
def test_moments_stay_the_chain_values_for_any_values(g, v0):
    opt = fo.adam(0.01, weight_decay=0.01)
    params = {"w": jnp.asarray(np.linspace(-1, 1, 7), jnp.float32)}
    state = opt.init(params)
    state = (state[0], state[1]._replace(nu={"w": jnp.asarray(v0, jnp.float32)}), state[2])
    grads = {"w": jnp.asarray(g, jnp.float32)}
    u, want_s = opt.update(grads, state, params)
    got = jax.jit(functools.partial(fo.apply_gradients, opt))(grads, state, params)
    assert_trees_close(got, (fo.apply_updates(params, u), want_s), rtol=1e-5, atol=1e-6)
