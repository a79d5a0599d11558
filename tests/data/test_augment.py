"""Augmentations: shapes/dtypes preserved, deterministic per key, usable in jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdl.data import augment as A

IMG = jax.random.uniform(jax.random.key(1), (12, 10, 3), jnp.float32)

SAME_SHAPE = {
    "flip_lr": A.random_flip_left_right(),
    "flip_ud": A.random_flip_up_down(),
    "brightness": A.random_brightness(0.4),
    "contrast": A.random_contrast(0.4),
    "saturation": A.random_saturation(0.4),
    "hue": A.random_hue(0.2),
    "jitter": A.color_jitter(0.3, 0.3, 0.3, 0.1),
    "normalize": A.normalize([0.5, 0.4, 0.3], [0.2, 0.2, 0.2]),
    "cutout": A.cutout(4),
    "crop_pad": A.random_crop((12, 10), padding=2),
}
RESHAPING = {
    "crop": (A.random_crop(6), (6, 6, 3)),
    "center": (A.center_crop((4, 8)), (4, 8, 3)),
    "resize": (A.resize((20, 7)), (20, 7, 3)),
    "rrc": (A.random_resized_crop(8, scale=(0.2, 1.0)), (8, 8, 3)),
}


@pytest.mark.parametrize("name", sorted(SAME_SHAPE) + sorted(RESHAPING))
def test_shape_dtype_determinism_jit(name):
    if name in SAME_SHAPE:
        aug, shape = SAME_SHAPE[name], IMG.shape
    else:
        aug, shape = RESHAPING[name]
    k = jax.random.key(5)
    out = jax.jit(aug)(k, IMG)
    assert out.shape == shape and out.dtype == IMG.dtype
    np.testing.assert_array_equal(out, jax.jit(aug)(jax.random.key(5), IMG))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_random_ones_vary_with_key():
    for aug in (A.random_crop(6), A.random_brightness(0.5), A.random_resized_crop(8)):
        f = jax.jit(lambda k, aug=aug: A.apply_batch(aug, k, jnp.stack([IMG] * 5)))
        outs = list(np.asarray(f(jax.random.key(0))))
        assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_flip_is_a_flip():
    outs = A.apply_batch(A.random_flip_left_right(), jax.random.key(0), jnp.stack([IMG] * 8))
    for o in outs:
        assert np.array_equal(o, IMG) or np.array_equal(o, IMG[:, ::-1])
    assert any(np.array_equal(o, IMG[:, ::-1]) for o in outs)
    assert np.array_equal(A.random_flip_up_down(p=1.0)(jax.random.key(0), IMG), IMG[::-1])


def test_crop_is_a_window_of_the_image():
    out = np.asarray(A.random_crop((5, 4))(jax.random.key(3), IMG))
    img = np.asarray(IMG)
    hits = [(y, x) for y in range(8) for x in range(7)
            if np.array_equal(img[y:y + 5, x:x + 4], out)]
    assert hits


def test_rrc_full_scale_ratio_one_is_resize():
    aug = A.random_resized_crop((12, 12), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    sq = IMG[:10, :10]
    out = aug(jax.random.key(0), sq)
    ref = jax.image.resize(sq, (12, 12, 3), "linear", antialias=False)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_hue_zero_identity_and_gray_invariant():
    np.testing.assert_allclose(A.random_hue(0.0)(jax.random.key(0), IMG), IMG, atol=1e-5)
    gray = jnp.broadcast_to(IMG[..., :1], IMG.shape)
    np.testing.assert_allclose(A.random_hue(0.4)(jax.random.key(0), gray), gray, atol=1e-5)


def test_apply_batch_and_compose():
    aug = A.compose(A.random_flip_left_right(), A.random_crop(8, padding=1), A.cutout(2))
    batch = jnp.stack([IMG] * 4)
    f = jax.jit(A.apply_batch, static_argnums=0)
    out = f(aug, jax.random.key(0), batch)
    assert out.shape == (4, 8, 8, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, f(aug, jax.random.key(0), batch))
    assert not np.array_equal(out[0], out[1]) or not np.array_equal(out[1], out[2])


def test_mixup():
    x = jax.random.uniform(jax.random.key(0), (6, 4, 4, 1), jnp.float32)
    y = jax.nn.one_hot(jnp.arange(6) % 3, 3, dtype=jnp.float32)
    xm, ym = jax.jit(A.mixup(0.4))(jax.random.key(2), x, y)
    assert xm.shape == x.shape and ym.shape == y.shape and xm.dtype == x.dtype
    np.testing.assert_allclose(ym.sum(-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        A.mixup(0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="p must be in"):
        A.random_flip_left_right(1.5)
    with pytest.raises(ValueError, match="size"):
        A.random_crop((0, 3))
    with pytest.raises(ValueError, match="scale"):
        A.random_resized_crop(4, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match=r"expected an image \(H, W, C\)"):
        A.random_flip_left_right()(jax.random.key(0), IMG[0])
    with pytest.raises(ValueError, match="std"):
        A.normalize([0.0], [0.0])


# ----------------------------------------------------------------------------- wiring


def test_from_spec_builds_the_named_chain():
    img = jnp.arange(8 * 8 * 3, dtype=jnp.float32).reshape(8, 8, 3)
    out = A.from_spec("flip, crop")(jax.random.key(0), img)
    assert out.shape == img.shape and out.dtype == img.dtype
    # flip alone is a flip or the identity
    flips = [A.from_spec("flip")(jax.random.key(k), img) for k in range(8)]
    assert all(np.array_equal(f, img) or np.array_equal(f, img[:, ::-1]) for f in flips)
    assert any(not np.array_equal(f, img) for f in flips)
    for spec in ("vflip,cutout", "jitter"):
        assert A.from_spec(spec)(jax.random.key(1), img / img.max()).shape == img.shape
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['rotate'\]"):
        A.from_spec("flip,rotate")
    with pytest.raises(ValueError, match="empty"):
        A.from_spec(" , ")


def test_augmented_model_augments_only_in_training_and_trains_with_fit():
    from fdl import nn, optim
    from fdl.train import fit

    seen = []
    probe = nn.lambda_layer(lambda x: (seen.append(x) or x), name="probe",
                            shape_fn=lambda s: s)
    model = nn.serial(("probe", probe), nn.flatten(), ("fc", nn.dense(2)))
    aug_model = A.augmented(model, A.from_spec("flip"))
    x = jnp.tile(jnp.arange(4, dtype=jnp.float32)[None, None, :, None], (6, 4, 1, 1))
    _, params, state = aug_model.init(jax.random.key(0), x.shape)
    y_eval, _ = aug_model.apply(params, state, x)
    np.testing.assert_array_equal(y_eval, model.apply(params, state, x)[0])
    with pytest.raises(ValueError, match="augmented: train=True needs a PRNG key"):
        aug_model.apply(params, state, x, train=True)
    out, _ = jax.jit(lambda p, s, k: aug_model.apply(p, s, x, key=k, train=True))(
        params, state, jax.random.key(3))
    flipped = np.asarray(jax.jit(lambda k: A.apply_batch(A.from_spec("flip"),
                                                         jax.random.fold_in(k, 0x417567), x))(
        jax.random.key(3)))
    assert 0 < np.sum(np.any(flipped != np.asarray(x), axis=(1, 2, 3))) < 6
    np.testing.assert_allclose(out, model.apply(params, state, jnp.asarray(flipped))[0],
                               rtol=1e-6)
    labels = jnp.asarray([0, 1, 0, 1, 0, 1])
    res = fit(aug_model, params, state, optim.sgd(0.1), (x, labels), epochs=2, batch_size=3,
              key=jax.random.key(1), print_fn=None, progress=False)
    assert len(res.history) == 2
