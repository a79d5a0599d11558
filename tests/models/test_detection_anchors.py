"""Anchors, assignment, offsets, multibox_target and multibox_detection against the book's
worked examples and its PyTorch code (``d2l_detection_reference.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdl.models import detection as D

torch = pytest.importorskip("torch")
from scripts.bench.references import tinyssd_torch as book  # noqa: E402  (the book's code)


@pytest.mark.parametrize("hw,sizes,ratios", [((32, 32), [0.2, 0.272], [1, 2, 0.5]),
                                             ((5, 7), [0.75, 0.5, 0.25], [1, 2, 0.5]),
                                             ((1, 1), [0.88, 0.961], [1, 2, 0.5]),
                                             ((3, 2), [0.4], [1.5, 1, 0.25, 3])])
def test_multibox_prior_equals_book(hw, sizes, ratios):
    got = np.asarray(D.multibox_prior(hw, sizes, ratios))
    expected = book.multibox_prior(*hw, sizes, ratios)[0].numpy()
    assert got.shape == (hw[0] * hw[1] * (len(sizes) + len(ratios) - 1), 4)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_tiny_ssd_has_5444_anchors_at_256():
    shapes = [(32, 32), (16, 16), (8, 8), (4, 4), (1, 1)]
    n = sum(D.multibox_prior(s, D.SIZES[i], D.RATIOS[i]).shape[0] for i, s in enumerate(shapes))
    assert n == 5444


# the book's worked example (ch. 14.4.3): two objects, five anchors
GT = np.array([[[0, 0.1, 0.08, 0.52, 0.92], [1, 0.55, 0.2, 0.9, 0.88]]], np.float32)
ANCHORS = np.array([[0, 0.1, 0.2, 0.3], [0.15, 0.2, 0.4, 0.4], [0.63, 0.05, 0.88, 0.98],
                    [0.66, 0.45, 0.8, 0.8], [0.57, 0.3, 0.92, 0.9]], np.float32)


_target = jax.jit(D.multibox_target)
_detection = jax.jit(D.multibox_detection)


def test_multibox_target_book_example():
    offsets, mask, labels = map(np.asarray, _target(ANCHORS, GT))
    np.testing.assert_array_equal(labels, [[0, 1, 2, 0, 2]])
    np.testing.assert_array_equal(mask, [[0] * 4 + [1] * 8 + [0] * 4 + [1] * 4])
    printed = [0, 0, 0, 0, 1.40e00, 1.00e01, 2.59e00, 7.18e00, -1.20e00, 2.69e-01, 1.68e00,
               -1.57e00, 0, 0, 0, 0, -5.71e-01, -1.00e00, 4.17e-06, 6.26e-01]
    np.testing.assert_allclose(offsets[0], printed, rtol=5e-3, atol=1e-6)


def test_multibox_detection_book_example():
    anchors = np.array([[0.1, 0.08, 0.52, 0.92], [0.08, 0.2, 0.56, 0.95],
                        [0.15, 0.3, 0.62, 0.91], [0.55, 0.2, 0.9, 0.88]], np.float32)
    cls_probs = np.array([[[0] * 4, [0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]]], np.float32)
    out = np.asarray(_detection(cls_probs, np.zeros((1, 16), np.float32), anchors))
    expected = [[0, 0.9, 0.1, 0.08, 0.52, 0.92], [1, 0.9, 0.55, 0.2, 0.9, 0.88],
                [-1, 0.8, 0.08, 0.2, 0.56, 0.95], [-1, 0.7, 0.15, 0.3, 0.62, 0.91]]
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    kept = D.detections_to_list(out, score_threshold=0.5)
    assert [k[:, 0].tolist() for k in kept] == [[0, 1]]


_ANC = D.multibox_prior((6, 6), [0.3, 0.45], [1, 2, 0.5])  # 144 anchors


@st.composite
def ground_truth(draw, batch=3, max_objects=4):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    labels = np.full((batch, max_objects, 5), -1, np.float32)
    per_image = []
    for i in range(batch):
        k = int(rng.integers(0 if i else 1, max_objects + 1))  # an image may have no object
        xy = rng.uniform(0, 0.8, (k, 2))
        wh = rng.uniform(0.02, 0.5, (k, 2))
        rows = np.concatenate([rng.integers(0, 3, (k, 1)), xy, np.minimum(xy + wh, 1)], 1)
        slots = np.sort(rng.choice(max_objects, k, replace=False))  # padding anywhere
        labels[i, slots] = rows
        per_image.append(rows.astype(np.float32))
    return labels, per_image


@settings(max_examples=8)
@given(ground_truth())
def test_multibox_target_equals_book(case):
    labels, per_image = case
    got = list(map(np.asarray, _target(_ANC, labels)))
    expected = [t.numpy() for t in book.multibox_target(
        torch.tensor(np.asarray(_ANC))[None], [torch.tensor(p) for p in per_image])]
    np.testing.assert_array_equal(got[2], expected[2])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for i, p in enumerate(per_image):  # every object gets at least one anchor
        assert set(np.unique(got[2][i][got[2][i] > 0]) - 1) == set(p[:, 0].astype(int))


@settings(max_examples=6)
@given(st.integers(0, 2**31 - 1))
def test_multibox_detection_equals_book(seed):
    rng = np.random.default_rng(seed)
    a = _ANC.shape[0]
    logits = rng.normal(size=(2, a, 3)).astype(np.float32) * 3
    probs = np.asarray(jax.nn.softmax(logits, -1)).transpose(0, 2, 1)
    offsets = rng.normal(size=(2, a * 4)).astype(np.float32) * 0.5
    got = np.asarray(_detection(probs, offsets, _ANC))
    expected = book.multibox_detection(torch.tensor(probs), torch.tensor(offsets),
                                       torch.tensor(np.asarray(_ANC))[None]).numpy()
    np.testing.assert_array_equal(got[..., 0], expected[..., 0])
    np.testing.assert_allclose(got[..., 1:], expected[..., 1:], rtol=1e-5, atol=1e-6)


@settings(max_examples=10)
@given(st.integers(0, 2**31 - 1))
def test_offsets_round_trip(seed):
    rng = np.random.default_rng(seed)
    anchors = np.asarray(_ANC)
    xy = rng.uniform(0, 0.7, (len(anchors), 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (len(anchors), 2))], 1)
    boxes = boxes.astype(np.float32)
    back = D.offset_inverse(anchors, D.offset_boxes(anchors, boxes))
    np.testing.assert_allclose(np.asarray(back), boxes, atol=2e-5)
    offsets = rng.normal(size=(len(anchors), 4)).astype(np.float32)
    again = D.offset_boxes(anchors, D.offset_inverse(anchors, offsets), eps=0.0)
    np.testing.assert_allclose(np.asarray(again), offsets, atol=2e-4)


def test_all_padding_image_is_all_background():
    labels = np.full((1, 3, 5), -1, np.float32)
    off, mask, cls = map(np.asarray, _target(ANCHORS, labels))
    assert not off.any() and not mask.any() and not cls.any()


def test_bad_ground_truth_is_refused_eagerly():
    good = GT.copy()
    with pytest.raises(ValueError, match="out of range"):
        D.multibox_target(ANCHORS, good, num_classes=1)
    bad = good.copy()
    bad[0, 0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        D.multibox_target(ANCHORS, bad)
    bad = good.copy()
    bad[0, 1, 1], bad[0, 1, 3] = 0.9, 0.5
    with pytest.raises(ValueError, match="x1 < x0"):
        D.multibox_target(ANCHORS, bad)
    with pytest.raises(ValueError, match="no rows"):
        D.multibox_target(ANCHORS, np.zeros((1, 0, 5), np.float32))
    bad = good.copy()
    bad[0, 0, 0] = -3
    with pytest.raises(ValueError, match="negative"):
        D.check_targets(bad)
    with pytest.raises(ValueError, match="max_objects=3"):
        D.check_targets(good, max_objects=3)
    with pytest.raises(ValueError, match="at least as many anchors"):
        D.multibox_target(ANCHORS[:1], good)
    with pytest.raises(ValueError, match=r"\(batch, max_objects, 5\)"):
        D.check_targets(np.zeros((2, 5)))


def test_target_under_vmap_of_jit_is_batched():
    off, mask, cls = jax.jit(D.multibox_target)(jnp.asarray(ANCHORS), jnp.tile(GT, (4, 1, 1)))
    assert off.shape == (4, 20) and cls.shape == (4, 5)
    np.testing.assert_array_equal(np.asarray(cls), [[0, 1, 2, 0, 2]] * 4)
