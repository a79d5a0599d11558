"""Smoke tests of examples/vision (tiny settings): train.py runs and reports metrics; the
fine-tuning example loads a safetensors backbone, keeps it frozen in "freeze" mode and learns
a generated two-class image folder."""

import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

EXAMPLES = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "examples", "vision"))
sys.path.insert(0, EXAMPLES)


def _load(name):
    """Import examples/vision/<name>.py under a unique module name (``train`` would clash
    with the tests/train package)."""
    spec = importlib.util.spec_from_file_location(f"vision_example_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

pytest.importorskip("sklearn")
PIL = pytest.importorskip("PIL")


def test_train_script_smoke(capsys):
    train = _load("train")

    r = train.main(["--model", "lenet_bn", "--epochs", "2", "--max-train", "256"])
    out = capsys.readouterr().out
    assert "train loss" in out and "test acc" in out
    assert np.isfinite(r["train_loss"]) and 0.0 <= r["test_acc"] <= 1.0
    assert r["train_acc"] > 0.2  # BN LeNet learns something from 256 digits in 2 epochs


def _write_bars(root, n_per_class, size, seed):
    """Two classes: a bright horizontal bar ("hotdog") or a vertical one, on noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in ("hotdog", "not-hotdog"):
        os.makedirs(os.path.join(root, cls))
        for i in range(n_per_class):
            a = rng.uniform(0, 0.3, size=(size, size, 3))
            p = rng.integers(2, size - 4)
            if cls == "hotdog":
                a[p:p + 3, :, 0] = 1.0
            else:
                a[:, p:p + 3, 0] = 1.0
            Image.fromarray((a * 255).astype(np.uint8)).save(os.path.join(root, cls, f"{i}.png"))


@pytest.mark.slow  # two tiny ResNet-18 fits: ~70 s CPU on the shared machine
def test_finetune_example(tmp_path):
    finetune = _load("finetune")

    from fdl.interop import save_safetensors, to_torchvision

    size, base = 16, 4
    _write_bars(tmp_path / "train", 16, size, 0)
    _write_bars(tmp_path / "test", 8, size, 1)
    backbone = finetune.build(7, base, True)
    params, state = jax.jit(backbone.init_params, static_argnums=1)(
        jax.random.key(3), (1, size, size, 3))
    sd = to_torchvision("resnet18", params, state)
    save_safetensors(tmp_path / "backbone.safetensors", sd)

    # constant learning rate: 24 steps of the cosine-decayed default are too few here
    kw = dict(size=size, base_channels=base, epochs=6, batch_size=8, lr=0.01, cosine=False,
              print_fn=None)
    r = finetune.finetune(str(tmp_path / "backbone.safetensors"), str(tmp_path / "train"),
                          str(tmp_path / "test"), mode="freeze", **kw)
    assert r["classes"] == ["hotdog", "not-hotdog"] and r["n_train"] == 32
    # frozen backbone (nn.frozen at "features"): exactly the checkpoint's weights and running
    # statistics after training; a new 2-class head
    np.testing.assert_array_equal(r["params"]["features"]["conv1"]["w"],
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(r["state"]["features"]["layer2"]["0"]["bn1"]["var"],
                                  sd["layer2.0.bn1.running_var"])
    assert r["bn_stats_moved"] == 0.0
    assert r["params"]["head"]["w"].shape == (8 * base, 2)

    r = finetune.finetune(str(tmp_path / "backbone.safetensors"), str(tmp_path / "train"),
                          str(tmp_path / "test"), mode="finetune", **kw)
    assert not np.array_equal(r["params"]["features"]["conv1"]["w"],
                              sd["conv1.weight"].transpose(2, 3, 1, 0))
    assert r["bn_stats_moved"] > 0  # the whole network trains, statistics re-estimated
    assert r["test_acc"] >= 0.8, r


def test_glyphs_are_digit_like_labelled_and_seeded():
    glyphs = _load("glyphs")
    x, y = glyphs.make_glyphs(3, glyphs.CHARACTERS, seed=5)
    assert x.shape == (3 * 62, 8, 8, 1) and x.dtype == np.float32
    assert y.dtype == np.int32 and np.bincount(y).tolist() == [3] * 62
    assert x.min() >= 0.0 and 0.8 <= x.max() <= 1.0
    assert (x.reshape(len(x), -1).max(axis=1) >= 0.8).all()  # every glyph has ink
    x2, y2 = glyphs.make_glyphs(3, glyphs.CHARACTERS, seed=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = glyphs.make_glyphs(3, glyphs.CHARACTERS, seed=6)
    assert not np.array_equal(x, x3)
    # the same character drawn twice differs (size, stroke, rotation, shear, elastic warp)
    a_glyphs = x[y == 0]
    assert not np.array_equal(a_glyphs[0], a_glyphs[1])
