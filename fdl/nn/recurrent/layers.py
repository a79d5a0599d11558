"""Stacked, bidirectional RNN/GRU/LSTM layers (:func:`rnn`, :func:`gru`, :func:`lstm`) whose
recurrent carry is layer state, and :func:`run_direction` (one direction of one layer).

**The carry is layer state.** ``init(key, (batch, steps, features))`` returns the zero carry
for that batch size as ``state``; ``apply(params, state, x)`` starts from the carry in ``state``
and returns the final carry as the new state, so the next call continues where this one
stopped (truncated BPTT over consecutive chunks = feed ``new_state`` back; to reset, pass the
state ``init`` returned, or :func:`fdl.nn.reset_state`). Layout, **batch first** (so a decoder's
beam search can reorder rows of any state leaf)::

    RNN/GRU: {"h": (batch, num_layers * num_directions, H)}
    LSTM:    {"h": (batch, L * D, P or H), "c": (batch, L * D, H)}   # P = proj_size

(row ``layer * num_directions + direction`` of axis 1, PyTorch's ``h_n`` order). An empty state
``{}`` means zeros (PyTorch's ``h0=None``).

``carry="keep"`` (the default for unidirectional layers) is the behaviour above. ``carry="reset"``
starts every call from zeros whatever ``state`` holds (still returning the final carry in the new
state): use it where consecutive calls see unrelated sequences -- sequence classifiers, encoders,
the book's random sampler -- and ``fdl.train.fit`` threads the state from batch to batch. It is
the default, and the only mode, of bidirectional layers: their backward direction reads each
sequence from its end, so a carry continued from the previous chunk means nothing for it.

``seq_lengths`` (batch,) int, a keyword of ``apply``: sequence ``b`` is valid for its first
``seq_lengths[b]`` steps; its carry freezes after them (the final state is the one at its last
valid step) and its outputs there are zero; the backward direction starts at step
``seq_lengths[b] - 1`` (PyTorch's packed sequences). Lengths must lie in ``[0, steps]``: out of
range is a ``ShapeError`` when the lengths are concrete, and under ``jit`` a run-time error (a
``JaxRuntimeError`` carrying the same message, raised when the result is used; the check is a
host callback, which ``jax.export`` does not serialise -- pass valid lengths there).

:meth:`RecurrentLayer.apply_with_state` is a thin helper over the same computation taking and
returning PyTorch's ``(h0, c0)`` layout ``(L * D, batch, H)`` (used by the PyTorch equality
tests and weight-import users).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdl.nn.core import Layer, ShapeError, check_positive_int, require_key
from fdl.nn.recurrent.cells import CELLS, init_direction_params, project_inputs
from fdl.nn.recurrent.fused import fused_direction
from fdl.nn.recurrent.scan import scan_cell

__all__ = ["CARRY_MODES", "RecurrentLayer", "apply_with_state", "detach_state", "gru",
           "initial_state", "lstm", "rnn", "run_direction"]

CARRY_MODES = ("keep", "reset")


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
    (projection + recurrence with hand-written derivatives), whose backward pass keeps only
    the gate gradients and ``dgates @ w_hh.T`` in the reverse loop and computes every weight and
    bias gradient after it in one matmul (or sum) over all ``T*B`` rows;
    ``impl="scan"`` differentiates :func:`scan_cell` by JAX autodiff. Both give the same values
    and support every transformation (the fused path's forward mode runs the XLA loop's JVP).
    The LSTM projection (``w_hr`` in ``params``) always runs through :func:`scan_cell`.
    """
    if impl not in ("fused", "scan"):
        raise ValueError(f"run_direction: impl must be 'fused' or 'scan', got {impl!r}")
    if impl == "scan" or seq_lengths is not None or xs.shape[0] == 0 or "w_hr" in params:
        xp = project_inputs(kind, params, xs)
        return scan_cell(CELLS[kind], params, xp, carry, time_major=True, reverse=reverse,
                         unroll=unroll, seq_lengths=seq_lengths)
    if reverse:
        carry, ys = fused_direction(kind, params, jnp.flip(xs, 0), carry, unroll=unroll)
        return carry, jnp.flip(ys, 0)
    return fused_direction(kind, params, xs, carry, unroll=unroll)


# ----------------------------------------------------------------------------- states


