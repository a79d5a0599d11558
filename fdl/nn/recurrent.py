"""Recurrent cells, a ``lax.scan`` driver, and stacked/bidirectional RNN, GRU and LSTM layers.

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
LSTM/GRU the time loop itself runs in the optional C++ extension (``fdl/_ext/rnn_cpu.cc``: one
oneDNN ``sgemm`` + one vectorised elementwise pass per step instead of ~12 XLA thunks; compiled
on first use like the convolution extension; by default, ``FDL_RNN_THREADS=2``, the LSTM
forward loop is split over two threads, see :func:`rnn_threads`), otherwise in a
``lax.scan``. ``FDL_RNN_BACKEND=onednn`` runs the whole float32 LSTM/GRU direction
(projection, recurrence and every gradient) through oneDNN's RNN primitives instead
(``fdl/_ext/rnn_onednn.cc``); see :func:`rnn_backend`. ``"scan"`` differentiates
:func:`scan_cell` by autodiff (also forward mode). With ``seq_lengths`` the scan path is used.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdl.nn.core import Layer, ShapeError, check_positive_int, require_key

log = logging.getLogger("fdl.nn.recurrent")

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
    "rnn_backend",
    "rnn_cell",
    "rnn_threads",
    "run_direction",
    "scan_cell",
]

CELL_GATES = {"rnn": 1, "gru": 3, "lstm": 4}
RNN_BACKENDS = ("auto", "onednn", "native", "xla")


# ----------------------------------------------------------------------------- cells


def rnn_cell(params: dict, h: jax.Array, xp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tanh RNN step. ``xp = x_t @ w_ih + b_ih + b_hh`` (batch, H); ``h`` (batch, H).
    Returns ``(h', h')``."""
    h = jnp.tanh(xp + h @ params["w_hh"])
    return h, h


