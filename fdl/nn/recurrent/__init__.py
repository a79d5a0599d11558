"""Recurrent cells, a ``lax.scan`` driver, and stacked/bidirectional RNN, GRU and LSTM layers.

Modules: :mod:`~fdl.nn.recurrent.cells` (cells, input projection, parameter init),
:mod:`~fdl.nn.recurrent.scan` (the ``lax.scan`` driver), :mod:`~fdl.nn.recurrent.fused` (one
direction under a hand-written VJP), :mod:`~fdl.nn.recurrent.native` (the C++ time loops and the
backend choice),
:mod:`~fdl.nn.recurrent.layers` (the layers and their states). Every public name is re-exported
here.

**Cells** operate on a *pre-projected* input: ``cell(params, carry, xp_t) -> (carry, y_t)`` where
``xp_t = x_t @ w_ih + b_ih`` for all steps is computed outside the loop in one matmul
(:func:`project_inputs`; for the tanh RNN and the LSTM the recurrent bias ``b_hh`` is folded in
there too; the GRU keeps ``b_hh`` inside the reset-gate product). Inside the loop each step does
one fused ``(hidden, G*hidden)`` matmul ``h @ w_hh``.

**Parameters** of one direction of one layer (``G`` = 1 RNN, 3 GRU, 4 LSTM)::

    {"w_ih": (in, G*H), "w_hh": (H, G*H), "b_ih": (G*H,), "b_hh": (G*H,)}

with the gate blocks in **PyTorch's order** along the last axis -- LSTM ``[i, f, g, o]``
(input, forget, cell candidate, output), GRU ``[r, z, n]`` (reset, update, candidate) -- so
PyTorch's ``weight_ih_l{k}`` is ``w_ih.T`` with no reordering (see :mod:`fdl.interop.torch_rnn`).
A layer's params are ``{"l0": {"fwd": {...}, "bwd": {...}}, "l1": {...}, ...}`` (``"bwd"`` only
when bidirectional).

**Equations** (PyTorch's): RNN ``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)``;
GRU ``r, z = σ(.)``, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``;
LSTM ``i, f, o = σ(.)``, ``g = tanh(.)``, ``c' = f c + i g``, ``h' = o tanh(c')``.

**States** (recurrent hidden states, not the layer-protocol ``state``) follow PyTorch's layout:
an array ``(num_layers * num_directions, batch, H)`` (index ``layer * num_directions +
direction``) for RNN/GRU and a pair ``(h, c)`` of such arrays for LSTM.

Layers (``rnn``, ``gru``, ``lstm``) follow the layer protocol (input ``(batch, steps, features)``,
output ``(batch, steps, num_directions * H)``, zero initial state). Models that need initial or
final states (language models carrying state across minibatches, encoder--decoder) call
:meth:`RecurrentLayer.apply_with_state`::

    enc = nn.gru(32, num_layers=2, dropout=0.1)
    _, params, _ = enc.init(key, (batch, steps, embed))
    outputs, h_n = enc.apply_with_state(params, x, h0, key=key, train=True)   # h0 may be None

Truncated BPTT: carry ``h_n`` into the next minibatch through :func:`detach_state`.

**Implementations** (``impl=``): ``"fused"`` (default) runs each direction through
:func:`fused_direction` -- input projection + recurrence under one hand-written VJP; for float32
LSTM/GRU the time loop itself runs in fdl's native library (``fdl/_ext/rnn_cpu.cc``: one GEMM
+ one vectorised elementwise pass per step instead of ~12 XLA thunks; built when fdl is
installed; ``fdl.config.rnn_backend``, see :mod:`fdl.nn.recurrent.native`), otherwise in a
``lax.scan``. ``"scan"`` differentiates
:func:`scan_cell` by autodiff (also forward mode). With ``seq_lengths`` the scan path is used.
"""

from fdl.nn.recurrent.cells import (
    CELL_GATES,
    gru_cell,
    init_direction_params,
    lstm_cell,
    project_inputs,
    rnn_cell,
)
from fdl.nn.recurrent.fused import fused_direction
from fdl.nn.recurrent.layers import (
    RecurrentLayer,
    apply_with_state,
    detach_state,
    gru,
    initial_state,
    lstm,
    rnn,
    run_direction,
)
from fdl.nn.recurrent.scan import reverse_within_lengths, scan_cell

__all__ = [
    "CELL_GATES",
    "RecurrentLayer",
    "apply_with_state",
    "detach_state",
    "fused_direction",
    "gru",
    "gru_cell",
    "init_direction_params",
    "initial_state",
    "lstm",
    "lstm_cell",
    "project_inputs",
    "reverse_within_lengths",
    "rnn",
    "rnn_cell",
    "run_direction",
    "scan_cell",
]
