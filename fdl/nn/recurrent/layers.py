"""Stacked, bidirectional RNN/GRU/LSTM layers (:func:`rnn`, :func:`gru`, :func:`lstm`), their
recurrent states, and :func:`run_direction` (one direction of one layer: fused or scan)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fdl.nn.core import Layer, ShapeError, check_positive_int, require_key
from fdl.nn.recurrent.cells import CELLS, init_direction_params, project_inputs
from fdl.nn.recurrent.fused import fused_direction
from fdl.nn.recurrent.scan import scan_cell

__all__ = ["RecurrentLayer", "apply_with_state", "detach_state", "gru", "initial_state", "lstm",
           "rnn", "run_direction"]


def run_direction(
    kind: str,
    params: dict,
    xs: jax.Array,
    carry: Any,
    *,
    reverse: bool = False,
    unroll: int = 1,
    seq_lengths: jax.Array | None = None,
    impl: str = "fused",
) -> tuple[Any, jax.Array]:
    """One direction of one layer on time-major ``xs`` (T, B, in): hoisted projection, then the
    recurrence. Returns ``(final_carry, ys (T, B, H))``.

    ``impl="fused"`` (used when ``seq_lengths`` is None) runs :func:`fused_direction`
    (projection + recurrence under one custom VJP), whose hand-written backward pass keeps only
    the gate gradients and ``dgates @ w_hh.T`` in the reverse loop and computes every weight and
    bias gradient after it in one matmul (or sum) over all ``T*B`` rows;
    ``impl="scan"`` differentiates :func:`scan_cell` by JAX autodiff (also supports forward
    mode, ``jax.jvp``, which the fused custom-VJP path does not). Both give the same values.
    """
    if impl not in ("fused", "scan"):
        raise ValueError(f"run_direction: impl must be 'fused' or 'scan', got {impl!r}")
    if impl == "scan" or seq_lengths is not None or xs.shape[0] == 0:
        xp = project_inputs(kind, params, xs)
        return scan_cell(CELLS[kind], params, xp, carry, time_major=True, reverse=reverse,
                         unroll=unroll, seq_lengths=seq_lengths)
    if reverse:
        carry, ys = fused_direction(kind, params, jnp.flip(xs, 0), carry, unroll=unroll)
        return carry, jnp.flip(ys, 0)
    return fused_direction(kind, params, xs, carry, unroll=unroll)


# ----------------------------------------------------------------------------- states


def initial_state(kind: str, batch_size: int, hidden_size: int, *, num_layers: int = 1,
                  bidirectional: bool = False, dtype=jnp.float32) -> Any:
    """Zero recurrent state: ``(L*D, B, H)`` for RNN/GRU, a pair of those for LSTM."""
    d = 2 if bidirectional else 1
    z = jnp.zeros((num_layers * d, batch_size, hidden_size), dtype)
    return (z, z) if kind == "lstm" else z


def detach_state(state: Any) -> Any:
    """Truncated BPTT: ``stop_gradient`` on every array of a recurrent state, so a state
    carried into the next minibatch starts a new gradient graph."""
    return jax.tree_util.tree_map(lax.stop_gradient, state)


# ----------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True, repr=False)
class RecurrentLayer(Layer):
    """A :class:`~fdl.nn.core.Layer` (``init``/``apply``) plus the recurrent extras:
    :meth:`apply_with_state` and :meth:`initial_state`. Built by :func:`rnn`, :func:`gru`,
    :func:`lstm`."""

    kind: str = "gru"
    hidden_size: int = 1
    num_layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = False
    time_major: bool = False
    unroll: int = 1
    impl: str = "fused"

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def initial_state(self, batch_size: int, dtype=jnp.float32) -> Any:
        """Zero recurrent state for this layer (see the module docstring for the layout)."""
        return initial_state(self.kind, batch_size, self.hidden_size, num_layers=self.num_layers,
                             bidirectional=self.bidirectional, dtype=dtype)

    def apply_with_state(
        self,
        params: dict,
        x: jax.Array,
        initial_state: Any = None,
        *,
        seq_lengths: jax.Array | None = None,
        key=None,
        train: bool = False,
    ) -> tuple[jax.Array, Any]:
        """Run the stack from ``initial_state`` (``None`` = zeros).

        ``x``: (batch, steps, in) (``(steps, batch, in)`` if ``time_major``).
        ``seq_lengths``: optional (batch,) int valid lengths (see :func:`scan_cell`).
        ``key``: needed when ``train`` and ``dropout > 0`` (dropout between layers).
        Returns ``(outputs, final_state)``: outputs ``(batch, steps, D*H)`` (time-major if
        ``time_major``; the last layer's, both directions concatenated, zero past each length),
        final state in the layout of :meth:`initial_state`.
        """
        return _apply_stack(self, params, x, initial_state, seq_lengths=seq_lengths, key=key,
                            train=train)


def apply_with_state(layer: RecurrentLayer, params: dict, x: jax.Array, initial_state: Any = None,
                     *, seq_lengths=None, key=None, train: bool = False) -> tuple[jax.Array, Any]:
    """Function form of :meth:`RecurrentLayer.apply_with_state`."""
    return layer.apply_with_state(params, x, initial_state, seq_lengths=seq_lengths, key=key,
                                  train=train)


def _check_input(layer: RecurrentLayer, shape, params=None) -> None:
    layout = "(steps, batch, features)" if layer.time_major else "(batch, steps, features)"
    if len(shape) != 3:
        raise ShapeError(layer.kind, f"expected input of rank 3 {layout}, got shape {tuple(shape)}")
    if params is not None:
        n_in = params["l0"]["fwd"]["w_ih"].shape[0]
        if shape[-1] != n_in:
            raise ShapeError(layer.kind, f"expected input {layout} with {n_in} features, got "
                             f"shape {tuple(shape)}")


def _check_state(layer: RecurrentLayer, state, batch: int, dtype) -> Any:
    want = (layer.num_layers * layer.num_directions, batch, layer.hidden_size)
    if state is None:
        return layer.initial_state(batch, dtype)
    parts = state if layer.kind == "lstm" else (state,)
    if layer.kind == "lstm" and not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise ShapeError("lstm", "expected initial_state to be a pair (h, c)")
    for p in parts:
        if tuple(jnp.shape(p)) != want:
            raise ShapeError(layer.kind, f"expected initial_state of shape {want} "
                             f"(num_layers*num_directions, batch, hidden), got {jnp.shape(p)}")
    return tuple(parts) if layer.kind == "lstm" else state


def _apply_stack(layer: RecurrentLayer, params, x, state0, *, seq_lengths, key, train):
    _check_input(layer, jnp.shape(x), params)
    xs = x if layer.time_major else jnp.swapaxes(x, 0, 1)  # (T, B, F)
    batch = xs.shape[1]
    state0 = _check_state(layer, state0, batch, xs.dtype)
    if seq_lengths is not None:
        seq_lengths = jnp.asarray(seq_lengths)
        if seq_lengths.shape != (batch,):
            raise ShapeError(layer.kind, f"expected seq_lengths of shape ({batch},), got "
                             f"{seq_lengths.shape}")
    use_dropout = train and layer.dropout > 0.0 and layer.num_layers > 1
    if use_dropout:
        require_key(layer.kind, key)
    d = layer.num_directions
    finals_h, finals_c = [], []
    for li in range(layer.num_layers):
        if li > 0 and use_dropout:
            k = jax.random.fold_in(key, li)
            keep = jax.random.bernoulli(k, 1.0 - layer.dropout, xs.shape)
            xs = jnp.where(keep, xs / (1.0 - layer.dropout), jnp.zeros((), xs.dtype))
        outs = []
        for di, dname in enumerate(("fwd", "bwd")[:d]):
            idx = li * d + di
            if layer.kind == "lstm":
                c0 = (state0[0][idx], state0[1][idx])
            else:
                c0 = state0[idx]
            carry, ys = run_direction(layer.kind, params[f"l{li}"][dname], xs, c0,
                                      reverse=(di == 1), unroll=layer.unroll,
                                      seq_lengths=seq_lengths, impl=layer.impl)
            outs.append(ys)
            if layer.kind == "lstm":
                finals_h.append(carry[0])
                finals_c.append(carry[1])
            else:
                finals_h.append(carry)
        xs = outs[0] if d == 1 else jnp.concatenate(outs, axis=-1)
    out = xs if layer.time_major else jnp.swapaxes(xs, 0, 1)
    h_n = jnp.stack(finals_h)
    final = (h_n, jnp.stack(finals_c)) if layer.kind == "lstm" else h_n
    return out, final


def _make(kind: str, hidden_size: int, num_layers: int, dropout: float, bidirectional: bool,
          time_major: bool, unroll: int, impl: str, dtype) -> RecurrentLayer:
    check_positive_int(kind, "hidden_size", hidden_size)
    if impl not in ("fused", "scan"):
        raise ValueError(f"{kind}: impl must be 'fused' or 'scan', got {impl!r}")
    check_positive_int(kind, "num_layers", num_layers)
    check_positive_int(kind, "unroll", unroll)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0.0 <= dropout < 1.0):
        raise ValueError(f"{kind}: dropout must satisfy 0 <= dropout < 1, got {dropout!r}")
    d = 2 if bidirectional else 1
    holder: dict[str, RecurrentLayer] = {}

    def init(key, in_shape):
        self = holder["self"]
        _check_input(self, in_shape)
        n_in = in_shape[-1]
        params = {}
        for li in range(num_layers):
            lp = {}
            for di, dname in enumerate(("fwd", "bwd")[:d]):
                k = jax.random.fold_in(key, li * d + di)
                lp[dname] = init_direction_params(k, kind, n_in if li == 0 else d * hidden_size,
                                                  hidden_size, dtype)
            params[f"l{li}"] = lp
        out_shape = (*in_shape[:2], d * hidden_size)
        return out_shape, params, {}

    def apply(params, state, x, *, key=None, train=False):
        y, _ = _apply_stack(holder["self"], params, x, None, seq_lengths=None, key=key,
                            train=train)
        return y, state

    layer = RecurrentLayer(
        init, apply, name=kind,
        config={"hidden_size": hidden_size, "num_layers": num_layers, "dropout": float(dropout),
                "bidirectional": bool(bidirectional), "time_major": bool(time_major),
                "unroll": unroll, "impl": impl},
        kind=kind, hidden_size=hidden_size, num_layers=num_layers, dropout=float(dropout),
        bidirectional=bool(bidirectional), time_major=bool(time_major), unroll=unroll,
        impl=impl,
    )
    holder["self"] = layer
    return layer


def rnn(hidden_size: int, *, num_layers: int = 1, dropout: float = 0.0,
        bidirectional: bool = False, time_major: bool = False, unroll: int = 1,
        impl: str = "fused", dtype=jnp.float32) -> RecurrentLayer:
    """Stacked (bidirectional) tanh RNN. Input ``(batch, steps, in)``, output
    ``(batch, steps, D*hidden_size)``; ``dropout`` between layers in training (needs ``key``)."""
    return _make("rnn", hidden_size, num_layers, dropout, bidirectional, time_major, unroll, impl,
                 dtype)


def gru(hidden_size: int, *, num_layers: int = 1, dropout: float = 0.0,
        bidirectional: bool = False, time_major: bool = False, unroll: int = 1,
        impl: str = "fused", dtype=jnp.float32) -> RecurrentLayer:
    """Stacked (bidirectional) GRU; see :func:`rnn` and the module docstring."""
    return _make("gru", hidden_size, num_layers, dropout, bidirectional, time_major, unroll, impl,
                 dtype)


def lstm(hidden_size: int, *, num_layers: int = 1, dropout: float = 0.0,
         bidirectional: bool = False, time_major: bool = False, unroll: int = 1,
         impl: str = "fused", dtype=jnp.float32) -> RecurrentLayer:
    """Stacked (bidirectional) LSTM; see :func:`rnn` and the module docstring."""
    return _make("lstm", hidden_size, num_layers, dropout, bidirectional, time_major, unroll,
                 impl, dtype)