def gru_cell(params: dict, h: jax.Array, xp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """GRU step (PyTorch's equations, gates ``[r, z, n]``). ``xp = x_t @ w_ih + b_ih``
    (batch, 3H); ``h`` (batch, H). Returns ``(h', h')``."""
    hh = h @ params["w_hh"] + params["b_hh"]
    n_h = h.shape[-1]
    rz = jax.nn.sigmoid(xp[..., : 2 * n_h] + hh[..., : 2 * n_h])
    r, z = rz[..., :n_h], rz[..., n_h:]
    n = jnp.tanh(xp[..., 2 * n_h :] + r * hh[..., 2 * n_h :])
    h = n + z * (h - n)  # == (1 - z) * n + z * h
    return h, h


def lstm_cell(params: dict, carry: tuple[jax.Array, jax.Array], xp: jax.Array
              ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """LSTM step (gates ``[i, f, g, o]``). ``xp = x_t @ w_ih + b_ih + b_hh`` (batch, 4H);
    ``carry = (h, c)``, each (batch, H). Returns ``((h', c'), h')``."""
    h, c = carry
    gates = xp + h @ params["w_hh"]
    n_h = h.shape[-1]
    i = jax.nn.sigmoid(gates[..., :n_h])
    f = jax.nn.sigmoid(gates[..., n_h : 2 * n_h])
    g = jnp.tanh(gates[..., 2 * n_h : 3 * n_h])
    o = jax.nn.sigmoid(gates[..., 3 * n_h :])
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return (h, c), h


_CELLS: dict[str, Callable] = {"rnn": rnn_cell, "gru": gru_cell, "lstm": lstm_cell}


def project_inputs(kind: str, params: dict, x: jax.Array) -> jax.Array:
    """The input projection for all steps at once: ``x @ w_ih + b_ih`` (``+ b_hh`` for
    ``"rnn"``/``"lstm"``). ``x`` (..., in) -> (..., G*H)."""
    b = params["b_ih"] if kind == "gru" else params["b_ih"] + params["b_hh"]
    return x @ params["w_ih"] + b


# ----------------------------------------------------------------------------- driver


def reverse_within_lengths(xs: jax.Array, seq_lengths: jax.Array) -> jax.Array:
    """Reverse each sequence of time-major ``xs`` (T, B, ...) within its first
    ``seq_lengths[b]`` steps; positions past the length stay in place."""
    steps = xs.shape[0]
    t = jnp.arange(steps)[:, None]
    lens = seq_lengths[None, :]
    idx = jnp.where(t < lens, lens - 1 - t, t)  # (T, B)
    idx = idx.reshape(idx.shape + (1,) * (xs.ndim - 2))
    return jnp.take_along_axis(xs, jnp.broadcast_to(idx, xs.shape[:2] + (1,) * (xs.ndim - 2)),
                               axis=0)


def scan_cell(
    cell: Callable,
    params: dict,
    xs: jax.Array,
    carry: Any,
    *,
    time_major: bool = True,
    reverse: bool = False,
    unroll: int = 1,
    seq_lengths: jax.Array | None = None,
) -> tuple[Any, jax.Array]:
    """Run ``cell(params, carry, x_t) -> (carry, y_t)`` over the time axis with ``lax.scan``.

    ``xs``: (T, B, F) if ``time_major`` else (B, T, F) (usually pre-projected inputs).
    ``reverse``: process the sequence from its end (with ``seq_lengths``: from each sequence's
    last valid step, i.e. reversed within the valid length, as PyTorch's packed sequences).
    ``seq_lengths`` (B,) int: past ``seq_lengths[b]`` the carry of sequence ``b`` is frozen
    (the final carry is the one at its last valid step) and its outputs are zero.
    ``unroll``: steps per loop iteration (``lax.scan``'s ``unroll``); results do not depend on it.
    Returns ``(final_carry, ys)`` with ``ys`` in the layout of ``xs`` and in the original
    time order.
    """
    if not time_major:
        xs = jnp.swapaxes(xs, 0, 1)
    if seq_lengths is None:
        def step(c, x):
            return cell(params, c, x)

        carry, ys = lax.scan(step, carry, xs, reverse=reverse, unroll=unroll)
    else:
        seq_lengths = jnp.asarray(seq_lengths)
        steps = xs.shape[0]
        if reverse:
            xs = reverse_within_lengths(xs, seq_lengths)
        mask = jnp.arange(steps)[:, None] < seq_lengths[None, :]  # (T, B)

        def step(c, inp):
            x, m = inp
            c_new, y = cell(params, c, x)
            c_new = jax.tree_util.tree_map(
                lambda a, b: jnp.where(m[:, None], a, b), c_new, c)
            y = jnp.where(m[:, None], y, jnp.zeros((), y.dtype))
            return c_new, y

        carry, ys = lax.scan(step, carry, (xs, mask), unroll=unroll)
        if reverse:
            ys = reverse_within_lengths(ys, seq_lengths)
    if not time_major:
        ys = jnp.swapaxes(ys, 0, 1)
    return carry, ys


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
        return scan_cell(_CELLS[kind], params, xp, carry, time_major=True, reverse=reverse,
                         unroll=unroll, seq_lengths=seq_lengths)
    if reverse:
        carry, ys = fused_direction(kind, params, jnp.flip(xs, 0), carry, unroll=unroll)
        return carry, jnp.flip(ys, 0)
    return fused_direction(kind, params, xs, carry, unroll=unroll)


# ----------------------------------------------------------------------------- fused direction
#
# ``fused_direction``: one direction of one layer (input projection + recurrence) under a single
# custom VJP. What it does differently from differentiating ``scan_cell`` (see
# docs/results/sequence_lm.md, "Step time (2026-11-29)", for what each part gained):
#
# - forward: the projection ``x @ w_ih + b`` for all steps is one matmul; the scan carries that
#   (T, B, G*H) buffer and overwrites step t with the activated gates in place (no second
#   (T, B, G*H) buffer, no zero-fill); the LSTM's four activations are one ``tanh`` over the
#   whole gate row (``sigmoid(x) = (tanh(x/2) + 1)/2``), so no slice/concatenate per step;
# - backward: the reverse loop computes only the gate gradients and ``dgates @ w_hh.T``; the
#   gradients of ``w_hh``, ``w_ih`` and both biases are one matmul (sum) over all T*B rows after
#   the loop, written as plain ``(K, T*B) @ (T*B, G*H)`` products (the native LSTM/GRU loops
#   instead accumulate them on a helper thread while the loop runs, unless
#   ``FDL_RNN_OVERLAP_DW=0``).


def _gate_vec(n_h: int, values, dtype) -> jax.Array:
    """A (len(values)*n_h,) vector: ``values[k]`` repeated over gate block k."""
    return jnp.concatenate([jnp.full((n_h,), v, dtype) for v in values])


def _lstm_dir_forward(unroll, w_ih, w_hh, b, xs, h0, c0):
    t_len, batch, _ = xs.shape
    n_h = w_hh.shape[0]
    xp = (xs.reshape(t_len * batch, -1) @ w_ih + b).reshape(t_len, batch, 4 * n_h)
    # a = tanh(z * s) * s + o  gives sigmoid for i, f, o (s = o = 1/2) and tanh for g (s=1, o=0)
    scale = _gate_vec(n_h, (0.5, 0.5, 1.0, 0.5), xp.dtype)
    offset = _gate_vec(n_h, (0.5, 0.5, 0.0, 0.5), xp.dtype)

    def step(carry, t):
        h, c, buf = carry
        z = lax.dynamic_index_in_dim(buf, t, 0, keepdims=False) + h @ w_hh
        a = jnp.tanh(z * scale) * scale + offset
        i, f, g, o = a[:, :n_h], a[:, n_h : 2 * n_h], a[:, 2 * n_h : 3 * n_h], a[:, 3 * n_h :]
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c, lax.dynamic_update_index_in_dim(buf, a, t, 0)), (h, c)

    (h, c, acts), (ys, cs) = lax.scan(step, (h0, c0, xp), jnp.arange(t_len), unroll=unroll)
    return (h, c), ys, (acts, cs)


def _lstm_dir_backward(unroll, w_hh, h0, c0, ys, aux, d_carry, d_ys):
    acts, cs = aux
    n_h = w_hh.shape[0]
    w_t = w_hh.T
    # d a / d z over the gate row: a(1 - a) for the sigmoid gates, 1 - a^2 for g
    m_const = _gate_vec(n_h, (0.0, 0.0, 1.0, 0.0), acts.dtype)
    m_lin = _gate_vec(n_h, (1.0, 1.0, 0.0, 1.0), acts.dtype)
    c_prev = jnp.concatenate([c0[None], cs[:-1]], 0)

    def step(carry, inp):
        dh, dc = carry
        dy, a, ct, cp = inp
        i, f, g, o = a[:, :n_h], a[:, n_h : 2 * n_h], a[:, 2 * n_h : 3 * n_h], a[:, 3 * n_h :]
        dh = dh + dy
        tc = jnp.tanh(ct)
        dc = dc + dh * o * (1 - tc * tc)
        u = jnp.concatenate([dc, dc, dc, dh], -1)
        v = jnp.concatenate([g, cp, i, tc], -1)
        dg = u * v * (m_const + a * (m_lin - a))
        return (dg @ w_t, dc * f), dg

    d0, dg = lax.scan(step, tuple(d_carry), (d_ys, acts, cs, c_prev), reverse=True,
                      unroll=unroll)
    return d0, dg, dg


def _gru_dir_forward(unroll, w_ih, w_hh, b_ih, b_hh, xs, h0):
    t_len, batch, _ = xs.shape
    n_h = w_hh.shape[0]
    xp = (xs.reshape(t_len * batch, -1) @ w_ih + b_ih).reshape(t_len, batch, 3 * n_h)

    def step(carry, t):
        h, buf = carry
        x = lax.dynamic_index_in_dim(buf, t, 0, keepdims=False)
        hh = h @ w_hh + b_hh
        rz = jnp.tanh((x[:, : 2 * n_h] + hh[:, : 2 * n_h]) * 0.5) * 0.5 + 0.5
        r, z = rz[:, :n_h], rz[:, n_h:]
        hn = hh[:, 2 * n_h :]
        n = jnp.tanh(x[:, 2 * n_h :] + r * hn)
        h = n + z * (h - n)
        buf = lax.dynamic_update_index_in_dim(buf, jnp.concatenate([rz, n], -1), t, 0)
        return (h, buf), (h, hn)

    (h, acts), (ys, hns) = lax.scan(step, (h0, xp), jnp.arange(t_len), unroll=unroll)
    return h, ys, (acts, hns)


def _gru_dir_backward(unroll, w_hh, h0, ys, aux, d_h, d_ys):
    acts, hns = aux
    n_h = w_hh.shape[0]
    w_t = w_hh.T
    h_prev = jnp.concatenate([h0[None], ys[:-1]], 0)

    def step(dh, inp):
        dy, a, hn, hp = inp
        r, z, n = a[:, :n_h], a[:, n_h : 2 * n_h], a[:, 2 * n_h :]
        dh = dh + dy
        dan = dh * (1 - z) * (1 - n * n)
        dar = dan * hn * r * (1 - r)
        daz = dh * (hp - n) * z * (1 - z)
        d_hh_t = jnp.concatenate([dar, daz, dan * r], -1)
        return dh * z + d_hh_t @ w_t, jnp.concatenate([dar, daz, dan], -1)

    d0, d_xp = lax.scan(step, d_h, (d_ys, acts, hns, h_prev), reverse=True, unroll=unroll)
    # the recurrent gradient differs from the input one only in the candidate block (times r)
    d_hh = jnp.concatenate([d_xp[..., : 2 * n_h], d_xp[..., 2 * n_h :] * acts[..., :n_h]], -1)
    return d0, d_xp, d_hh


def _rnn_dir_forward(unroll, w_ih, w_hh, b, xs, h0):
    t_len, batch, _ = xs.shape
    n_h = w_hh.shape[0]
    xp = (xs.reshape(t_len * batch, -1) @ w_ih + b).reshape(t_len, batch, n_h)

    def step(h, x):
        h = jnp.tanh(x + h @ w_hh)
        return h, h

    h, ys = lax.scan(step, h0, xp, unroll=unroll)
    return h, ys, ()


def _rnn_dir_backward(unroll, w_hh, h0, ys, aux, d_h, d_ys):
    w_t = w_hh.T

    def step(dh, inp):
        dy, h = inp
        da = (dh + dy) * (1 - h * h)
        return da @ w_t, da

    d0, da = lax.scan(step, d_h, (d_ys, ys), reverse=True, unroll=unroll)
    return d0, da, da


# The time loop of the LSTM and the GRU can run in the optional C++ extension
# (fdl/_ext/rnn_cpu.cc: per step one oneDNN ``dnnl_sgemm`` plus one vectorised elementwise
# pass) instead of an XLA while loop (per step one dot plus ~12 small thunks and thread
# hand-offs). Same math and the same buffers as the XLA loops above; float32 only.


def rnn_backend() -> str:
    """The requested time-loop backend of ``impl="fused"`` from ``FDL_RNN_BACKEND``:

    - ``auto`` (default): the native C++ loop for float32 LSTM/GRU when its extension builds
      and loads, else XLA;
    - ``onednn``: the whole float32 LSTM/GRU direction through oneDNN's RNN primitives
      (``lstm_forward``/``lbr_gru_forward`` and their backward; an unavailable extension is an
      error). Not the default: in the measurements so far (docs/results/sequence_lm.md) its
      OpenMP threads beat the native loop only on an otherwise idle machine and collapse,
      like PyTorch's, when another process holds a core;
    - ``native``: the native C++ loop for float32 LSTM/GRU (an unavailable extension is an
      error);
    - ``xla``: the ``lax.scan`` loops.

    The tanh RNN, float64 and ``seq_lengths`` always use the XLA loop.

    Read when a function is traced."""
    b = os.environ.get("FDL_RNN_BACKEND", "auto").strip().lower() or "auto"
    if b not in RNN_BACKENDS:
        raise ValueError(f"FDL_RNN_BACKEND must be one of {RNN_BACKENDS}, got {b!r}")
    return b


def _use_native(kind: str, dtype) -> bool:
    backend = rnn_backend()
    if backend == "xla" or kind == "rnn" or jnp.dtype(dtype) != jnp.float32:
        return False
    from fdl._ext import build

    if build.load_rnn():
        return True
    if backend == "native":
        raise RuntimeError("FDL_RNN_BACKEND=native but the native RNN extension is unavailable: "
                           f"{build.rnn_unavailable_reason()}")
    return False


# Which cells ``FDL_RNN_BACKEND=auto`` runs through oneDNN's RNN primitives (when the extension
# loads); see docs/results/sequence_lm.md for the measurements behind it.
_AUTO_ONEDNN = {"lstm": False, "gru": False}
_ONEDNN_KIND = {"lstm": 0, "gru": 1}


def _onednn_workspace_bytes(kind: str, dtype, t_len: int, batch: int, n_in: int, n_h: int
                            ) -> int:
    """Bytes of the oneDNN forward-training workspace for this LSTM/GRU direction, or 0 when
    oneDNN's RNN primitive is not to be used (backend, dtype, extension unavailable)."""
    backend = rnn_backend()
    if (kind not in _ONEDNN_KIND or jnp.dtype(dtype) != jnp.float32
            or not (backend == "onednn" or (backend == "auto" and _AUTO_ONEDNN[kind]))):
        return 0
    import ctypes

    from fdl._ext import build

    lib = build.rnn_onednn_library()
    n = -1
    if lib is not None:
        f = lib.FdlRnnDnnlWorkspaceBytes
        f.restype = ctypes.c_int64
        f.argtypes = [ctypes.c_int64] * 5
        n = int(f(_ONEDNN_KIND[kind], t_len, batch, n_in, n_h))
    if n > 0:
        return n
    if backend == "onednn":
        why = (build.rnn_onednn_unavailable_reason() if lib is None
               else f"no oneDNN {kind} implementation for T={t_len} B={batch} in={n_in} H={n_h}")
        raise RuntimeError(f"FDL_RNN_BACKEND=onednn but the oneDNN RNN primitives are "
                           f"unavailable: {why}")
    return 0


def _f32(*shapes):
    return tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)


