"""fdl's box ops (and the NumPy references of ``reference.py``) against outputs recorded from
``torchvision.ops`` (``torchvision_golden.npz``; see ``make_torchvision_golden.py`` for why they
are recorded: torchvision cannot be imported beside torch 2.13.0+cpu). A live comparison runs
in ``test_torchvision_live.py`` where torchvision imports."""

import os

import jax
import numpy as np
import pytest

from fdl import ops

from . import reference as ref

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_golden.npz")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN, allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


def test_golden_file_records_torchvision(golden):
    assert "torchvision" in str(golden["versions"])


def test_box_iou_and_giou(golden):
    a, b = golden["iou_a"], golden["iou_b"]
    np.testing.assert_allclose(np.asarray(ops.box_iou(a, b)), golden["iou_out"], rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(ops.generalized_box_iou(a, b)), golden["giou_out"],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref.box_iou(a, b), golden["iou_out"], rtol=1e-6, atol=1e-7)


def _cases(golden):
    return sorted({k.split("_")[0] for k in golden if k.startswith("nms")})


def _padded(golden, c, n=1500):
    """The case's boxes, scores and classes padded to ``n`` (one compiled shape for all)."""
    boxes, scores, classes = golden[f"{c}_boxes"], golden[f"{c}_scores"], golden[f"{c}_classes"]
    k = len(boxes)
    pad = lambda a: np.concatenate([a, np.zeros((n - k, *a.shape[1:]), a.dtype)])  # noqa: E731
    return pad(boxes), pad(scores), pad(classes), np.arange(n) < k


_nms = jax.jit(ops.nms, static_argnames="iou_threshold")
_batched = jax.jit(ops.batched_nms, static_argnames="iou_threshold")


def test_nms_equals_torchvision(golden):
    for c in _cases(golden):
        boxes, scores = golden[f"{c}_boxes"], golden[f"{c}_scores"]
        thr = float(golden[f"{c}_thr"])
        pb, ps, _, valid = _padded(golden, c)
        res = _nms(pb, ps, thr, valid=valid)
        got = np.asarray(res.indices)[: int(res.count)]
        np.testing.assert_array_equal(got, golden[f"{c}_keep"], err_msg=c)
        assert np.all(np.asarray(res.indices)[int(res.count):] == -1)
        if len(boxes) <= 200:  # the Python loops are slow
            np.testing.assert_array_equal(ref.nms(boxes, scores, thr), golden[f"{c}_keep"])


def test_batched_nms_equals_torchvision(golden):
    for c in _cases(golden):
        boxes, scores = golden[f"{c}_boxes"], golden[f"{c}_scores"]
        classes, thr = golden[f"{c}_classes"], float(golden[f"{c}_thr"])
        pb, ps, pc, valid = _padded(golden, c)
        res = _batched(pb, ps, pc, thr, valid=valid)
        got = np.asarray(res.indices)[: int(res.count)]
        expected = golden[f"{c}_batched_keep"]
        if len(boxes) <= 1000:  # torchvision's coordinate trick: the same order, tie for tie
            np.testing.assert_array_equal(got, expected, err_msg=c)
            if len(boxes) <= 200:
                np.testing.assert_array_equal(ref.batched_nms(boxes, scores, classes, thr),
                                              expected)
        else:  # torchvision runs one nms per class and sorts the union (unstable on ties)
            assert set(got.tolist()) == set(expected.tolist()), c
            np.testing.assert_array_equal(np.sort(scores[got])[::-1], scores[expected])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("size", [(7, 7), (3, 5)])
def test_roi_align_equals_torchvision(golden, aligned, sampling_ratio, size):
    f, b, bi = golden["roi_features"], golden["roi_boxes"], golden["roi_indices"]
    expected = golden[f"align_{int(aligned)}_{sampling_ratio}_{size[0]}x{size[1]}"]
    got = ops.roi_align(f, b, size, box_indices=bi, spatial_scale=0.5,
                        sampling_ratio=sampling_ratio, aligned=aligned)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    mine = ref.roi_align(f, b[:12], bi[:12], size, 0.5, sampling_ratio, aligned)
    np.testing.assert_allclose(mine, expected[:12], rtol=1e-5, atol=1e-6)


def test_roi_align_adaptive_under_jit_with_a_bound(golden):
    f, b, bi = golden["roi_features"], golden["roi_boxes"], golden["roi_indices"]
    expected = golden["align_1_-1_7x7"]
    grid = np.ceil((b[:, 2:] - b[:, :2]) * 0.5 / 7).max()
    fn = jax.jit(lambda f, b, i: ops.roi_align(f, b, 7, box_indices=i, spatial_scale=0.5,
                                               aligned=True, max_sampling_ratio=int(grid)))
    np.testing.assert_allclose(np.asarray(fn(f, b, bi)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_sampling_ratio"):
        jax.jit(lambda f, b: ops.roi_align(f, b, 7, box_indices=bi))(f, b)


@pytest.mark.parametrize("size", [(7, 7), (3, 5), (2, 2)])
def test_roi_pool_equals_torchvision(golden, size):
    f, b, bi = golden["roi_features"], golden["roi_boxes"], golden["roi_indices"]
    expected = golden[f"pool_{size[0]}x{size[1]}"]
    got = jax.jit(lambda f, b, i: ops.roi_pool(f, b, size, box_indices=i, spatial_scale=0.5))(
        f, b, bi)
    np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(ref.roi_pool(f, b, bi, size, 0.5), expected)
