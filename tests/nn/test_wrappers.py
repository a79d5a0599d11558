"""frozen, remat, at_paths and mixed_precision: same params and paths as the wrapped layer,
the promised behaviour (inference mode, recomputation, casts), bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import nn
from fdl.models import vision


def _net():
    return nn.serial(
        ("features", nn.serial(("conv", nn.conv2d(4, 3, padding=1)), ("bn", nn.batch_norm()),
                               nn.relu(), ("drop", nn.dropout(0.5)), nn.global_avg_pool2d())),
        ("head", nn.serial(("fc", nn.dense(3)), ("bn", nn.batch_norm()))),
    )


def _data(shape=(8, 6, 6, 2), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(1.0, 2.0, size=shape), jnp.float32)


def _loss(model, params, state, x, train=True):
    y, new_state = model.apply(params, state, x, key=jax.random.key(1), train=train)
    return jnp.sum(jnp.sin(y)), new_state


def test_frozen_runs_in_inference_mode_and_stops_param_gradients():
    net = _net()
    x = _data()
    _, params, state = net.init(jax.random.key(0), x.shape)
    fz = nn.at_paths(net, {"features": nn.frozen})
    # same params and state as the original model
    assert jax.tree.structure(fz.init(jax.random.key(0), x.shape)[1]) == jax.tree.structure(params)
    (_, new_state), grads = jax.jit(jax.value_and_grad(
        functools.partial(_loss, fz), has_aux=True))(params, state, x)
    # the frozen BatchNorm keeps its running statistics, the head's moves
    for leaf in ("mean", "var"):
        np.testing.assert_array_equal(new_state["features"]["bn"][leaf],
                                      state["features"]["bn"][leaf])
        assert not np.allclose(new_state["head"]["bn"][leaf], state["head"]["bn"][leaf])
    for g in jax.tree.leaves(grads["features"]):
        np.testing.assert_array_equal(g, 0.0)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads["head"]))
    # the frozen part computes exactly what evaluation mode computes (dropout off too)
    fp, fs = {"features": params["features"]}, {"features": state["features"]}
    want, _ = nn.serial(*net.children[:1]).apply(fp, fs, x, train=False)
    got, _ = nn.serial(("features", nn.frozen(dict(net.children)["features"]))).apply(
        fp, fs, x, key=jax.random.key(3), train=True)
    np.testing.assert_array_equal(got, want)


def test_frozen_passes_gradient_to_its_input():
    layer = nn.frozen(nn.dense(3))
    _, p, s = layer.init(jax.random.key(0), (2, 4))
    gx = jax.grad(lambda x: jnp.sum(layer.apply(p, s, x, train=True)[0] ** 2))(jnp.ones((2, 4)))
    assert np.any(gx != 0)
    gp = jax.grad(lambda p: jnp.sum(layer.apply(p, s, jnp.ones((2, 4)), train=True)[0] ** 2))(p)
    assert all(np.all(g == 0) for g in jax.tree.leaves(gp))
    gp = jax.grad(lambda p: jnp.sum(nn.frozen(nn.dense(3), stop_gradient=False).apply(
        p, s, jnp.ones((2, 4)), train=True)[0] ** 2))(p)
    assert all(np.any(g != 0) for g in jax.tree.leaves(gp))


def test_remat_equals_plain_and_recomputes():
    net = _net()
    x = _data()
    _, params, state = net.init(jax.random.key(0), x.shape)
    rm = nn.at_paths(net, {"features": nn.remat})
    f_plain = jax.jit(jax.grad(lambda p: _loss(net, p, state, x)[0]))
    f_remat = jax.jit(jax.grad(lambda p: _loss(rm, p, state, x)[0]))
    for a, b in zip(jax.tree.leaves(f_plain(params)), jax.tree.leaves(f_remat(params)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "remat" in str(jax.make_jaxpr(f_remat)(params))  # jax.checkpoint's primitive
    assert "remat" not in str(jax.make_jaxpr(f_plain)(params))
    saving = nn.at_paths(net, {"features": functools.partial(nn.remat, policy="dots_saveable")})
    closed = jax.make_jaxpr(lambda p: _loss(saving, p, state, x)[0])(params)
    policies = [e.params["policy"] for e in closed.jaxpr.eqns if "remat" in e.primitive.name]
    assert policies == [jax.checkpoint_policies.dots_saveable]
    with pytest.raises(ValueError, match="policy"):
        nn.remat(nn.relu(), policy="everything")


def test_at_paths_globs_segments_and_zoo_paths():
    model = vision.resnet18(10, small_input=True)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    params, state = jax.eval_shape(lambda k: model.init_params(k, x.shape), jax.random.key(0))
    seen = []

    def spy(layer):
        seen.append(layer.name)
        return layer

    wrapped = nn.at_paths(model, {"features/layer*": spy,
                                  "features/layer2/0/downsample": spy})
    jax.eval_shape(lambda p, s, x: wrapped.apply(p, s, x, train=True), params, state, x)
    assert len(seen) == 5  # four stages (not the layers below them) and the downsample
    with pytest.raises(ValueError, match=r"no child .* \['features/layer9'\]"):
        bad = nn.at_paths(model, {"features/layer9": nn.frozen})
        jax.eval_shape(lambda p, s, x: bad.apply(p, s, x), params, state, x)
    with pytest.raises(TypeError, match="callable"):
        nn.at_paths(model, {"features": 3})
    # the wrapper would be lost by replace_head: refused
    with pytest.raises(ValueError, match="replace the head first"):
        vision.replace_head(nn.at_paths(model, {"features": nn.frozen}), nn.dense(2))


def test_mixed_precision_casts_and_keeps_float32_master_state_and_output():
    net = _net()
    x = _data()
    _, params, state = net.init(jax.random.key(0), x.shape)
    mp = nn.mixed_precision(net, "bfloat16")
    seen = {}
    probe = nn.lambda_layer(lambda h: seen.setdefault("dtype", h.dtype) and h, name="probe",
                            shape_fn=lambda s: s)
    mp_probe = nn.mixed_precision(nn.serial(net.children[0], ("probe", probe)), "bfloat16")
    jax.eval_shape(lambda p, s: mp_probe.apply(p, s, x),
                   {"features": params["features"]}, {"features": state["features"]})
    assert seen["dtype"] == jnp.bfloat16
    (loss, new_state), grads = jax.jit(jax.value_and_grad(
        functools.partial(_loss, mp), has_aux=True))(params, state, x)
    y, _ = jax.jit(mp.apply)(params, state, x)
    assert y.dtype == jnp.float32
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert g.dtype == p.dtype == jnp.float32
    for s in jax.tree.leaves(new_state):
        assert s.dtype == jnp.float32
    ref_loss, ref_state = jax.jit(functools.partial(_loss, net))(params, state, x)
    np.testing.assert_allclose(loss, ref_loss, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(new_state["features"]["bn"]["mean"],
                               ref_state["features"]["bn"]["mean"], rtol=0.02, atol=0.02)
    with pytest.raises(ValueError, match="compute_dtype"):
        nn.mixed_precision(net, "int8")


@pytest.mark.parametrize("variant", ["bf16_remat_ema", "fp16_loss_scale_augment"])
def test_training_features_lower_for_cuda_and_tpu(variant):
    """A conv + BatchNorm training step with the issue-20 wrappers exports for CPU, CUDA and
    TPU (jax.export; no accelerator here), with no native CPU kernel in the GPU/TPU modules."""
    from fdl import optim
    from fdl.data import augment
    from fdl.testing import check_lowers_on_all_platforms
    from fdl.train import make_train_step

    model = _net()
    opt = optim.sgd(0.1, momentum=0.9)
    if variant == "bf16_remat_ema":
        model = nn.mixed_precision(nn.at_paths(model, {"features": nn.remat}), "bfloat16")
        opt = optim.ema(opt, 0.99, warmup=True)
    else:
        model = nn.mixed_precision(augment.augmented(model, augment.from_spec("flip,crop")),
                                   "float16")
        opt = optim.dynamic_loss_scale(opt)
    x = _data((2, 6, 6, 1))
    y = jnp.asarray([1, 2], jnp.int32)
    _, params, state = model.init(jax.random.key(0), x.shape)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)  # the suite runs with x64
    step = make_train_step(model, opt, jit=False)
    texts = check_lowers_on_all_platforms(step, params, state, opt.init(params), (x, y),
                                          jax.random.key(1))
    half = "bf16" if variant == "bf16_remat_ema" else "f16"
    assert all(f"x{half}>" in t for t in texts.values())  # half-precision compute everywhere