def rnn_threads() -> int:
    """Threads of the native LSTM loops from ``FDL_RNN_THREADS``: ``2`` (the default since
    2026-11-30, later session) -- the caller and one helper thread each take half of the hidden
    units, meeting at one barrier per step; used when ``H`` is even, ``H >= 64`` and
    ``B*H >= 4096``; the backward loop is split only with ``FDL_RNN_OVERLAP_DW=0`` -- or ``1``
    (single-threaded loops). Char-LM LSTM step: 5.83-5.97 ms with 2 vs 7.27-7.57 with 1 on an
    otherwise idle machine, 8.0-9.8 vs 8.2-9.0 with another process busy on one of the 2 cores
    (docs/results/sequence_lm.md). Read when a function is traced.

    Independently of it, the native LSTM and GRU backward compute the weight and bias
    gradients (``d w_hh``, ``d w_ih``, ``d b_ih``, ``d b_hh``) on a helper thread, overlapped
    with the reverse loop, unless ``FDL_RNN_OVERLAP_DW=0`` (then XLA computes them after the
    loop)."""
    v = os.environ.get("FDL_RNN_THREADS", "2").strip() or "2"
    if v not in ("1", "2"):
        raise ValueError(f"FDL_RNN_THREADS must be 1 or 2, got {v!r}")
    return int(v)


