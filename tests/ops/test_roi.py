"""RoI align / RoI pool: equality with the torchvision-semantics reference on random inputs,
float64 gradient checks, batching and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fdl.testing as ft
from fdl import ops

from . import reference as ref

K = 6


@st.composite
def roi_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(2, 9, 11, 2)).astype(np.float32)
    xy = rng.uniform(-3, 20, (K, 2))
    wh = rng.uniform(0.2, 14, (K, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    bidx = rng.integers(0, 2, K).astype(np.int32)
    size = draw(st.sampled_from([(2, 2), (3, 4)]))
    return feats, boxes, bidx, size


_align = jax.jit(ops.roi_align, static_argnames=("output_size", "spatial_scale", "sampling_ratio",
                                                 "aligned", "max_sampling_ratio"))
_pool = jax.jit(ops.roi_pool, static_argnames=("output_size", "spatial_scale"))


@settings(max_examples=5)
@given(roi_cases(), st.sampled_from([2, -1]), st.booleans())
def test_roi_align_equals_reference(case, sampling_ratio, aligned):
    feats, boxes, bidx, size = case
    got = _align(feats, boxes, size, box_indices=bidx, spatial_scale=0.8,
                 sampling_ratio=sampling_ratio, aligned=aligned, max_sampling_ratio=13)
    expected = ref.roi_align(feats, boxes, bidx, size, 0.8, sampling_ratio, aligned)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=6)
@given(roi_cases())
def test_roi_pool_equals_reference(case):
    feats, boxes, bidx, size = case
    got = _pool(feats, boxes, size, box_indices=bidx, spatial_scale=0.8)
    np.testing.assert_array_equal(np.asarray(got), ref.roi_pool(feats, boxes, bidx, size, 0.8))


def test_roi_align_gradients_float64():
    rng = np.random.default_rng(3)
    feats = jnp.asarray(rng.normal(size=(2, 6, 7, 2)))
    # corners away from integer sample crossings (the bilinear weights' kinks)
    boxes = jnp.asarray([[0.63, 1.21, 4.37, 4.86], [1.12, 0.34, 5.71, 3.93]], jnp.float64)
    bidx = jnp.array([0, 1])

    @jax.jit
    def f(x, b):
        return ops.roi_align(x, b, (2, 3), box_indices=bidx, sampling_ratio=2, aligned=True)

    assert f(feats, boxes).dtype == jnp.float64
    ft.check_gradients(f, (feats, boxes), order=1, eps=1e-5, dense_check_max_size=0)


def test_roi_pool_gradient_goes_to_the_maxima():
    rng = np.random.default_rng(4)
    feats = jnp.asarray(rng.permutation(2 * 8 * 8 * 2).reshape(2, 8, 8, 2) * 0.1)
    boxes = jnp.array([[0.0, 0.0, 5.0, 6.0]], jnp.float64)
    fn = jax.jit(lambda x: jnp.sum(ops.roi_pool(x, boxes, 2, box_indices=jnp.array([1]))))
    ft.check_gradients(fn, (feats,), order=1, eps=1e-4, dense_check_max_size=0)
    g = np.asarray(jax.grad(fn)(feats))
    assert g[0].sum() == 0 and g[1].sum() == 2 * 2 * 2


def test_bad_input():
    f = jnp.zeros((2, 5, 5, 3))
    with pytest.raises(ValueError, match="box_indices"):
        ops.roi_align(f, jnp.zeros((1, 4)), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ops.roi_pool(f, jnp.zeros((1, 4)), 2, box_indices=np.array([2]))
    with pytest.raises(ValueError, match="NHWC"):
        ops.roi_align(jnp.zeros((5, 5, 3)), jnp.zeros((1, 4)), 2)
    with pytest.raises(ValueError, match="output_size"):
        ops.roi_align(f, jnp.zeros((1, 4)), 0, box_indices=np.array([0]))
