"""Recurrent cells, a ``lax.scan`` driver, and stacked/bidirectional RNN, GRU and LSTM layers.

Modules: :mod:`~fdl.nn.recurrent.cells` (cells, input projection, parameter init),
:mod:`~fdl.nn.recurrent.scan` (the ``lax.scan`` driver), :mod:`~fdl.nn.recurrent.fused` (one
direction with hand-written derivatives), :mod:`~fdl.nn.recurrent.linear` (the linear map with a
custom transpose its JVP uses), :mod:`~fdl.nn.recurrent.native` (the C++ time loops and the
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

**State**: the recurrent carry is layer state (:mod:`fdl.nn.recurrent.layers`): ``init`` returns
the zero carry for the batch size of ``in_shape``, batch first -- ``{"h": (batch, L*D, H)}``
(LSTM: plus ``"c"``) -- and ``apply`` starts from the carry in ``state`` and returns the final
one, so truncated BPTT is feeding ``new_state`` back::

    lm = nn.serial(("rnn", nn.gru(256)), ("out", nn.dense(vocab)))
    _, params, state = lm.init(key, (batch, steps, vocab))
    logits, state = lm.apply(params, state, x_chunk1)      # continues from zeros
    logits, state = lm.apply(params, state, x_chunk2)      # continues from chunk 1
    state = nn.reset_state(state, "rnn")                   # a new sequence starts

``carry="reset"`` (and every bidirectional layer) starts each call from zeros instead;
``apply(..., seq_lengths=...)`` handles variable lengths (checked: out of range is an error).
:meth:`RecurrentLayer.apply_with_state` takes and returns PyTorch's ``(L*D, batch, H)`` layout
(``h0``/``h_n``, a pair ``(h, c)`` for the LSTM). Options beyond PyTorch's defaults:
``nn.rnn(nonlinearity="relu")``, ``nn.lstm(proj_size=P)``.

**Implementations** (``impl=``): ``"fused"`` (default) runs each direction through
:func:`fused_direction` -- input projection + recurrence with hand-written derivatives (reverse
and forward mode); for float32
LSTM/GRU the time loop itself runs in fdl's native library (``fdl/_ext/rnn_cpu.cc``: one GEMM
+ one vectorised elementwise pass per step instead of ~12 XLA thunks; built when fdl is
installed; ``fdl.config.rnn_backend``, see :mod:`fdl.nn.recurrent.native`), otherwise in a
``lax.scan``. ``"scan"`` differentiates
:func:`scan_cell` by autodiff. With ``seq_lengths`` the scan path is used.
"""

from fdl.nn.recurrent.cells import (
    CELL_GATES,
    gru_cell,
    init_direction_params,
    lstm_cell,
    project_inputs,
    rnn_cell,
    rnn_relu_cell,
)
from fdl.nn.recurrent.fused import fused_direction
from fdl.nn.recurrent.layers import (
    CARRY_MODES,
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
    "CARRY_MODES",
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
    "rnn_relu_cell",
    "run_direction",
    "scan_cell",
]
