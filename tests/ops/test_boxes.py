"""Box conversions, area, IoU/GIoU properties, clipping and the eager ``check_boxes``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fdl import ops

from . import reference as ref


def _boxes(n=10):
    """``n`` valid corner boxes (x0 <= x1, y0 <= y1) with sides of at least 0.5 (one shape:
    nothing recompiles between examples)."""

    @st.composite
    def draw(draw_):
        xy = draw_(hnp.arrays(np.float32, (n, 2), elements=st.floats(-50, 50, width=32)))
        wh = draw_(hnp.arrays(np.float32, (n, 2), elements=st.floats(0.5, 40, width=32)))
        return np.concatenate([xy, xy + wh], 1)

    return draw()


@jax.jit
def _round_trip(b):
    c = ops.box_corner_to_center(b)
    return c, ops.box_center_to_corner(c), ops.box_area(b)


@given(_boxes())
def test_corner_center_round_trip(b):
    c, back, area = map(np.asarray, _round_trip(b))
    np.testing.assert_allclose(back, b, atol=1e-4)
    np.testing.assert_allclose(c[:, 2] * c[:, 3], area, rtol=1e-5)


@jax.jit
def _all_ious(a, b):
    return (ops.box_iou(a, b), ops.box_iou(b, a), ops.box_iou(a, a), ops.generalized_box_iou(a, b),
            ops.paired_box_iou(a[:, None], b[None]),
            ops.paired_generalized_box_iou(a[:, None], b[None]))


@given(_boxes(), _boxes())
def test_iou_symmetric_bounded_and_equal_to_reference(a, b):
    iou, iou_ba, iou_aa, giou, paired, paired_g = map(np.asarray, _all_ious(a, b))
    np.testing.assert_allclose(iou, iou_ba.T, rtol=1e-6)
    assert np.all((iou >= 0) & (iou <= 1))
    np.testing.assert_allclose(iou, ref.box_iou(a, b), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.diag(iou_aa), 1.0, rtol=1e-6)
    assert np.all((giou >= -1 - 1e-6) & (giou <= iou + 1e-6))
    np.testing.assert_allclose(paired, iou, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(paired_g, giou, rtol=1e-5, atol=1e-6)


def test_iou_of_empty_boxes_is_zero_not_nan():
    z = jnp.zeros((2, 4))
    assert np.all(np.asarray(ops.box_iou(z, z)) == 0)
    assert np.all(np.isfinite(np.asarray(ops.generalized_box_iou(z, z))))


def test_batched_leading_axes_and_jit():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 10, (3, 5, 2))
    b = np.concatenate([xy, xy + 2], -1).astype(np.float32)
    out = jax.jit(ops.box_iou)(b, b[:, :4])
    assert out.shape == (3, 5, 4)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(ops.box_iou(b[i], b[i, :4])))


def test_clip_boxes():
    b = jnp.array([[-3.0, 2.0, 40.0, 50.0]])
    np.testing.assert_array_equal(np.asarray(ops.clip_boxes(b, (30, 20))), [[0, 2, 20, 30]])


def test_check_boxes_refuses_bad_boxes():
    good = np.array([[0, 0, 1, 1], [2, 2, 3, 4]], np.float32)
    assert ops.check_boxes(good, [0, 1], num_classes=2).dtype == np.float32
    with pytest.raises(ValueError, match="x1 < x0"):
        ops.check_boxes([[0, 0, 1, 1], [3, 0, 2, 1]])
    with pytest.raises(ValueError, match="NaN"):
        ops.check_boxes([[0, np.nan, 1, 1]])
    with pytest.raises(ValueError, match="empty"):
        ops.check_boxes(np.zeros((0, 4)))
    assert ops.check_boxes(np.zeros((0, 4)), allow_empty=True).shape == (0, 4)
    with pytest.raises(ValueError, match="out of range.*0..1"):
        ops.check_boxes(good, [0, 2], num_classes=2)
    with pytest.raises(ValueError, match="not an integer"):
        ops.check_boxes(good, [0, 0.5])
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        ops.check_boxes(np.zeros((2, 5)))
    # padding rows are not checked
    ops.check_boxes([[0, 0, 1, 1], [9, 9, -1, -1]], [0, -1], num_classes=1, padding_label=-1)


def test_shape_errors_name_the_function():
    with pytest.raises(ValueError, match="box_iou.*shape"):
        ops.box_iou(jnp.zeros((3, 5)), jnp.zeros((2, 4)))
