"""An in-memory data loader: keyed shuffling, batching, resumable position, prefetch to device.

The order of examples is a pure function of ``(key, epoch)``: epoch ``e`` visits a permutation
drawn by NumPy's PCG64 seeded with ``(*key_data(key), e)`` (NumPy's ``SeedSequence`` hashes the
words into independent streams), so a run restored at ``(epoch, batch)`` sees exactly the
batches an uninterrupted run would. The key's data are read once per key, so an epoch's order
costs no device work (a 1792-example permutation: ~20 us; ``jax.random.permutation`` takes
~0.5 ms on the CPU).

The final partial batch is dropped (``last_batch="drop"``), yielded smaller (``"keep"``,
one extra compilation), or padded to full size with a mask (``"pad"``: every batch then carries
a float32 ``mask`` of shape ``(batch_size,)``, 1 for real examples and 0 for padding, so every
step has the same shapes). The padding cycles the batch's real examples (``[a, b, c]`` padded to
8 is ``[a, b, c, a, b, c, a, b]``): the loss ignores it through the mask, but batch statistics
(BatchNorm in training mode) see every row, and cycling keeps them close to the real examples'
(equal when the batch size is a multiple of the real count), where repeating one example would
pull them toward it. For exact partial-batch statistics use ``"keep"`` or ``"drop"``.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["ArrayLoader", "batch_indices"]

_LAST = ("drop", "keep", "pad")

# ``device_resident=None`` keeps a dataset of at most this many bytes on the device.
DEVICE_RESIDENT_MAX_BYTES = 1 << 30


def _key_words(key) -> list[int]:
    """The words of ``key``'s data as Python ints (typed keys and raw ``uint32`` keys)."""
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).astype(np.uint64).ravel().tolist()


def _order(key_words: list[int] | None, epoch: int, n: int) -> np.ndarray:
    if key_words is None:
        return np.arange(n)
    return np.random.default_rng([*key_words, int(epoch)]).permutation(n)


def batch_indices(
    n: int, batch_size: int, *, key=None, epoch: int = 0, last_batch: str = "keep"
) -> list[np.ndarray]:
    """The index arrays of every batch of epoch ``epoch`` (shuffled by ``(key, epoch)`` as the
    module docstring says, when ``key`` is given). Padding (``last_batch="pad"``) is not
    included here."""
    return _split(_order(None if key is None else _key_words(key), epoch, n), n, batch_size,
                  last_batch)


def _split(order: np.ndarray, n: int, batch_size: int, last_batch: str) -> list[np.ndarray]:
    nb = n // batch_size if last_batch == "drop" else math.ceil(n / batch_size)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(nb)]


