"""Float64 gradient checks (hypothesis-drawn inputs) for one block of every vision family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from fdl import testing
from fdl.models import vision as V

SLOW = pytest.mark.slow  # covered families stay in the default run; budget

BLOCKS = [
    # (id, layer factory, input shape, train); the slow ones repeat a covered family
    pytest.param("lenet5_bn", lambda: V.lenet5(3, 1, batch_norm=True), (4, 12, 12, 1), True,
                 marks=SLOW),
    pytest.param("alexnet_small", lambda: V.alexnet(3, 1, small_input=True, width=1 / 32,
                                                    fc_features=8, dropout=0.0),
                 (1, 16, 16, 1), False, marks=SLOW),
    ("vgg_block", lambda: V.vgg_block(2, 3), (2, 4, 4, 2), False),
    ("nin_block", lambda: V.nin_block(3, 3, 1, 1), (1, 4, 4, 2), False),
    ("inception", lambda: V.inception(2, (2, 3), (1, 2), 2), (1, 4, 4, 3), False),
    ("basic_v1_downsample", lambda: V.basic_block(4, 2), (2, 4, 4, 3), True),
    pytest.param("basic_v2", lambda: V.basic_block(3, 1, version=2), (2, 4, 4, 3), True,
                 marks=SLOW),
    ("bottleneck_resnext_se", lambda: V.bottleneck_block(2, 1, groups=2, se_reduction=2),
     (2, 4, 4, 4), True),
    pytest.param("bottleneck_v2_stride2", lambda: V.bottleneck_block(1, 2, version=2),
                 (2, 4, 4, 3), True, marks=SLOW),
    pytest.param("se_block", lambda: V.se_block(2), (2, 3, 3, 4), False, marks=SLOW),
    ("dense_layer", lambda: V.dense_layer(2, bn_size=2), (2, 4, 4, 3), True),
    pytest.param("transition", lambda: V.transition(2), (2, 4, 4, 3), True, marks=SLOW),
    pytest.param("depthwise_separable", lambda: V.depthwise_separable(3, 4, 2), (2, 4, 4, 3),
                 True, marks=SLOW),
    ("inverted_residual", lambda: V.inverted_residual(3, 3, 1, 2), (2, 4, 4, 3), True),
]


@pytest.mark.parametrize("name,build,shape,train", BLOCKS,
                         ids=[b.values[0] if hasattr(b, "marks") else b[0] for b in BLOCKS])
def test_block_gradients_float64(name, build, shape, train):
    layer = build()
    # an rbg key: its init compiles several times faster than threefry's (values irrelevant)
    params, state = jax.jit(lambda k: layer.init_params(k, shape))(
        jax.random.key(0, impl="rbg"))
    # random biases too: with zero biases a unit whose inputs are all ReLU-dead sits exactly
    # on the ReLU kink, where finite differences and derivatives legitimately disagree
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) + 0.1 * rng.normal(size=a.shape), params)
    state = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), state)
    # one compiled function for every example (eager op-by-op dispatch is slow here)
    base = np.random.default_rng(0).normal(size=shape)
    f = jax.jit(lambda p, x: layer.apply(p, state, x, train=train)[0])

    @settings(max_examples=2)
    @given(x=testing.arrays(shape, min_value=-1.0, max_value=1.0))
    def check(x):
        # hypothesis' draws plus fixed noise: never a constant input (a zero batch variance
        # makes train-mode BatchNorm's derivatives ~1/sqrt(eps), beyond finite differences)
        x = x + base
        testing.check_gradients(f, (params, jnp.asarray(x)), order=1, eps=1e-6, atol=1e-4,
                                rtol=1e-4)

    check()


def _init_abstract(layer, in_shape):
    """``layer.init`` traced abstractly (no compilation): ``(out_shape, params, state)`` with
    ShapeDtypeStruct leaves; the names are all this test needs."""
    box = {}

    def init(k):
        box["out"], p, s = layer.init(k, in_shape)
        return p, s

    p, s = jax.eval_shape(init, jax.random.key(0))
    return box["out"], p, s


def test_blocks_keep_torchvision_style_names():
    _, p, s = _init_abstract(V.basic_block(8, 2), (2, 8, 8, 4))
    assert set(p) == {"conv1", "bn1", "conv2", "bn2", "downsample"}
    assert set(p["downsample"]) == {"conv", "bn"}
    _, p, _ = _init_abstract(V.basic_block(4, 1), (2, 8, 8, 4))
    assert "downsample" not in p
    _, p, _ = _init_abstract(V.bottleneck_block(4, 1, version=2), (2, 8, 8, 16))
    assert set(p) == {"bn1", "conv1", "bn2", "conv2", "bn3", "conv3"}
    _, p, _ = _init_abstract(V.dense_layer(4), (2, 8, 8, 4))
    assert set(p) == {"norm1", "conv1", "norm2", "conv2"}
    out, _, _ = _init_abstract(V.dense_layer(4), (2, 8, 8, 6))
    assert out == (2, 8, 8, 10)