def initial_state(kind: str, batch_size: int, hidden_size: int, *, num_layers: int = 1,
                  bidirectional: bool = False, dtype=jnp.float32, proj_size: int = 0) -> Any:
    """Zero recurrent state in PyTorch's layout: ``(L*D, B, H)`` for RNN/GRU, a pair
    ``(h (L*D, B, P or H), c (L*D, B, H))`` for LSTM."""
    d = 2 if bidirectional else 1
    h = jnp.zeros((num_layers * d, batch_size, proj_size or hidden_size), dtype)
    if kind == "lstm":
        return h, jnp.zeros((num_layers * d, batch_size, hidden_size), dtype)
    return h


def detach_state(state: Any) -> Any:
    """Truncated BPTT: ``stop_gradient`` on every array of a recurrent state, so a state
    carried into the next minibatch starts a new gradient graph."""
    return jax.tree_util.tree_map(lax.stop_gradient, state)


# ----------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True, repr=False)
class RecurrentLayer(Layer):
    """A :class:`~fdl.nn.core.Layer` whose ``state`` is the recurrent carry (see the module
    docstring), plus :meth:`apply_with_state` (PyTorch's state layout) and
    :meth:`initial_state`. Built by :func:`rnn`, :func:`gru`, :func:`lstm`.

    ``apply(params, state, x, *, key=None, train=False, seq_lengths=None) -> (y, new_state)``:
    ``x`` (batch, steps, in) (``(steps, batch, in)`` if ``time_major``), ``y`` (batch, steps,
    D * (P or H)); ``key`` is needed when ``train`` and ``dropout > 0`` (between layers)."""

    kind: str = "gru"
    hidden_size: int = 1
    num_layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = False
    time_major: bool = False
    unroll: int = 1
    impl: str = "fused"
    carry: str = "keep"
    nonlinearity: str = "tanh"
    proj_size: int = 0

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Features of ``h`` per direction: ``proj_size`` if set, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    @property
    def cell_kind(self) -> str:
        """The cell run by :func:`run_direction`: ``kind``, or ``"rnn_relu"``."""
        return "rnn_relu" if self.kind == "rnn" and self.nonlinearity == "relu" else self.kind

    def initial_state(self, batch_size: int, dtype=jnp.float32) -> Any:
        """Zero recurrent state in PyTorch's layout (for :meth:`apply_with_state`)."""
        return initial_state(self.kind, batch_size, self.hidden_size, num_layers=self.num_layers,
                             bidirectional=self.bidirectional, dtype=dtype,
                             proj_size=self.proj_size)

    def zero_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        """The zero layer state for ``batch_size`` sequences (what ``init`` returns)."""
        return _to_layer_state(self, self.initial_state(batch_size, dtype))

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
        """Run the stack from ``initial_state`` in PyTorch's layout (``None`` = zeros; see
        :meth:`initial_state`), whatever the ``carry`` mode: the same computation as ``apply``
        with the state converted. Returns ``(outputs, final_state)``, the final state in the
        layout of :meth:`initial_state`."""
        _check_input(self, jnp.shape(x), params)
        xs = x if self.time_major else jnp.swapaxes(x, 0, 1)
        batch, steps = xs.shape[1], xs.shape[0]
        state0 = _check_torch_state(self, initial_state, batch, xs.dtype)
        lengths = _check_lengths(self, seq_lengths, batch, steps)
        return _apply_stack(self, params, xs, state0, seq_lengths=lengths, key=key, train=train)


def apply_with_state(layer: RecurrentLayer, params: dict, x: jax.Array, initial_state: Any = None,
                     *, seq_lengths=None, key=None, train: bool = False) -> tuple[jax.Array, Any]:
    """Function form of :meth:`RecurrentLayer.apply_with_state`."""
    return layer.apply_with_state(params, x, initial_state, seq_lengths=seq_lengths, key=key,
                                  train=train)


def _layout(layer: RecurrentLayer) -> str:
    return "(steps, batch, features)" if layer.time_major else "(batch, steps, features)"


def _check_input(layer: RecurrentLayer, shape, params=None) -> None:
    if len(shape) != 3:
        raise ShapeError(layer.kind, f"expected input of rank 3 {_layout(layer)}, got shape "
                         f"{tuple(shape)}")
    if params is not None:
        n_in = params["l0"]["fwd"]["w_ih"].shape[0]
        if shape[-1] != n_in:
            raise ShapeError(layer.kind, f"expected input {_layout(layer)} with {n_in} features, "
                             f"got shape {tuple(shape)}")


