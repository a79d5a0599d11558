"""ArrayLoader: order is a pure function of the key, batching modes, resumable position."""

import jax
import numpy as np
import pytest

from fdl.data import ArrayLoader, batch_indices, synthetic_linear_data


def _data(n=10):
    return np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n, dtype=np.int32)


def _epoch(loader):
    return [tuple(np.asarray(a) for a in b) for b in loader]


def test_order_is_pure_function_of_key():
    x, y = _data(23)
    a = ArrayLoader((x, y), 5, key=jax.random.key(3), prefetch=0)
    b = ArrayLoader((x, y), 5, key=jax.random.key(3), prefetch=2)
    c = ArrayLoader((x, y), 5, key=jax.random.key(4), prefetch=0)
    ea, eb, ec = _epoch(a), _epoch(b), _epoch(c)
    for (xa, ya), (xb, yb) in zip(ea, eb, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, x[ya])
    ya_all = np.concatenate([b[1] for b in ea])
    assert sorted(ya_all.tolist()) == list(range(23))  # a permutation
    assert ya_all.tolist() != np.concatenate([b[1] for b in ec]).tolist()
    # the next epoch uses a different order
    assert np.concatenate([b[1] for b in _epoch(a)]).tolist() != ya_all.tolist()


def test_no_key_keeps_order_and_keep_last():
    x, y = _data(7)
    batches = _epoch(ArrayLoader((x, y), 3, prefetch=0))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]


def test_drop_last():
    x, y = _data(7)
    loader = ArrayLoader((x, y), 3, last_batch="drop", prefetch=0)
    assert len(loader) == 2
    assert [b[1].tolist() for b in _epoch(loader)] == [[0, 1, 2], [3, 4, 5]]


def test_pad_and_mask():
    x, y = _data(7)
    loader = ArrayLoader((x, y), 3, last_batch="pad", prefetch=0)
    batches = _epoch(loader)
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)
    xb, yb, mb = batches[-1]
    assert xb.shape == (3, 2) and mb.dtype == np.float32
    assert mb.tolist() == [1.0, 0.0, 0.0] and yb[0] == 6
    assert batches[0][2].tolist() == [1.0, 1.0, 1.0]
    # the padding cycles the real examples: BatchNorm's batch statistics of [8, 9, 8, 9] are
    # those of [8, 9]
    x, y = _data(10)
    xb, yb, mb = _epoch(ArrayLoader((x, y), 4, last_batch="pad", prefetch=0))[-1]
    assert yb.tolist() == [8, 9, 8, 9] and mb.tolist() == [1.0, 1.0, 0.0, 0.0]
    np.testing.assert_array_equal(xb, x[[8, 9, 8, 9]])


def test_resume_position():
    x, y = _data(20)
    full = ArrayLoader((x, y), 4, key=jax.random.key(1), prefetch=0)
    ref = _epoch(full) + _epoch(full)
    part = ArrayLoader((x, y), 4, key=jax.random.key(1), prefetch=1)
    it = iter(part)
    got = [tuple(np.asarray(a) for a in next(it)) for _ in range(3)]
    state = part.state()
    assert state == {"epoch": 0, "batch": 3}
    resumed = ArrayLoader((x, y), 4, key=jax.random.key(1), prefetch=0)
    resumed.set_state(state)
    got += _epoch(resumed) + _epoch(resumed)
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a[1], b[1])


def test_batch_indices_matches_loader():
    idx = batch_indices(10, 4, key=jax.random.key(2), epoch=1)
    loader = ArrayLoader((np.arange(10),), 4, key=jax.random.key(2), prefetch=0)
    loader.set_state({"epoch": 1, "batch": 0})
    assert [b[0].tolist() for b in _epoch(loader)] == [i.tolist() for i in idx]


