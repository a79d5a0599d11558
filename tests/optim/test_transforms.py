"""Building blocks: golden hand-computed steps, masking, accumulation, injection, skipping,
reading the learning rate, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fdl.optim as fo


def one_param(v=1.0):
    return {"w": jnp.asarray([v], jnp.float64)}


def run_steps(opt, params, grads_seq):
    state = opt.init(params)
    out = []
    for g in grads_seq:
        u, state = opt.update({"w": jnp.asarray([g], jnp.float64)}, state, params)
        params = fo.apply_updates(params, u)
        out.append(float(params["w"][0]))
    return out, state


# ----------------------------------------------------------------------------- golden values

LR2 = fo.piecewise_constant_schedule([1], [0.1, 0.05])  # 0.1 at the first step, then 0.05


def test_gluon_momentum_golden():
    # v1 = 0.9*0 - 0.1*2 = -0.2, w1 = 0.8;  v2 = 0.9*(-0.2) - 0.05*4 = -0.38, w2 = 0.42
    got, state = run_steps(fo.sgd(LR2, 0.9, momentum_form="gluon"), one_param(), [2.0, 4.0])
    np.testing.assert_allclose(got, [0.8, 0.42], rtol=1e-14)
    np.testing.assert_allclose(float(fo.current_lr(state)), 0.05)


def test_pytorch_momentum_golden_differs_under_a_schedule():
    # b1 = 2, w1 = 1 - 0.1*2 = 0.8;  b2 = 0.9*2 + 4 = 5.8, w2 = 0.8 - 0.05*5.8 = 0.51
    got, _ = run_steps(fo.sgd(LR2, 0.9), one_param(), [2.0, 4.0])
    np.testing.assert_allclose(got, [0.8, 0.51], rtol=1e-14)


def test_gluon_nesterov_and_wd_golden():
    # Gluon NAG: v = mu v - lr g; w += mu v - lr g
    # step 1: v = -0.2, w = 1 + 0.9*(-0.2) - 0.2 = 0.62
    # step 2: v = 0.9*(-0.2) - 0.05*4 = -0.38, w = 0.62 + 0.9*(-0.38) - 0.2 = 0.078
    got, _ = run_steps(fo.nesterov(LR2, 0.9, momentum_form="gluon"), one_param(), [2.0, 4.0])
    np.testing.assert_allclose(got, [0.62, 0.078], rtol=1e-13)
    # coupled wd = 0.1: g = 2 + 0.1 * 1 = 2.1, v = -0.21, w = 0.79
    got, _ = run_steps(fo.sgd(0.1, 0.9, weight_decay=0.1, momentum_form="gluon"), one_param(),
                       [2.0])
    np.testing.assert_allclose(got, [0.79], rtol=1e-14)


def test_adam_golden_first_step():
    # m = 0.2, v = 0.004; m_hat = 2, v_hat = 4: w = 1 - 0.1 * 2 / (2 + 1e-8)
    got, _ = run_steps(fo.adam(0.1), one_param(), [2.0])
    np.testing.assert_allclose(got, [1 - 0.1 * 2 / (2 + 1e-8)], rtol=1e-15)
    # adamw: w = 1 - 0.1 * (2 / (2 + 1e-8) + 0.5 * 1)
    got, _ = run_steps(fo.adamw(0.1, weight_decay=0.5), one_param(), [2.0])
    np.testing.assert_allclose(got, [1 - 0.1 * (2 / (2 + 1e-8) + 0.5)], rtol=1e-15)


def test_adagrad_rmsprop_adadelta_golden_first_step():
    got, _ = run_steps(fo.adagrad(0.1, eps=1e-10), one_param(), [2.0])
    np.testing.assert_allclose(got, [1 - 0.1 * 2 / (2 + 1e-10)], rtol=1e-15)
    # s = 0.01 * 4 = 0.04, w = 1 - 0.01 * 2 / (0.2 + 1e-8)
    got, _ = run_steps(fo.rmsprop(0.01), one_param(), [2.0])
    np.testing.assert_allclose(got, [1 - 0.01 * 2 / (0.2 + 1e-8)], rtol=1e-14)
    # s = 0.1 * 4 = 0.4, d = sqrt(1e-6) / sqrt(0.4 + 1e-6) * 2
    got, _ = run_steps(fo.adadelta(), one_param(), [2.0])
    np.testing.assert_allclose(got, [1 - math.sqrt(1e-6) / math.sqrt(0.4 + 1e-6) * 2],
                               rtol=1e-14)


def test_clip_by_global_norm_golden():
    g = {"a": jnp.asarray([3.0, 0.0]), "b": jnp.asarray([[4.0]])}  # norm 5
    u, _ = fo.clip_by_global_norm(1.0).update(g, fo.EmptyState())
    np.testing.assert_allclose(u["a"], [0.6, 0.0])
    np.testing.assert_allclose(u["b"], [[0.8]])
    u, _ = fo.clip_by_global_norm(10.0).update(g, fo.EmptyState())
    np.testing.assert_allclose(u["a"], [3.0, 0.0])
    z = jax.tree.map(jnp.zeros_like, g)
    u, _ = fo.clip_by_global_norm(1.0).update(z, fo.EmptyState())
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))
    u, _ = fo.clip_by_value(-1.0, 3.5).update(g, fo.EmptyState())
    np.testing.assert_allclose(u["a"], [3.0, 0.0])
    np.testing.assert_allclose(u["b"], [[3.5]])


def test_float32_params_stay_float32_with_x64_on():
    params = {"w": jnp.ones((3,), jnp.float32)}
    for opt in [fo.adam(fo.cosine_decay_schedule(1e-3, 10)),
                fo.inject_hyperparams(fo.adamw)(lr=1e-3), fo.sgd(0.1, 0.9, weight_decay=1e-3),
                fo.rmsprop(centered=True, momentum=0.9), fo.adadelta(), fo.adagrad()]:
        state = opt.init(params)
        u, state = jax.jit(opt.update)(params, state, params)
        assert u["w"].dtype == jnp.float32
        assert fo.apply_updates(params, u)["w"].dtype == jnp.float32


# ----------------------------------------------------------------------------- masking


def tree():
    return {"backbone": {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))},
            "head": {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}}


def test_masked_and_freeze_fine_tuning():
    params = tree()
    grads = jax.tree.map(lambda x: 2.0 * x, params)
    opt = fo.chain(fo.masked(fo.adam(0.1), "head"), fo.freeze("backbone"))
    state = opt.init(params)
    # the inner Adam keeps state only for the head
    adam_state = state[0].inner_state[1]
    assert len(jax.tree.leaves(adam_state.mu)) == len(jax.tree.leaves(adam_state.nu)) == 2
    u, state = jax.jit(opt.update)(grads, state, params)
    new = fo.apply_updates(params, u)
    np.testing.assert_array_equal(new["backbone"]["w"], params["backbone"]["w"])
    np.testing.assert_array_equal(new["backbone"]["b"], params["backbone"]["b"])
    ref_u, _ = fo.adam(0.1).update(grads["head"], fo.adam(0.1).init(params["head"]),
                                   params["head"])
    np.testing.assert_allclose(u["head"]["w"], ref_u["w"])


def test_masked_passes_unselected_updates_through():
    params = tree()
    grads = jax.tree.map(lambda x: 2.0 * x, params)
    opt = fo.masked(fo.scale(-3.0), lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
    u, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(u["head"]["w"], -6.0 * params["head"]["w"])
    np.testing.assert_allclose(u["head"]["b"], grads["head"]["b"])


@pytest.mark.parametrize("mask", [
    "no_bias_norm",
    "*/w",
    lambda p: fo.no_bias_norm_mask(p),
    {"backbone": {"w": True, "b": False}, "head": {"w": True, "b": False}},
])
def test_add_decayed_weights_masks(mask):
    params = tree()
    grads = jax.tree.map(jnp.zeros_like, params)
    u, _ = fo.add_decayed_weights(0.5, mask).update(grads, fo.EmptyState(), params)
    np.testing.assert_allclose(u["head"]["w"], 0.5)
    np.testing.assert_allclose(u["head"]["b"], 0.0)
    np.testing.assert_allclose(u["backbone"]["b"], 0.0)


def test_no_bias_norm_mask_skips_norm_scale_and_offset():
    p = {"bn": {"scale": 1.0, "offset": 0.0}, "conv": {"w": 1.0, "b": 0.0}, "emb": {"table": 1.0}}
    m = fo.no_bias_norm_mask(p)
    assert m == {"bn": {"scale": False, "offset": False}, "conv": {"w": True, "b": False},
                 "emb": {"table": True}}


# ----------------------------------------------------------------------------- accumulation


def test_multi_steps_clips_the_accumulated_gradient():
    params = {"w": jnp.asarray([0.0, 0.0])}
    micro = [jnp.asarray([3.0, 0.0]), jnp.asarray([0.0, 4.0]), jnp.asarray([3.0, 8.0])]
    inner = fo.chain(fo.clip_by_global_norm(1.0), fo.sgd(0.5))
    opt = fo.multi_steps(inner, 3)
    state = opt.init(params)
    step = jax.jit(opt.update)
    for i, g in enumerate(micro):
        u, state = step({"w": g}, state, params)
        if i < 2:
            np.testing.assert_array_equal(u["w"], 0.0)
    mean = np.asarray([2.0, 4.0])  # norm sqrt(20) > 1: clipped as a whole
    np.testing.assert_allclose(u["w"], -0.5 * mean / np.sqrt(20.0), rtol=1e-12)
    assert int(state.count) == 1 and int(state.mini_step) == 0
    np.testing.assert_array_equal(state.acc["w"], 0.0)
    assert float(fo.current_lr(state)) == 0.5


def test_multi_steps_equals_full_batch_step():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12,))
    loss = lambda p, x, y: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    full_opt, acc_opt = fo.adam(0.1), fo.multi_steps(fo.adam(0.1), 4)
    fs, as_ = full_opt.init(params), acc_opt.init(params)
    pf = pa = params

    def make_step(opt):
        @jax.jit
        def step(p, s, x, y):
            u, s = opt.update(jax.grad(loss)(p, x, y), s, p)
            return fo.apply_updates(p, u), s

        return step

    full_step, acc_step = make_step(full_opt), make_step(acc_opt)
    for _ in range(3):
        pf, fs = full_step(pf, fs, x, y)
        for k in range(4):
            sl = slice(3 * k, 3 * k + 3)
            pa, as_ = acc_step(pa, as_, x[sl], y[sl])
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pf), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


# ----------------------------------------------------------------------------- injection


def test_inject_hyperparams_changes_lr_between_steps():
    params = one_param()
    opt = fo.inject_hyperparams(fo.sgd)(lr=0.1, momentum=0.9)
    state = opt.init(params)
    assert set(state.hyperparams) == {"lr", "momentum", "weight_decay"}
    step = jax.jit(opt.update)
    g = {"w": jnp.asarray([2.0])}
    u, state = step(g, state, params)
    params = fo.apply_updates(params, u)
    state = fo.set_hyperparams(state, lr=0.05)
    u, state = step(g | {"w": jnp.asarray([4.0])}, state, params)
    params = fo.apply_updates(params, u)
    np.testing.assert_allclose(float(params["w"][0]), 0.51, rtol=1e-14)  # as the golden test
    assert float(fo.current_lr(state)) == 0.05


def test_inject_hyperparams_with_a_schedule():
    opt = fo.inject_hyperparams(fo.adam)(lr=fo.linear_schedule(1.0, 0.0, 4), b1=0.5)
    params = one_param()
    state = opt.init(params)
    lrs = []
    for _ in range(3):
        u, state = opt.update({"w": jnp.asarray([1.0])}, state, params)
        lrs.append(float(fo.current_lr(state)))
    assert lrs == [1.0, 0.75, 0.5]


def test_set_hyperparams_bad_input():
    state = fo.inject_hyperparams(fo.adam)(lr=0.1).init(one_param())
    with pytest.raises(ValueError, match="not an injected hyperparameter"):
        fo.set_hyperparams(state, learning_rate=0.1)
    with pytest.raises(ValueError, match="finite"):
        fo.set_hyperparams(state, lr=float("nan"))
    with pytest.raises(ValueError, match="no inject_hyperparams"):
        fo.set_hyperparams(fo.adam(0.1).init(one_param()), lr=0.1)


# ----------------------------------------------------------------------------- non-finite


def test_skip_nonfinite_leaves_params_and_state_unchanged():
    params = tree()
    opt = fo.skip_nonfinite(fo.adam(0.1))
    state = opt.init(params)
    step = jax.jit(opt.update)
    good = jax.tree.map(lambda x: 0.5 * x, params)
    u, state = step(good, state, params)
    params = fo.apply_updates(params, u)
    bad = jax.tree.map(lambda x: x, good)
    bad["head"]["b"] = bad["head"]["b"].at[1].set(jnp.nan)
    u2, state2 = step(bad, state, params)
    for a, b in zip(jax.tree.leaves(fo.apply_updates(params, u2)), jax.tree.leaves(params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state2.inner_state), jax.tree.leaves(state.inner_state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state2.skipped) == 1
    bad["head"]["b"] = bad["head"]["b"].at[1].set(jnp.inf)
    _, state3 = step(bad, state2, params)
    assert int(state3.skipped) == 2
    # a finite step afterwards is exactly the inner optimizer's second step
    u4, _ = step(good, state3, params)
    ref = fo.adam(0.1)
    rs = ref.init(tree())
    ru, rs = ref.update(good, rs, tree())
    ru, rs = ref.update(good, rs, params)
    for a, b in zip(jax.tree.leaves(u4), jax.tree.leaves(ru), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14)


# ----------------------------------------------------------------------------- current_lr


def test_current_lr_reads_schedule_value():
    opt = fo.chain(fo.clip_by_global_norm(1.0),
                   fo.sgd(fo.exponential_decay(1.0, 0.5), momentum=0.9))
    params = one_param()
    state = opt.init(params)
    assert float(fo.current_lr(state)) == 1.0
    step = jax.jit(opt.update)
    for t in range(4):
        _, state = step({"w": jnp.asarray([1.0])}, state, params)
        assert float(fo.current_lr(state)) == 0.5 ** t
    with pytest.raises(ValueError, match="no learning rate"):
        fo.current_lr(fo.clip_by_global_norm(1.0).init(params))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, match", [
    (lambda: fo.sgd(-0.1), r"learning rate must be finite and in \[0.0, inf\], got -0.1"),
    (lambda: fo.adam(float("nan")), "learning rate must be finite"),
    (lambda: fo.adamw(float("inf")), "learning rate must be finite"),
    (lambda: fo.sgd(fo.constant_schedule(1.0), momentum=1.0), r"momentum .*\[0.0, 1.0\)"),
    (lambda: fo.sgd(0.1, -0.5), r"\[0.0, 1.0\)"),
    (lambda: fo.sgd(0.1, nesterov=True), "nesterov=True needs momentum"),
    (lambda: fo.sgd(0.1, 0.9, momentum_form="mxnet"), "'pytorch' or 'gluon'"),
    (lambda: fo.sgd(0.1, weight_decay=-1.0), "weight_decay"),
    (lambda: fo.adam(b1=1.0), r"b1 must be finite and in \[0.0, 1.0\)"),
    (lambda: fo.adam(b2=-0.1), r"b2 must be finite and in \[0.0, 1.0\)"),
    (lambda: fo.adamw(eps=0.0), r"eps must be finite and in \(0.0, inf\]"),
    (lambda: fo.adam(eps=-1e-8), r"eps must be"),
    (lambda: fo.rmsprop(alpha=1.0), "alpha"),
    (lambda: fo.rmsprop(eps=0.0), "eps"),
    (lambda: fo.adagrad(eps=0.0), "eps"),
    (lambda: fo.adagrad(lr_decay=-1.0), "lr_decay"),
    (lambda: fo.adadelta(rho=1.5), "rho"),
    (lambda: fo.adadelta(lr=-1.0), "learning rate"),
    (lambda: fo.clip_by_global_norm(0.0), "max_norm"),
    (lambda: fo.clip_by_value(2.0, 1.0), "lo <= hi"),
    (lambda: fo.multi_steps(fo.sgd(0.1), 0), "every_k"),
    (lambda: fo.scale_by_path({"head": -1.0}), "factor"),
    (lambda: fo.sgd(lambda t: -1.0 + 0 * t), "schedule value at step 0"),
    (lambda: fo.inject_hyperparams(fo.adam)(lr=-1.0), "learning rate"),
])
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match="argument 1"):
        fo.chain(fo.sgd(0.1), lambda g: g)


@pytest.mark.parametrize("opt", [fo.sgd(0.1), fo.adam(0.1), fo.adamw(0.1), fo.rmsprop(),
                                 fo.sgd(0.1, 0.9)])
def test_grads_structure_mismatch_names_path(opt):
    params = tree()
    state = opt.init(params)
    grads = tree()
    del grads["head"]["b"]
    with pytest.raises(ValueError, match="'head/b'"):
        opt.update(grads, state, params)
    grads = tree()
    grads["head"]["extra"] = jnp.ones(1)
    with pytest.raises(ValueError, match="'head/extra' is in grads but not in params"):
        opt.update(grads, state, params)
    grads = tree()
    grads["backbone"]["w"] = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="'backbone/w': shape"):
        opt.update(grads, state, params)


def test_grads_state_mismatch_without_params():
    opt = fo.adam(0.1)
    state = opt.init(tree())
    grads = tree()
    del grads["backbone"]["w"]
    with pytest.raises(ValueError, match="'backbone/w'"):
        opt.update(grads, state)


def test_apply_updates_mismatch_names_path():
    u = tree()
    del u["head"]["w"]
    with pytest.raises(ValueError, match="'head/w'"):
        fo.apply_updates(tree(), u)


def test_add_decayed_weights_needs_params():
    opt = fo.adamw(0.1)
    state = opt.init(tree())
    with pytest.raises(ValueError, match="needs params"):
        opt.update(tree(), state)