def _native_call(target, out_shapes, *args, **attrs):
    # operand 0 (the (T, B, G*H) buffer) is updated in place: it becomes result 0
    return jax.ffi.ffi_call(target, _f32(*out_shapes), input_output_aliases={0: 0},
                            vmap_method="sequential")(*args, **attrs)


def _lstm_native_forward(unroll, w_ih, w_hh, b, xs, h0, c0):
    t_len, batch, _ = xs.shape
    n_h = w_hh.shape[0]
    xp = (xs.reshape(t_len * batch, -1) @ w_ih + b).reshape(t_len, batch, 4 * n_h)
    hs = (t_len, batch, n_h)
    acts, ys, cs = _native_call("fdl_lstm_fwd", (xp.shape, hs, hs), xp, w_hh, h0, c0,
                                threads=np.int64(rnn_threads()))
    return (ys[-1], cs[-1]), ys, (acts, cs)


def _overlap_dw() -> bool:
    return os.environ.get("FDL_RNN_OVERLAP_DW", "1").strip() != "0"


def _lstm_native_backward(unroll, w_hh, h0, c0, ys, aux, d_carry, d_ys, xs=None):
    acts, cs = aux
    if xs is not None and _overlap_dw():
        # the weight and bias gradients accumulated in the same call by a helper thread,
        # overlapped with the loop (FDL_RNN_OVERLAP_DW=0: computed by XLA after the loop)
        w_ih_shape = (xs.shape[-1], w_hh.shape[1])
        dg, dh0, dc0, d_w_hh, d_w_ih, d_b = jax.ffi.ffi_call(
            "fdl_lstm_bwd_dw", _f32(acts.shape, h0.shape, h0.shape, w_hh.shape, w_ih_shape,
                                    (w_hh.shape[1],)),
            input_output_aliases={0: 0}, vmap_method="sequential")(
            acts, w_hh.T, c0, cs, d_ys, d_carry[0], d_carry[1], h0, ys, xs)
        return (dh0, dc0), dg, dg, {"w_hh": d_w_hh, "w_ih": d_w_ih, "b_ih": d_b, "b_hh": d_b}
    dg, dh0, dc0 = _native_call("fdl_lstm_bwd", (acts.shape, h0.shape, h0.shape), acts, w_hh.T,
                                c0, cs, d_ys, d_carry[0], d_carry[1],
                                threads=np.int64(rnn_threads()))
    return (dh0, dc0), dg, dg