def test_bad_arguments():
    x, y = _data(5)
    with pytest.raises(ValueError, match="larger than the dataset"):
        ArrayLoader((x, y), 6)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ArrayLoader((x, y), 0)
    with pytest.raises(ValueError, match="same leading length"):
        ArrayLoader((x, y[:3]), 2)
    with pytest.raises(ValueError, match="last_batch"):
        ArrayLoader((x, y), 2, last_batch="wrap")


def test_prefetch_propagates_errors():
    class Boom(Exception):
        pass

    x, y = _data(6)
    loader = ArrayLoader((x, y), 2, prefetch=2)

    def bad(_):
        raise Boom()

    loader._host_batch = bad
    with pytest.raises(Boom):
        _epoch(loader)


def test_synthetic_linear_data():
    w = np.array([2.0, -3.4])
    x, y = synthetic_linear_data(jax.random.key(0), w, 4.2, 1000, noise=0.01)
    assert x.shape == (1000, 2) and y.shape == (1000, 1) and x.dtype == np.float32
    coef, *_ = np.linalg.lstsq(np.c_[np.asarray(x), np.ones(1000)], np.asarray(y)[:, 0], rcond=None)
    np.testing.assert_allclose(coef, [2.0, -3.4, 4.2], atol=0.01)


@pytest.mark.parametrize("last_batch,n", [("pad", 23), ("drop", 23), ("keep", 20)])
def test_index_table_gathers_the_iterated_batches(last_batch, n):
    x, y = _data(n)
    loader = ArrayLoader((x, y), 5, key=jax.random.key(2), last_batch=last_batch, prefetch=0)
    assert loader.indexable_on_device
    batches = _epoch(loader)
    for start in (0, 2):
        idx, mask = loader.index_table(0, start)
        assert idx.dtype == np.int32 and idx.shape == (len(batches) - start, 5)
        assert (mask is None) == (last_batch != "pad")
        for i, b in enumerate(batches[start:]):
            np.testing.assert_array_equal(x[idx[i]], b[0])
            np.testing.assert_array_equal(y[idx[i]], b[1])
            if mask is not None:
                np.testing.assert_array_equal(mask[i], b[2])
    dev = loader.device_arrays()
    assert dev is loader.device_arrays()  # transferred once
    np.testing.assert_array_equal(np.asarray(dev[0]), x)


def test_indexable_on_device_conditions():
    x, y = _data(23)
    assert not ArrayLoader((x, y), 5, last_batch="keep").indexable_on_device  # partial batch
    assert not ArrayLoader((x, y), 5, last_batch="pad", device_put=False).indexable_on_device
    assert not ArrayLoader((x, y), 5, last_batch="pad", device_resident=False).indexable_on_device


def test_epoch_order_is_a_pure_function_of_key_and_epoch():
    """Every key flavour shuffles; the order depends on the key's data and the epoch only, and
    assigning ``loader.key`` (as fit does on resume) re-reads the key."""
    n = 50
    makers = [lambda: jax.random.key(0), lambda: jax.random.key(2**31 + 3),
              lambda: jax.random.PRNGKey(5), lambda: jax.random.key(7, impl="rbg")]
    keys = [make() for make in makers]
    orders = []
    for make in makers:
        for epoch in (0, 1, 2**31 - 1):
            order = np.concatenate(batch_indices(n, 10, key=make(), epoch=epoch))
            assert sorted(order.tolist()) == list(range(n))
            np.testing.assert_array_equal(
                np.concatenate(batch_indices(n, 10, key=make(), epoch=epoch)), order)
            orders.append(tuple(order.tolist()))
    assert len(set(orders)) == len(orders)  # distinct keys and epochs: distinct orders
    x = np.arange(n)
    loader = ArrayLoader((x,), 10, key=keys[0], prefetch=0)
    loader.key = keys[1]
    fresh = ArrayLoader((x,), 10, key=keys[1], prefetch=0)
    assert [b[0].tolist() for b in _epoch(loader)] == [b[0].tolist() for b in _epoch(fresh)]
