"""torchvision-layout state dicts -> fdl: outputs equal PyTorch's (eval), BatchNorm running
statistics after one training forward equal PyTorch's, export round-trips, and mismatched
state dicts are reported key by key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.interop import StateDictError, from_torchvision, to_torchvision
from fdl.interop.state_dict import load_state_dict, save_safetensors

torch = pytest.importorskip("torch")
ref = pytest.importorskip("tests.interop.torchvision_reference")

# (name, input size, reduced fc width for the fast test or None)
CASES = [
    ("resnet18", 64, None),
    ("resnet34", 64, None),
    ("resnet50", 64, None),
    ("vgg11", 32, 64),
    ("vgg16", 32, 64),
    ("alexnet", 64, 64),
    ("densenet121", 64, None),
    ("vgg11_bn", 32, 64),
    ("googlenet", 64, None),
    ("mobilenet_v2", 64, None),
    ("mobilenet_v3_small", 64, None),
]
# every other SUPPORTED model: the same check, slow (large graphs to compile)
SLOW_CASES = [
    ("resnet101", 64, None), ("resnet152", 64, None), ("resnext50_32x4d", 64, None),
    ("resnext101_32x8d", 64, None), ("resnext101_64x4d", 64, None),
    ("wide_resnet50_2", 64, None), ("wide_resnet101_2", 64, None),
    ("vgg13", 32, 64), ("vgg19", 32, 64), ("vgg13_bn", 32, 64), ("vgg16_bn", 32, 64),
    ("vgg19_bn", 32, 64), ("densenet161", 64, None), ("densenet169", 64, None),
    ("densenet201", 64, None), ("mobilenet_v3_large", 64, None),
]


def _reference(name, fc):
    torch.manual_seed(0)
    kw = {"fc_features": fc} if fc else {}
    return ref.randomize_bn(ref.build(name, num_classes=10, **kw)).float()


def _state_dict(m):
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _check_eval(name, size, fc):
    m = _reference(name, fc).eval()
    sd = _state_dict(m)
    model, params, state = from_torchvision(name, sd)
    x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    got, _ = jax.jit(lambda p, s, x: model.apply(p, s, x))(
        params, state, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert got.shape == want.shape == (2, 10)
    assert got.dtype == jnp.float32
    assert _rel_err(got, want) < 1e-4
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
    return m, sd, model, params, state, x


@pytest.mark.parametrize("name,size,fc", CASES, ids=[c[0] for c in CASES])
def test_eval_output_matches_pytorch(name, size, fc):
    _check_eval(name, size, fc)


@pytest.mark.slow
@pytest.mark.parametrize("name,size,fc", SLOW_CASES, ids=[c[0] for c in SLOW_CASES])
def test_eval_output_matches_pytorch_every_model(name, size, fc):
    _check_eval(name, size, fc)


def test_every_supported_model_has_a_case():
    from fdl.interop.torchvision import SUPPORTED

    assert sorted(SUPPORTED) == sorted(c[0] for c in CASES + SLOW_CASES)


def test_googlenet_ignores_auxiliary_classifiers_and_transforms_input():
    torch.manual_seed(0)
    m = ref.randomize_bn(ref.build("googlenet", num_classes=10, aux_logits=True,
                                   transform_input=True)).eval()
    sd = _state_dict(m)
    assert any(k.startswith("aux1.") for k in sd)
    from fdl.models import vision

    model, params, state = from_torchvision(
        "googlenet", sd, model=vision.googlenet_torchvision(10, transform_input=True))
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    got, _ = jax.jit(model.apply)(params, state, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert _rel_err(got, want) < 1e-4
    back = to_torchvision("googlenet", params, state)
    assert not any(k.startswith("aux") for k in back)


TRAIN_CASES = [
    ("resnet18", 64, None),
    ("vgg11", 32, 64),
    ("alexnet", 64, 64),
    ("mobilenet_v3_small", 64, None),  # BatchNorm momentum 0.01, eps 1e-3
    # DenseNet-121's training graph takes ~30 s (CPU time) to compile
    pytest.param("densenet121", 64, None, marks=pytest.mark.slow, id="densenet121"),
]


@pytest.mark.parametrize("name,size,fc", TRAIN_CASES)
def test_train_forward_running_stats_match(name, size, fc):
    m = _reference(name, fc)
    sd = _state_dict(m)
    model, params, state = from_torchvision(name, sd)
    x = np.random.default_rng(1).normal(size=(4, 3, size, size)).astype(np.float32)
    m.train()
    with torch.no_grad():
        m(torch.from_numpy(x))
    want = _state_dict(m)
    _, new_state = jax.jit(lambda p, s, x: model.apply(p, s, x, key=jax.random.key(0),
                                                        train=True))(
        params, state, jnp.asarray(x.transpose(0, 2, 3, 1)))
    got = to_torchvision(name, params, new_state)
    stat_keys = [k for k in want if k.endswith(("running_mean", "running_var"))]
    if name in ("vgg11", "alexnet"):
        assert not stat_keys
        return
    assert stat_keys
    for k in stat_keys:
        assert not np.allclose(want[k], sd[k]), k  # the statistics did move
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "vgg11", "alexnet", "vgg11_bn",
                                  "googlenet", "mobilenet_v2", "mobilenet_v3_small"])
def test_export_round_trip_loads_strictly_into_pytorch(name):
    fc = 32 if name.startswith(("vgg", "alexnet")) else None
    m = _reference(name, fc)
    sd = _state_dict(m)
    _, params, state = from_torchvision(name, sd)
    back = to_torchvision(name, params, state)
    assert set(back) == set(sd)
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    m2 = ref.build(name, num_classes=10, **({"fc_features": fc} if fc else {}))
    m2.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()},
                       strict=True)


def test_files_safetensors_and_pt(tmp_path):
    m = _reference("resnet18", None)
    sd = _state_dict(m)
    save_safetensors(tmp_path / "r18.safetensors", sd)
    torch.save(m.state_dict(), tmp_path / "r18.pt")
    a = load_state_dict(tmp_path / "r18.safetensors")
    b = load_state_dict(tmp_path / "r18.pt")
    assert set(a) == set(b) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(a[k], sd[k])
        np.testing.assert_array_equal(b[k], sd[k])
    _, p1, _ = from_torchvision("resnet18", tmp_path / "r18.safetensors")
    _, p2, _ = from_torchvision("resnet18", tmp_path / "r18.pt")
    np.testing.assert_array_equal(p1["features"]["conv1"]["w"], p2["features"]["conv1"]["w"])
    with pytest.raises(ValueError, match="unsupported state dict file"):
        load_state_dict(tmp_path / "r18.pkl")


def test_wrong_architecture_lists_every_unmatched_key():
    sd = _state_dict(_reference("resnet18", None))
    with pytest.raises(StateDictError) as ei:
        from_torchvision("resnet34", sd)
    err = ei.value
    # resnet34 has layer1.2, layer2.2-3, layer3.2-5, layer4.2 that resnet18 lacks
    assert "layer1.2.conv1.weight" in err.missing
    assert "layer3.5.bn2.running_var" in err.missing
    assert not err.unexpected and not err.mismatched
    assert "layer3.5.bn2.running_var" in str(err)

    with pytest.raises(StateDictError) as ei:
        from_torchvision("resnet50", sd)
    err = ei.value
    assert "layer1.0.conv3.weight" in err.missing
    assert ("layer1.0.conv1.weight: expected (64, 64, 1, 1), got (64, 64, 3, 3)"
            in err.mismatched)
    assert "layer1.0.conv1.weight" in str(err)


def test_unknown_and_misshaped_keys_reported_together():
    sd = _state_dict(_reference("resnet18", None))
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["layer2.0.bn1.weight"] = np.zeros(7, np.float32)
    del sd["fc.bias"]
    with pytest.raises(StateDictError) as ei:
        from_torchvision("resnet18", sd)
    err = ei.value
    assert err.unexpected == ["extra.weight"]
    assert err.missing == ["fc.bias"]
    assert err.mismatched == ["layer2.0.bn1.weight: expected (128,), got (7,)"]


def test_unsupported_name():
    with pytest.raises(ValueError, match="unsupported torchvision model"):
        from_torchvision("inception_v3", {})
    with pytest.raises(ValueError, match="unsupported torchvision model"):
        from_torchvision("vgg11bn", {})


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("vgg11", 224), ("vgg16", 224), ("alexnet", 224),
                                       ("resnet101", 64)])
def test_full_size_eval_output_matches_pytorch(name, size):
    _check_eval(name, size, None)
