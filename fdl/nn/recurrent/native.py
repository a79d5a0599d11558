"""The LSTM/GRU time loops in the optional C++ extension (``fdl/_ext/rnn_cpu.cc``) and the
choice of time-loop backend (``FDL_RNN_BACKEND``, ``FDL_RNN_THREADS``, ``FDL_RNN_OVERLAP_DW``).
Used by :func:`fdl.nn.recurrent.fused.fused_direction`."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["RNN_BACKENDS", "gru_native_backward", "gru_native_forward", "lstm_native_backward",
           "lstm_native_forward", "rnn_backend", "rnn_threads", "use_native"]

RNN_BACKENDS = ("auto", "onednn", "native", "xla")


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


def use_native(kind: str, dtype) -> bool:
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


def lstm_native_forward(unroll, w_ih, w_hh, b, xs, h0, c0):
    t_len, batch, _ = xs.shape
    n_h = w_hh.shape[0]
    xp = (xs.reshape(t_len * batch, -1) @ w_ih + b).reshape(t_len, batch, 4 * n_h)
    hs = (t_len, batch, n_h)
    acts, ys, cs = _native_call("fdl_lstm_fwd", (xp.shape, hs, hs), xp, w_hh, h0, c0,
                                threads=np.int64(rnn_threads()))
    return (ys[-1], cs[-1]), ys, (acts, cs)


def _overlap_dw() -> bool:
    return os.environ.get("FDL_RNN_OVERLAP_DW", "1").strip() != "0"


def lstm_native_backward(unroll, w_hh, h0, c0, ys, aux, d_carry, d_ys, xs=None):
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


def gru_native_forward(unroll, w_ih, w_hh, b_ih, b_hh, xs, h0):
    t_len, batch, _ = xs.shape
    n_h = w_hh.shape[0]
    xp = (xs.reshape(t_len * batch, -1) @ w_ih + b_ih).reshape(t_len, batch, 3 * n_h)
    hs = (t_len, batch, n_h)
    acts, ys, hns = _native_call("fdl_gru_fwd", (xp.shape, hs, hs), xp, w_hh, b_hh, h0)
    return ys[-1], ys, (acts, hns)


def gru_native_backward(unroll, w_hh, h0, ys, aux, d_h, d_ys, xs=None):
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