class ArrayLoader:
    """Batches of a tuple of equal-length arrays (or pytrees of them).

    ``ArrayLoader((x, y), batch_size=64, key=jax.random.key(0))`` yields ``(x_b, y_b)`` (or
    ``(x_b, y_b, mask)`` with ``last_batch="pad"``) as device arrays. An element may be a pytree
    (tuple, dict) of arrays, e.g. ``ArrayLoader(((src, src_len, tgt_in), (tgt_out, tgt_len)),
    64)``: its batches have the same structure. Iterating runs the rest of
    the current epoch from the current position and then advances to the next epoch;
    ``state()``/``set_state()`` save and restore the position ``{"epoch", "batch"}``.

    Args:
      arrays: a tuple (or list) of arrays, or pytrees of arrays, all with the same leading
        dimension. ``self.arrays`` holds the leaves, in ``jax.tree`` order.
      batch_size: examples per batch, ``1 <= batch_size <= n`` (a larger one is refused).
      key: PRNG key for shuffling; ``None`` keeps the stored order (use for evaluation).
      last_batch: ``"drop"``, ``"keep"`` or ``"pad"`` (see module docstring).
      prefetch: batches prepared and moved to the device ahead of use by a background thread
        (0 = none). Default ``None``: 2 on accelerators, 0 on CPU, where JAX's asynchronous
        dispatch already overlaps preparing the next batch with the running step and a thread
        would only compete for the cores.
      device_put: ``False`` yields NumPy arrays; ``True`` ``jax.device_put``s them, or pass a
        ``jax.sharding.Sharding`` to place (e.g. batch-shard) each array. A sharding over the
        devices of several processes (``fdl.parallel.batch_sharding(mesh)`` in a
        ``jax.distributed`` run) makes each process gather only the rows of every global batch
        that its devices hold and assemble the global array from them
        (``fdl.parallel.global_batch``): every process builds the same global batches, in an
        order that depends on ``(key, epoch)`` only, never on the process count.
      device_resident: let :func:`~fdl.train.fit` keep the whole dataset on the default device
        (copied once, on first use, and kept by the loader) and gather each batch inside its
        compiled step, instead of gathering on the host and transferring every batch. ``None``
        (default): when ``device_put`` is ``True``, the batch shapes are all equal (not
        ``last_batch="keep"`` with a partial batch) and the arrays total at most
        ``DEVICE_RESIDENT_MAX_BYTES``. The batches are the same either way.
    """

    def __init__(
        self,
        arrays: Sequence[Any],
        batch_size: int,
        *,
        key=None,
        last_batch: str = "keep",
        prefetch: int | None = None,
        device_put: Any = True,
        device_resident: bool | None = None,
    ):
        if not isinstance(arrays, (tuple, list)) or not arrays:
            raise TypeError("ArrayLoader: arrays must be a non-empty tuple of arrays")
        leaves, self.structure = jax.tree.flatten(tuple(arrays))
        if not leaves:
            raise TypeError("ArrayLoader: arrays holds no array")
        self.arrays = tuple(np.asarray(a) for a in leaves)
        n = len(self.arrays[0])
        for i, a in enumerate(self.arrays):
            if a.ndim == 0 or len(a) != n:
                raise ValueError(
                    f"ArrayLoader: all arrays need the same leading length; array 0 has {n}, "
                    f"array {i} has shape {a.shape}"
                )
        if n == 0:
            raise ValueError("ArrayLoader: the dataset is empty")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"ArrayLoader: batch_size must be an integer >= 1, got {batch_size!r}")
        if batch_size > n:
            raise ValueError(
                f"ArrayLoader: batch_size {batch_size} is larger than the dataset ({n} examples); "
                f"use a batch size between 1 and {n}"
            )
        if last_batch not in _LAST:
            raise ValueError(f"ArrayLoader: last_batch must be one of {_LAST}, got {last_batch!r}")
        if prefetch is None:
            prefetch = 0 if jax.default_backend() == "cpu" else 2
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"ArrayLoader: prefetch must be an integer >= 0, got {prefetch!r}")
        self.n = n
        self.batch_size = batch_size
        self.key = key
        self.last_batch = last_batch
        self.prefetch = prefetch
        self.device_put = device_put
        self.device_resident = device_resident
        self._device_arrays = None
        self.epoch = 0
        self.batch = 0

    # ------------------------------------------------------------------ order
    @property
    def key(self):
        """The shuffling key (``None``: stored order); assigning a new one re-reads its data."""
        return self._key

    @key.setter
    def key(self, key) -> None:
        self._key = key
        self._key_words = None if key is None else _key_words(key)

    def _batch_rows(self, epoch: int) -> list[np.ndarray]:
        """``batch_indices`` of ``epoch`` for this loader (the key's words read once)."""
        return _split(_order(self._key_words, epoch, self.n), self.n, self.batch_size,
                      self.last_batch)

    # ------------------------------------------------------------------ position
    def __len__(self) -> int:
        """Batches per epoch."""
        if self.last_batch == "drop":
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def state(self) -> dict[str, int]:
        """The position: the next batch to yield is batch ``batch`` of epoch ``epoch``."""
        return {"epoch": int(self.epoch), "batch": int(self.batch)}

    def set_state(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"ArrayLoader.set_state: invalid position {state!r}")
        self.epoch, self.batch = epoch, batch

    # ------------------------------------------------------------------ device-resident data
    @property
    def indexable_on_device(self) -> bool:
        """Whether batches can be gathered on the device from :meth:`device_arrays` with the
        index tables of :meth:`index_table` (see ``device_resident``)."""
        if self.device_put is not True or self.device_resident is False:
            return False
        if self.last_batch == "keep" and self.n % self.batch_size:
            return False
        if self.device_resident is None:
            return sum(a.nbytes for a in self.arrays) <= DEVICE_RESIDENT_MAX_BYTES
        return True

    def device_arrays(self) -> tuple:
        """The whole dataset on the default device (transferred once, then kept), in the
        structure of ``arrays``."""
        if self._device_arrays is None:
            leaves = list(jax.device_put(self.arrays))
            self._device_arrays = jax.tree.unflatten(self.structure, leaves)
        return self._device_arrays

    def _structured(self, flat: tuple) -> tuple:
        """A batch of leaves (and the mask) in the structure of ``arrays``."""
        k = len(self.arrays)
        return (*jax.tree.unflatten(self.structure, list(flat[:k])), *flat[k:])

    def index_table(self, epoch: int, start: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """Batches ``start, start+1, ...`` of ``epoch`` as a table: ``(idx, mask)``, ``idx`` of
        shape ``(batches, batch_size)`` int32 (row ``i`` selects the examples of batch
        ``start + i``, padding included) and ``mask`` float32 of the same shape with
        ``last_batch="pad"`` (else ``None``). Gathering row ``i`` of every array gives exactly
        the batch iteration yields. Only when all batches have ``batch_size`` examples."""
        bs, nb = self.batch_size, len(self)
        order = _order(self._key_words, epoch, self.n)
        full = self.n // bs  # batches with batch_size real examples
        if nb > full:  # a partial last batch
            if self.last_batch != "pad":
                raise ValueError("ArrayLoader.index_table: the last batch is partial "
                                 "(last_batch='keep'); use 'drop' or 'pad'")
            # padded by cycling its real examples, as iteration pads it
            order = np.concatenate([order[:full * bs], np.resize(order[full * bs:], bs)])
        # one reshape, no per-batch Python work: fit calls this with the device idle
        idx = order[:nb * bs].reshape(nb, bs)[start:].astype(np.int32)
        mask = None
        if self.last_batch == "pad":
            mask = np.ones(idx.shape, np.float32)
            if nb > full and start < nb:
                mask[-1, self.n - full * bs:] = 0.0
        return idx, mask

    # ------------------------------------------------------------------ batches
    def _host_batch(self, idx: np.ndarray) -> tuple[np.ndarray, ...]:
        """The batch of examples ``idx`` (padded), or, when ``device_put`` is a sharding over
        several processes, only the rows of it that this process's devices hold."""
        mask = None
        if self.last_batch == "pad":
            mask = np.zeros(self.batch_size, np.float32)
            mask[: len(idx)] = 1.0
            if len(idx) < self.batch_size:  # cycle the real examples (see the module docstring)
                idx = np.resize(idx, self.batch_size)
        rows = self._process_rows(len(idx))
        if rows is not None:
            idx = idx[rows]
            mask = None if mask is None else mask[rows]
        out = tuple(a[idx] for a in self.arrays)
        return out if mask is None else (*out, mask)

    def _process_rows(self, n: int):
        """Rows of an ``n``-row batch this process loads (``None``: all; see ``device_put``)."""
        if self.device_put in (True, False, None):
            return None
        from fdl.distributed.placement import process_rows

        return process_rows(self.device_put, n)

    def _place(self, batch, n: int):
        if self.device_put is False or self.device_put is None:
            return batch
        if self.device_put is True:
            return tuple(jax.device_put(b) for b in batch)
        from fdl.distributed.placement import global_batch

        return global_batch(batch, self.device_put, n)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[tuple]:
        """Batches ``start, start+1, ...`` of ``epoch`` (does not move the position)."""
        idxs = self._batch_rows(epoch)
        pad = self.last_batch == "pad"
        gen = (self._structured(self._place(self._host_batch(i),
                                            self.batch_size if pad else len(i)))
               for i in idxs[start:])
        if self.prefetch > 0:
            return _prefetch(gen, self.prefetch)
        return gen

    def __iter__(self) -> Iterator[tuple]:
        epoch, start = self.epoch, self.batch
        for b in self.epoch_batches(epoch, start):
            self.batch += 1
            yield b
        self.epoch, self.batch = epoch + 1, 0


def _prefetch(gen: Iterator, size: int) -> Iterator:
    """Run ``gen`` in a background thread, ``size`` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def worker():
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # surface errors in the consumer
            q.put(e)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