def _torch_state_shapes(layer: RecurrentLayer, batch: int) -> dict[str, tuple[int, ...]]:
    rows = layer.num_layers * layer.num_directions
    shapes = {"h": (rows, batch, layer.output_size)}
    if layer.kind == "lstm":
        shapes["c"] = (rows, batch, layer.hidden_size)
    return shapes


def _check_torch_state(layer: RecurrentLayer, state, batch: int, dtype) -> Any:
    if state is None:
        return layer.initial_state(batch, dtype)
    if layer.kind == "lstm" and not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise ShapeError("lstm", "expected initial_state to be a pair (h, c)")
    parts = tuple(state) if layer.kind == "lstm" else (state,)
    for (name, want), p in zip(_torch_state_shapes(layer, batch).items(), parts, strict=True):
        if tuple(jnp.shape(p)) != want:
            raise ShapeError(layer.kind, f"expected initial_state {name} of shape {want} "
                             f"(num_layers*num_directions, batch, hidden), got {jnp.shape(p)}")
    return parts if layer.kind == "lstm" else state


def _to_layer_state(layer: RecurrentLayer, torch_state) -> dict:
    """PyTorch layout ``(L*D, B, H)`` (pair for LSTM) -> the batch-first state dict."""
    if layer.kind == "lstm":
        return {"h": jnp.swapaxes(torch_state[0], 0, 1), "c": jnp.swapaxes(torch_state[1], 0, 1)}
    return {"h": jnp.swapaxes(torch_state, 0, 1)}


def _from_layer_state(layer: RecurrentLayer, state: dict, batch: int, dtype) -> Any:
    """The layer state (checked against ``batch`` and this layer) -> PyTorch layout in
    ``dtype``; ``{}`` or ``carry="reset"`` -> zeros."""
    if layer.carry == "reset" or (isinstance(state, dict) and not state):
        return layer.initial_state(batch, dtype)
    want = {k: (s[1], s[0], s[2]) for k, s in _torch_state_shapes(layer, batch).items()}
    if not isinstance(state, dict) or set(state) != set(want):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ShapeError(layer.kind, f"expected a {layer.kind} state with keys {sorted(want)}, "
                         f"got {got} (a state from another layer?)")
    for name, shape in want.items():
        got = tuple(jnp.shape(state[name]))
        if got != shape:
            raise ShapeError(
                layer.kind, f"expected state[{name!r}] of shape {shape} (batch, num_layers * "
                f"num_directions, features) for an input batch of {batch}, got {got}: a state "
                "from another batch size or layer (start from the state init returns for this "
                "batch, or nn.init_state(layer, in_shape))")
    parts = tuple(jnp.swapaxes(state[k], 0, 1).astype(dtype) for k in want)
    return parts if layer.kind == "lstm" else parts[0]


def _lengths_error(layer: RecurrentLayer, steps: int, lengths) -> str:
    return (f"seq_lengths must lie in [0, {steps}] (the number of steps), got "
            f"{np.asarray(lengths).tolist()}")


