"""NMS under jit: equality with the torchvision-semantics reference, the properties of a greedy
NMS, fixed-size outputs, masks, tiles, batching and no recompilation."""

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdl import ops
from fdl.testing import count_compilations

from . import reference as ref

N = 48  # one compiled shape for every hypothesis example (smaller sets are padded)


@st.composite
def box_sets(draw):
    n = draw(st.integers(1, N))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 60, (N, 2))
    wh = rng.uniform(2, 30, (N, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, N).astype(np.float32)
    if draw(st.booleans()):  # many ties
        scores = (np.round(scores * 4) / 4).astype(np.float32)
    classes = rng.integers(0, 3, N)
    thr = draw(st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0]))
    return boxes, scores, classes, n, thr


_nms = jax.jit(ops.nms, static_argnames=("iou_threshold", "max_outputs", "tile"))
_batched = jax.jit(ops.batched_nms, static_argnames=("iou_threshold", "max_outputs", "tile"))


def _kept(res):
    return np.asarray(res.indices)[: int(res.count)]


@given(box_sets())
def test_nms_equals_reference_and_keeps_greedy_properties(case):
    boxes, scores, classes, n, thr = case
    valid = np.arange(N) < n
    res = _nms(boxes, scores, iou_threshold=thr, valid=valid, tile=16)
    kept = _kept(res)
    np.testing.assert_array_equal(kept, ref.nms(boxes[:n], scores[:n], thr))
    assert np.all(np.asarray(res.indices)[int(res.count):] == -1)
    # the highest score first, then decreasing scores
    assert scores[kept[0]] == scores[:n].max()
    assert np.all(np.diff(scores[kept]) <= 0)
    # no kept pair above the threshold; every dropped box overlaps a better kept one
    iou = ref.box_iou(boxes[:n], boxes[:n])
    k = np.zeros(n, bool)
    k[kept] = True
    pair = iou[np.ix_(kept, kept)] > thr
    np.fill_diagonal(pair, False)
    assert not pair.any()
    for j in np.nonzero(~k)[0]:
        assert np.any(iou[kept, j] > thr)


@given(box_sets())
def test_batched_nms_is_per_class(case):
    boxes, scores, classes, n, thr = case
    valid = np.arange(N) < n
    kept = _kept(_batched(boxes, scores, classes, iou_threshold=thr, valid=valid, tile=16))
    np.testing.assert_array_equal(kept, ref.batched_nms(boxes[:n], scores[:n], classes[:n], thr))
    expected = ref.batched_nms_per_class(boxes[:n], scores[:n], classes[:n], thr)
    assert set(kept.tolist()) == set(expected.tolist())
    iou = ref.box_iou(boxes, boxes)
    same = classes[kept][:, None] == classes[kept][None, :]
    pair = (iou[np.ix_(kept, kept)] > thr) & same
    np.fill_diagonal(pair, False)
    assert not pair.any()


def test_max_outputs_is_a_prefix_and_tile_does_not_matter():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    full = _kept(_nms(boxes, scores, iou_threshold=0.4))
    for tile in (7, 512):
        np.testing.assert_array_equal(_kept(_nms(boxes, scores, iou_threshold=0.4, tile=tile)),
                                      full)
    res = _nms(boxes, scores, iou_threshold=0.4, max_outputs=10)
    assert res.indices.shape == (10,) and int(res.count) == min(10, len(full))
    np.testing.assert_array_equal(np.asarray(res.indices), full[:10])
    res = _nms(boxes, scores, iou_threshold=0.4, score_threshold=0.5)
    sel = np.nonzero(scores > 0.5)[0]
    np.testing.assert_array_equal(_kept(res), sel[ref.nms(boxes[sel], scores[sel], 0.4)])


def test_vmap_over_leading_axes_and_no_recompilation():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 50, (2, 3, 40, 2))
    boxes = np.concatenate([xy, xy + 15], -1).astype(np.float32)
    scores = rng.uniform(0, 1, (2, 3, 40)).astype(np.float32)
    fn = jax.jit(lambda b, s: ops.nms(b, s, 0.3, max_outputs=12))
    res = fn(boxes, scores)
    assert res.indices.shape == (2, 3, 12) and res.count.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            expected = ref.nms(boxes[i, j], scores[i, j], 0.3)[:12]
            np.testing.assert_array_equal(np.asarray(res.indices[i, j])[: int(res.count[i, j])],
                                          expected)
    with count_compilations(fn) as compiled:
        fn(boxes + 1, scores)
    assert compiled == []


def test_nms_mask_and_empty_input():
    res = ops.nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5, max_outputs=3)
    assert res.indices.tolist() == [-1, -1, -1] and int(res.count) == 0
    b = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    res = ops.nms(b, np.array([0.9, 0.8, 0.7], np.float32), 0.5)
    assert np.asarray(ops.nms_mask(res, 3)).tolist() == [True, False, True]


def test_bad_arguments():
    b = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="iou_threshold"):
        ops.nms(b, np.zeros(3, np.float32), 1.5)
    with pytest.raises(ValueError, match="scores"):
        ops.nms(b, np.zeros(4, np.float32), 0.5)
    with pytest.raises(ValueError, match="max_outputs"):
        ops.nms(b, np.zeros(3, np.float32), 0.5, max_outputs=0)
    with pytest.raises(ValueError, match="class_ids"):
        ops.batched_nms(b, np.zeros(3, np.float32), np.zeros(2, np.int32), 0.5)
