"""Vision models: init's output shape equals apply's at every documented input size
(abstractly, with jax.eval_shape), parameter counts equal torchvision's, too-small inputs fail
at init naming the layer, wrong channel counts are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl import nn
from fdl.models import vision as V


def abstract_shapes(model, in_shape, train=False):
    box = {}

    def init(k):
        out, p, s = model.init(k, in_shape)
        box["out"] = out
        return p, s

    p, s = jax.eval_shape(init, jax.random.key(0))
    y, new_s = jax.eval_shape(
        lambda p, s, x: model.apply(p, s, x, key=jax.random.key(1), train=train),
        p, s, jax.ShapeDtypeStruct(in_shape, jnp.float32))
    return box["out"], y, p, s, new_s


CASES = [
    ("lenet5", lambda: V.lenet5(), 28, 1, 10),
    ("lenet5_relu_max", lambda: V.lenet5(activation="relu", pool="max"), 28, 1, 10),
    ("lenet5_bn", lambda: V.lenet5(batch_norm=True), 28, 1, 10),
    ("alexnet", lambda: V.alexnet(10, 1), 224, 1, 10),
    ("alexnet_small", lambda: V.alexnet(10, 1, small_input=True, width=0.25,
                                        fc_features=256), 32, 1, 10),
    ("alexnet_torchvision", lambda: V.alexnet_torchvision(), 224, 3, 1000),
    ("vgg11", lambda: V.vgg11(), 224, 3, 1000),
    ("vgg16", lambda: V.vgg16(), 224, 3, 1000),
    ("vgg_small", lambda: V.vgg(V.VGG11_ARCH, 10, 1, width=0.25, pool_to=None), 224, 1, 10),
    ("vgg_bn_32", lambda: V.vgg(V.VGG11_ARCH, 10, 1, width=0.25, batch_norm=True,
                                pool_to=None, fc_features=128), 32, 1, 10),
    ("nin", lambda: V.nin(), 224, 1, 10),
    ("nin_small", lambda: V.nin(small_input=True), 32, 1, 10),
    ("googlenet", lambda: V.googlenet(), 96, 1, 10),
    ("googlenet_224", lambda: V.googlenet(1000, 3), 224, 3, 1000),
    ("googlenet_small", lambda: V.googlenet(small_input=True, width=0.5), 32, 1, 10),
    ("resnet18", lambda: V.resnet18(), 224, 3, 1000),
    ("resnet18_cifar", lambda: V.resnet18(10, small_input=True), 32, 3, 10),
    ("resnet18_v2", lambda: V.resnet18(version=2), 224, 3, 1000),
    ("resnet34", lambda: V.resnet34(), 224, 3, 1000),
    ("resnet50", lambda: V.resnet50(), 224, 3, 1000),
    ("resnet50_v2_cifar", lambda: V.resnet50(10, version=2, small_input=True), 32, 3, 10),
    ("resnet101", lambda: V.resnet101(), 224, 3, 1000),
    ("resnext50_32x4d", lambda: V.resnext50_32x4d(), 224, 3, 1000),
    ("se_resnet18", lambda: V.resnet18(se_reduction=16), 224, 3, 1000),
    ("se_resnet50_v2", lambda: V.resnet50(version=2, se_reduction=16), 224, 3, 1000),
    ("densenet121", lambda: V.densenet121(), 224, 3, 1000),
    ("densenet_book", lambda: V.densenet_book(), 96, 1, 10),
    ("densenet_book_small", lambda: V.densenet_book(small_input=True), 32, 1, 10),
    ("mobilenet_v1", lambda: V.mobilenet_v1(), 224, 3, 1000),
    ("mobilenet_v1_small", lambda: V.mobilenet_v1(10, small_input=True, width=0.5), 32, 3, 10),
    ("mobilenet_v2", lambda: V.mobilenet_v2(), 224, 3, 1000),
    ("mobilenet_v2_small", lambda: V.mobilenet_v2(10, small_input=True), 32, 3, 10),
]


@pytest.mark.parametrize("name,build,size,c,k", CASES, ids=[c[0] for c in CASES])
def test_init_shape_equals_apply_shape(name, build, size, c, k):
    model = build()
    # train-mode shapes only for the small models (each abstract trace costs ~0.5 s)
    for train in (False, True) if size <= 32 else (False,):
        out, y, p, s, new_s = abstract_shapes(model, (2, size, size, c), train=train)
        assert tuple(out) == tuple(y.shape) == (2, k)
        assert y.dtype == jnp.float32
        assert jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(new_s)
    assert set(p) <= {"features", "head"} and "features" in p
    assert model.config["input_size"] in ((size, size), (32, 32), (224, 224), (96, 96), (28, 28))


# torchvision's published parameter counts
TORCHVISION_COUNTS = {
    "resnet18": (V.resnet18, 11_689_512), "resnet34": (V.resnet34, 21_797_672),
    "resnet50": (V.resnet50, 25_557_032), "resnet101": (V.resnet101, 44_549_160),
    "resnext50_32x4d": (V.resnext50_32x4d, 25_028_904), "vgg11": (V.vgg11, 132_863_336),
    "vgg16": (V.vgg16, 138_357_544), "alexnet": (V.alexnet_torchvision, 61_100_840),
    "densenet121": (V.densenet121, 7_978_856), "mobilenet_v2": (V.mobilenet_v2, 3_504_872),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_parameter_count_equals_torchvision(name):
    build, count = TORCHVISION_COUNTS[name]
    _, _, p, _, _ = abstract_shapes(build(), (1, 224, 224, 3))
    assert nn.count_params(p) == count


def test_resnet_paths_follow_torchvision_names():
    _, _, p, s, _ = abstract_shapes(V.resnet18(), (1, 224, 224, 3))
    flat = nn.flatten_dict(p)
    assert flat["features/conv1/w"].shape == (7, 7, 3, 64)
    assert flat["features/layer2/0/downsample/conv/w"].shape == (1, 1, 64, 128)
    assert "features/layer1/0/downsample/conv/w" not in flat
    assert flat["head/w"].shape == (512, 1000)
    assert nn.flatten_dict(s)["features/layer4/1/bn2/var"].shape == (512,)


def test_too_small_input_names_the_layer():
    def init(model, shape):
        return jax.eval_shape(lambda k: model.init_params(k, shape), jax.random.key(0))

    with pytest.raises(nn.ShapeError) as ei:
        init(V.alexnet(10, 1), (1, 8, 8, 1))
    msg = str(ei.value)
    assert msg.startswith("layer 'features/conv1' (conv2d)")
    assert "input height 8" in msg and "too small" in msg
    # VGG halves the size five times: 16x16 reaches 1x1 before the last pool
    with pytest.raises(nn.ShapeError, match=r"layer 'features/block5/pool' \(max_pool2d\)"):
        init(V.vgg11(10, 1, pool_to=None), (1, 16, 16, 1))
    # the smallest AlexNet input is 65x65 (first_padding=1)
    init(V.alexnet(10, 1), (1, 65, 65, 1))
    with pytest.raises(nn.ShapeError, match="features/pool3"):
        init(V.alexnet(10, 1), (1, 64, 64, 1))


def test_wrong_channels_refused():
    with pytest.raises(nn.ShapeError, match="expected 1 input channels"):
        V.lenet5().init(jax.random.key(0), (2, 28, 28, 3))
    with pytest.raises(nn.ShapeError, match="NHWC"):
        V.lenet5().init(jax.random.key(0), (2, 28, 28))


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="activation"):
        V.lenet5(activation="tanh")
    with pytest.raises(ValueError, match="version"):
        V.resnet18(version=3)
    with pytest.raises(ValueError, match="block"):
        V.resnet(block="wide")


@pytest.fixture(scope="module")
def small_resnet():
    """A CIFAR-stem ResNet-18 (4 base channels) with params/state for ``(N, 16, 16, 3)``,
    initialised once: compiling the init (one threefry hash per tensor) costs far more than
    compiling the forward pass. An ``rbg`` key (XLA's RngBitGenerator) compiles ~3x faster
    than the default threefry (8 s vs 24 s on the loaded 2-core machine)."""
    model = V.resnet18(10, small_input=True, base_channels=4)
    p, s = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0, impl="rbg"),
                                                        (2, 16, 16, 3))
    return model, p, s


def test_replace_head_keeps_backbone_paths(small_resnet):
    model, p, s = small_resnet
    new = V.replace_head(model, nn.dense(3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    # the new model's init (abstractly): same backbone paths, a 3-class head
    p2_abs, _ = jax.eval_shape(lambda k: new.init_params(k, x.shape), jax.random.key(1))
    assert jax.tree_util.tree_structure(p["features"]) == \
        jax.tree_util.tree_structure(p2_abs["features"])
    assert p2_abs["head"]["w"].shape == (32, 3)
    _, head, _ = dict(new.children)["head"].init(jax.random.key(1), (2, 32))
    p2 = {"features": p["features"], "head": head}
    features = dict(model.children)["features"]

    @jax.jit  # one compilation for the three forward passes
    def forward(p, p2, s, x):
        return (model.apply(p, s, x)[0], new.apply(p2, s, x)[0],
                features.apply(p["features"], s["features"], x)[0])

    y_old, y_new, feats = forward(p, p2, s, x)
    assert y_new.shape == (2, 3)
    # identical features: logits differ only through the head
    np.testing.assert_allclose(y_new, feats @ p2["head"]["w"] + p2["head"]["b"], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(y_old, feats @ p["head"]["w"] + p["head"]["b"], rtol=1e-5,
                               atol=1e-6)
    assert new.config["num_classes"] == 10 and new.config["head_replaced"]
    with pytest.raises(ValueError, match="features/head"):
        V.replace_head(nn.serial(nn.dense(2)), nn.dense(3))


def test_small_models_run_and_update_bn_state(small_resnet):
    model, p, s = small_resnet
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
    y, s2 = jax.jit(lambda p, s, x: model.apply(p, s, x, train=True))(p, s, x)
    assert y.shape == (4, 10) and bool(jnp.all(jnp.isfinite(y)))
    m0 = s["features"]["layer1"]["0"]["bn1"]["mean"]
    m1 = s2["features"]["layer1"]["0"]["bn1"]["mean"]
    assert not np.allclose(m0, m1)