def _gru_native_forward(unroll, w_ih, w_hh, b_ih, b_hh, xs, h0):
    t_len, batch, _ = xs.shape
    n_h = w_hh.shape[0]
    xp = (xs.reshape(t_len * batch, -1) @ w_ih + b_ih).reshape(t_len, batch, 3 * n_h)
    hs = (t_len, batch, n_h)
    acts, ys, hns = _native_call("fdl_gru_fwd", (xp.shape, hs, hs), xp, w_hh, b_hh, h0)
    return ys[-1], ys, (acts, hns)


def _gru_native_backward(unroll, w_hh, h0, ys, aux, d_h, d_ys, xs=None):
    acts, hns = aux
    if xs is not None and _overlap_dw():
        # the weight and bias gradients accumulated in the same call by a helper thread,
        # overlapped with the loop (FDL_RNN_OVERLAP_DW=0: computed by XLA after the loop)
        g = w_hh.shape[1]
        d_xp, d_hh, dh0, d_w_hh, d_w_ih, d_b_ih, d_b_hh = jax.ffi.ffi_call(
            "fdl_gru_bwd_dw", _f32(acts.shape, acts.shape, h0.shape, w_hh.shape,
                                   (xs.shape[-1], g), (g,), (g,)),
            input_output_aliases={0: 0}, vmap_method="sequential")(
            acts, w_hh.T, h0, ys, hns, d_ys, d_h, xs)
        return dh0, d_xp, d_hh, {"w_hh": d_w_hh, "w_ih": d_w_ih, "b_ih": d_b_ih,
                                 "b_hh": d_b_hh}
    d_xp, d_hh, dh0 = _native_call("fdl_gru_bwd", (acts.shape, acts.shape, h0.shape), acts,
                                   w_hh.T, h0, ys, hns, d_ys, d_h)
    return dh0, d_xp, d_hh