def _check_lengths(layer: RecurrentLayer, seq_lengths, batch: int, steps: int):
    """``seq_lengths`` as an int array of shape (batch,), in range (see the module docstring:
    a ShapeError now, or a run-time error under ``jit``)."""
    if seq_lengths is None:
        return None
    lengths = jnp.asarray(seq_lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ShapeError(layer.kind, f"expected integer seq_lengths of shape ({batch},), got "
                         f"{lengths.dtype} {lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer):
        if np.any((np.asarray(lengths) < 0) | (np.asarray(lengths) > steps)):
            raise ShapeError(layer.kind, _lengths_error(layer, steps, lengths))
        return lengths

    def fail_if(bad, values):
        if bad:
            raise ValueError(f"{layer.kind}: {_lengths_error(layer, steps, values)}")

    jax.debug.callback(fail_if, jnp.any((lengths < 0) | (lengths > steps)), lengths)
    return lengths


def _dropout(layer: RecurrentLayer, xs, key, li: int):
    keep = jax.random.bernoulli(jax.random.fold_in(key, li), 1.0 - layer.dropout, xs.shape)
    return jnp.where(keep, xs / (1.0 - layer.dropout), jnp.zeros((), xs.dtype))


def _apply_stack(layer: RecurrentLayer, params, xs, state0, *, seq_lengths, key, train):
    """The stack on time-major ``xs`` (T, B, F) from ``state0`` (PyTorch layout). Returns
    ``(outputs in the layer's layout, final state in PyTorch's layout)``."""
    use_dropout = train and layer.dropout > 0.0 and layer.num_layers > 1
    if use_dropout:
        require_key(layer.kind, key)
    d = layer.num_directions
    finals_h, finals_c = [], []
    for li in range(layer.num_layers):
        if li > 0 and use_dropout:
            xs = _dropout(layer, xs, key, li)
        outs = []
        for di, dname in enumerate(("fwd", "bwd")[:d]):
            idx = li * d + di
            c0 = (state0[0][idx], state0[1][idx]) if layer.kind == "lstm" else state0[idx]
            carry, ys = run_direction(layer.cell_kind, params[f"l{li}"][dname], xs, c0,
                                      reverse=(di == 1), unroll=layer.unroll,
                                      seq_lengths=seq_lengths, impl=layer.impl)
            outs.append(ys)
            finals_h.append(carry[0] if layer.kind == "lstm" else carry)
            if layer.kind == "lstm":
                finals_c.append(carry[1])
        xs = outs[0] if d == 1 else jnp.concatenate(outs, axis=-1)
    out = xs if layer.time_major else jnp.swapaxes(xs, 0, 1)
    h_n = jnp.stack(finals_h)
    return out, ((h_n, jnp.stack(finals_c)) if layer.kind == "lstm" else h_n)


def _state_dtype(state, default):
    leaves = jax.tree_util.tree_leaves(state)
    return leaves[0].dtype if leaves else default


def _apply(layer: RecurrentLayer, params, state, x, *, key=None, train=False, seq_lengths=None):
    _check_input(layer, jnp.shape(x), params)
    xs = x if layer.time_major else jnp.swapaxes(x, 0, 1)  # (T, B, F)
    steps, batch = xs.shape[0], xs.shape[1]
    state0 = _from_layer_state(layer, state, batch, xs.dtype)
    lengths = _check_lengths(layer, seq_lengths, batch, steps)
    out, final = _apply_stack(layer, params, xs, state0, seq_lengths=lengths, key=key,
                              train=train)
    dtype = _state_dtype(state, xs.dtype)  # the state keeps its dtype from call to call
    final = jax.tree_util.tree_map(lambda a: a.astype(dtype), final)
    return out, _to_layer_state(layer, final)


def _init(layer: RecurrentLayer, dtype, key, in_shape):
    _check_input(layer, in_shape)
    n_in, d = in_shape[-1], layer.num_directions
    params = {}
    for li in range(layer.num_layers):
        lp = {}
        for di, dname in enumerate(("fwd", "bwd")[:d]):
            k = jax.random.fold_in(key, li * d + di)
            lp[dname] = init_direction_params(
                k, layer.kind, n_in if li == 0 else d * layer.output_size, layer.hidden_size,
                dtype, proj_size=layer.proj_size)
        params[f"l{li}"] = lp
    batch = in_shape[1] if layer.time_major else in_shape[0]
    out_shape = (*in_shape[:2], d * layer.output_size)
    return out_shape, params, layer.zero_state(batch, dtype)


def _check_options(kind, hidden_size, num_layers, dropout, bidirectional, unroll, impl, carry,
                   nonlinearity, proj_size) -> str:
    check_positive_int(kind, "hidden_size", hidden_size)
    if impl not in ("fused", "scan"):
        raise ValueError(f"{kind}: impl must be 'fused' or 'scan', got {impl!r}")
    check_positive_int(kind, "num_layers", num_layers)
    check_positive_int(kind, "unroll", unroll)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0.0 <= dropout < 1.0):
        raise ValueError(f"{kind}: dropout must satisfy 0 <= dropout < 1, got {dropout!r}")
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"{kind}: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    check_positive_int(kind, "proj_size", proj_size, allow_zero=True)
    if proj_size >= hidden_size and proj_size:
        raise ValueError(f"{kind}: proj_size must satisfy 0 <= proj_size < hidden_size "
                         f"({hidden_size}), got {proj_size}")
    if carry is None:
        carry = "reset" if bidirectional else "keep"
    if carry not in CARRY_MODES:
        raise ValueError(f"{kind}: carry must be one of {CARRY_MODES}, got {carry!r}")
    if carry == "keep" and bidirectional:
        raise ValueError(f"{kind}: carry='keep' is refused for a bidirectional layer (its "
                         "backward direction reads each sequence from its end, so a carry "
                         "continued from the previous chunk means nothing); use carry='reset'")
    return carry


def _make(kind: str, hidden_size: int, *, num_layers: int = 1, dropout: float = 0.0,
          bidirectional: bool = False, carry: str | None = None, time_major: bool = False,
          unroll: int = 1, impl: str = "fused", dtype=jnp.float32, nonlinearity: str = "tanh",
          proj_size: int = 0) -> RecurrentLayer:
    carry = _check_options(kind, hidden_size, num_layers, dropout, bidirectional, unroll, impl,
                           carry, nonlinearity, proj_size)
    holder: dict[str, RecurrentLayer] = {}

    def init(key, in_shape):
        return _init(holder["self"], dtype, key, tuple(in_shape))

    def apply(params, state, x, *, key=None, train=False, seq_lengths=None):
        return _apply(holder["self"], params, state, x, key=key, train=train,
                      seq_lengths=seq_lengths)

    config = {"hidden_size": hidden_size, "num_layers": num_layers, "dropout": float(dropout),
              "bidirectional": bool(bidirectional), "carry": carry, "time_major": bool(time_major),
              "unroll": unroll, "impl": impl}
    if kind == "rnn":
        config["nonlinearity"] = nonlinearity
    if kind == "lstm":
        config["proj_size"] = proj_size
    layer = RecurrentLayer(
        init, apply, name=kind, config=config, kind=kind, hidden_size=hidden_size,
        num_layers=num_layers, dropout=float(dropout), bidirectional=bool(bidirectional),
        time_major=bool(time_major), unroll=unroll, impl=impl, carry=carry,
        nonlinearity=nonlinearity, proj_size=proj_size,
    )
    holder["self"] = layer
    return layer


def rnn(hidden_size: int, *, num_layers: int = 1, dropout: float = 0.0,
        bidirectional: bool = False, carry: str | None = None, nonlinearity: str = "tanh",
        time_major: bool = False, unroll: int = 1, impl: str = "fused",
        dtype=jnp.float32) -> RecurrentLayer:
    """Stacked (bidirectional) Elman RNN, ``h' = act(W_ih x + b_ih + W_hh h + b_hh)`` with
    ``nonlinearity`` ``"tanh"`` (default) or ``"relu"`` (PyTorch's ``nn.RNN``). Input
    ``(batch, steps, in)``, output ``(batch, steps, D*hidden_size)``; ``dropout`` between layers
    in training (needs ``key``). ``carry``: ``"keep"`` (default) continues from the carry in
    ``state``, ``"reset"`` (the default and only mode when bidirectional) starts every call from
    zeros; see the module docstring."""
    return _make("rnn", hidden_size, num_layers=num_layers, dropout=dropout,
                 bidirectional=bidirectional, carry=carry, time_major=time_major, unroll=unroll,
                 impl=impl, dtype=dtype, nonlinearity=nonlinearity)


def gru(hidden_size: int, *, num_layers: int = 1, dropout: float = 0.0,
        bidirectional: bool = False, carry: str | None = None, time_major: bool = False,
        unroll: int = 1, impl: str = "fused", dtype=jnp.float32) -> RecurrentLayer:
    """Stacked (bidirectional) GRU; see :func:`rnn` and the module docstring."""
    return _make("gru", hidden_size, num_layers=num_layers, dropout=dropout,
                 bidirectional=bidirectional, carry=carry, time_major=time_major, unroll=unroll,
                 impl=impl, dtype=dtype)


def lstm(hidden_size: int, *, num_layers: int = 1, dropout: float = 0.0,
         bidirectional: bool = False, carry: str | None = None, proj_size: int = 0,
         time_major: bool = False, unroll: int = 1, impl: str = "fused",
         dtype=jnp.float32) -> RecurrentLayer:
    """Stacked (bidirectional) LSTM; see :func:`rnn` and the module docstring. ``proj_size``
    P > 0 (``0 < P < hidden_size``, PyTorch's LSTM projection): ``h = (o * tanh(c)) @ w_hr``
    has P features (the output is ``D*P`` wide, ``state["h"]`` is (batch, L*D, P)); that path
    runs the ``lax.scan`` cell (no fused kernel)."""
    return _make("lstm", hidden_size, num_layers=num_layers, dropout=dropout,
                 bidirectional=bidirectional, carry=carry, time_major=time_major, unroll=unroll,
                 impl=impl, dtype=dtype, proj_size=proj_size)