def _dir_forward(kind, unroll, native, params, xs, carry):
    w_ih, w_hh, b_ih, b_hh = params["w_ih"], params["w_hh"], params["b_ih"], params["b_hh"]
    if kind == "lstm":
        fwd = _lstm_native_forward if native else _lstm_dir_forward
        return fwd(unroll, w_ih, w_hh, b_ih + b_hh, xs, carry[0], carry[1])
    if kind == "gru":
        fwd = _gru_native_forward if native else _gru_dir_forward
        return fwd(unroll, w_ih, w_hh, b_ih, b_hh, xs, carry)
    return _rnn_dir_forward(unroll, w_ih, w_hh, b_ih + b_hh, xs, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_dir(kind, unroll, native, params, xs, carry):
    carry, ys, _ = _dir_forward(kind, unroll, native, params, xs, carry)
    return carry, ys


def _fused_dir_fwd(kind, unroll, native, params, xs, carry):
    carry_n, ys, aux = _dir_forward(kind, unroll, native, params, xs, carry)
    return (carry_n, ys), (params, xs, carry, ys, aux)


def _fused_dir_bwd(kind, unroll, native, res, cts):
    params, xs, carry0, ys, aux = res
    d_carry, d_ys = cts
    w_ih, w_hh = params["w_ih"], params["w_hh"]
    t_len, batch, n_in = xs.shape
    n_h = w_hh.shape[0]
    done = None  # weight/bias gradients the native backward already computed
    if kind == "lstm":
        h0 = carry0[0]
        if native:
            d0, d_xp, d_hh, *rest = _lstm_native_backward(unroll, w_hh, h0, carry0[1], ys, aux,
                                                          d_carry, d_ys, xs=xs)
            done = rest[0] if rest else None
        else:
            d0, d_xp, d_hh = _lstm_dir_backward(unroll, w_hh, h0, carry0[1], ys, aux, d_carry,
                                                d_ys)
    elif kind == "gru":
        h0 = carry0
        if native:
            d0, d_xp, d_hh, *rest = _gru_native_backward(unroll, w_hh, h0, ys, aux, d_carry,
                                                         d_ys, xs=xs)
            done = rest[0] if rest else None
        else:
            d0, d_xp, d_hh = _gru_dir_backward(unroll, w_hh, h0, ys, aux, d_carry, d_ys)
    else:
        h0 = carry0
        d0, d_xp, d_hh = _rnn_dir_backward(unroll, w_hh, h0, ys, aux, d_carry, d_ys)
    rows = t_len * batch
    d_xp2 = d_xp.reshape(rows, -1)
    d_hh2 = d_hh.reshape(rows, -1)
    # h_{t-1} for every step: h0 for t = 0, then ys[:-1] (split so no (T, B, H) concatenate)
    if done is not None:
        d_params = done
    else:
        d_w_hh = h0.T @ d_hh2[:batch] + ys[:-1].reshape(rows - batch, n_h).T @ d_hh2[batch:]
        d_b_ih = jnp.sum(d_xp2, 0)
        d_b_hh = jnp.sum(d_hh2, 0) if kind == "gru" else d_b_ih
        d_params = {"w_ih": xs.reshape(rows, n_in).T @ d_xp2, "w_hh": d_w_hh, "b_ih": d_b_ih,
                    "b_hh": d_b_hh}
    d_xs = (d_xp2 @ w_ih.T).reshape(t_len, batch, n_in)
    return d_params, d_xs, d0


_fused_dir.defvjp(_fused_dir_fwd, _fused_dir_bwd)


def fused_direction(kind: str, params: dict, xs: jax.Array, carry: Any, *, unroll: int = 1
                    ) -> tuple[Any, jax.Array]:
    """One direction of one layer -- the input projection and the recurrence of a built-in
    cell (``kind`` in ``"rnn"``, ``"gru"``, ``"lstm"``) -- on time-major ``xs`` (T, B, in),
    with a custom VJP (see the comment above). Same values as ``project_inputs`` +
    :func:`scan_cell`. Returns ``(final_carry, ys (T, B, H))``. Reverse-mode only (no
    ``jax.jvp``: use ``impl="scan"``). The float32 LSTM/GRU time loop runs in the native
    extension unless ``FDL_RNN_BACKEND=xla``; with ``FDL_RNN_BACKEND=onednn`` the whole
    direction runs through oneDNN's LSTM/GRU primitives (see :func:`rnn_backend`)."""
    if kind not in CELL_GATES:
        raise ValueError(f"fused_direction: kind must be one of {sorted(CELL_GATES)}, got "
                         f"{kind!r}")
    if kind == "lstm":
        carry = tuple(carry)
    params = {k: params[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")}
    if xs.shape[0] == 0:
        return scan_cell(_CELLS[kind], params, project_inputs(kind, params, xs), carry)
    dtypes = {jnp.result_type(a) for a in (*params.values(), xs,
                                           *jax.tree_util.tree_leaves(carry))}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype is not None:
        ws_bytes = _onednn_workspace_bytes(kind, dtype, *xs.shape, params["w_hh"].shape[0])
        if ws_bytes:
            return _rnn_onednn(kind, ws_bytes, params, xs, carry)
    native = dtype is not None and _use_native(kind, dtype)
    return _fused_dir(kind, int(unroll), native, params, xs, carry)


# One LSTM/GRU direction through oneDNN's RNN primitives (fdl/_ext/rnn_onednn.cc): the forward
# (projection + recurrence) is one ``lstm_forward``/``lbr_gru_forward`` call (forward_training
# when differentiated, its workspace the residual; forward_inference otherwise); the backward is
# one ``*_backward`` call returning every gradient. Layouts (oneDNN's ldigo): the LSTM's
# [i, f, g, o] weights are used as they are, bias ``b_ih + b_hh``; the GRU's [r, z, n] blocks are
# swapped to oneDNN's [z, r, n] ("u, r, o"), bias [b_z, b_r, b_in, b_hn] (linear-before-reset,
# PyTorch's GRU).


def _swap_rz(a: jax.Array, n_h: int) -> jax.Array:
    """Swap the first two gate blocks along the last axis ([r, z, n] <-> [z, r, n])."""
    return jnp.concatenate([a[..., n_h : 2 * n_h], a[..., :n_h], a[..., 2 * n_h :]], -1)


def _onednn_operands(kind, params):
    w_ih, w_hh, b_ih, b_hh = params["w_ih"], params["w_hh"], params["b_ih"], params["b_hh"]
    if kind == "lstm":
        return w_ih, w_hh, b_ih + b_hh
    n_h = w_hh.shape[0]
    rz = b_ih[: 2 * n_h] + b_hh[: 2 * n_h]
    b = jnp.concatenate([rz[n_h:], rz[:n_h], b_ih[2 * n_h :], b_hh[2 * n_h :]])
    return _swap_rz(w_ih, n_h), _swap_rz(w_hh, n_h), b


def _onednn_param_grads(kind, n_h, d_w_ih, d_w_hh, d_b):
    if kind == "lstm":
        return {"w_ih": d_w_ih, "w_hh": d_w_hh, "b_ih": d_b, "b_hh": d_b}
    rz = jnp.concatenate([d_b[n_h : 2 * n_h], d_b[:n_h]])  # [z, r] -> [r, z]
    return {"w_ih": _swap_rz(d_w_ih, n_h), "w_hh": _swap_rz(d_w_hh, n_h),
            "b_ih": jnp.concatenate([rz, d_b[2 * n_h : 3 * n_h]]),
            "b_hh": jnp.concatenate([rz, d_b[3 * n_h :]])}


def _onednn_call(kind, what, outs, *args):
    return jax.ffi.ffi_call(f"fdl_{kind}_dnnl_{what}",
                            tuple(jax.ShapeDtypeStruct(s, jnp.float32 if d is None else d)
                                  for s, d in outs),
                            vmap_method="sequential")(*args)


def _onednn_states(kind, carry):
    return tuple(carry) if kind == "lstm" else (carry,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rnn_onednn(kind, ws_bytes, params, xs, carry):
    # not differentiated: forward_inference, no workspace
    t_len, batch, _ = xs.shape
    hs = (batch, params["w_hh"].shape[0])
    states = _onednn_states(kind, carry)
    ys, *fin = _onednn_call(kind, "infer", [((t_len, *hs), None)] + [(hs, None)] * len(states),
                            xs, *_onednn_operands(kind, params), *states)
    return (tuple(fin) if kind == "lstm" else fin[0]), ys


def _rnn_onednn_fwd(kind, ws_bytes, params, xs, carry):
    t_len, batch, _ = xs.shape
    hs = (batch, params["w_hh"].shape[0])
    states = _onednn_states(kind, carry)
    ops = _onednn_operands(kind, params)
    ys, *fin, ws = _onednn_call(
        kind, "fwd", [((t_len, *hs), None)] + [(hs, None)] * len(states)
        + [((ws_bytes,), jnp.uint8)], xs, *ops, *states)
    carry_n = tuple(fin) if kind == "lstm" else fin[0]
    return (carry_n, ys), (xs, ops, states, ys, tuple(fin), ws)


def _rnn_onednn_bwd(kind, ws_bytes, res, cts):
    xs, ops, states, ys, fin, ws = res
    d_carry, d_ys = cts
    n_h = ops[1].shape[0]
    d_fin = _onednn_states(kind, d_carry)
    if kind == "lstm":  # operand order: ..., h0, c0, ys, h_n, c_n, ws, d_ys, d_hn, d_cn
        args = (xs, *ops, *states, ys, *fin, ws, d_ys, *d_fin)
    else:
        args = (xs, *ops, *states, ys, *fin, ws, d_ys, *d_fin)
    out = [(xs.shape, None)] + [(a.shape, None) for a in ops] + [(s.shape, None) for s in states]
    d_xs, d_w_ih, d_w_hh, d_b, *d_states = _onednn_call(kind, "bwd", out, *args)
    d_carry0 = tuple(d_states) if kind == "lstm" else d_states[0]
    return _onednn_param_grads(kind, n_h, d_w_ih, d_w_hh, d_b), d_xs, d_carry0


_rnn_onednn.defvjp(_rnn_onednn_fwd, _rnn_onednn_bwd)


# ----------------------------------------------------------------------------- params


def init_direction_params(key, kind: str, in_features: int, hidden: int, dtype=jnp.float32
                          ) -> dict:
    """PyTorch's initialisation: every weight and bias ``U(-1/sqrt(H), 1/sqrt(H))``."""
    g = CELL_GATES[kind]
    bound = 1.0 / math.sqrt(hidden)
    k = jax.random.split(key, 4)
    u = lambda kk, shape: jax.random.uniform(kk, shape, dtype, -bound, bound)  # noqa: E731
    return {
        "w_ih": u(k[0], (in_features, g * hidden)),
        "w_hh": u(k[1], (hidden, g * hidden)),
        "b_ih": u(k[2], (g * hidden,)),
        "b_hh": u(k[3], (g * hidden,)),
    }


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
