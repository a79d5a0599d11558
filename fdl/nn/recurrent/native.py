"""The LSTM/GRU time loops in fdl's native library (``fdl/_ext/rnn_cpu.cc``) and when they are
used (``fdl.config.rnn_backend``). Used by :func:`fdl.nn.recurrent.fused.fused_direction`.

Per step the native loop runs one single-threaded GEMM plus one vectorised elementwise pass
instead of an XLA while-loop step (one dot plus ~12 small thunks and thread hand-offs); the
LSTM's forward loop runs on two threads when the layer is big enough, and both backward loops
accumulate the weight and bias gradients on a helper thread while they run. Same math and the
same buffers as the XLA loops in :mod:`fdl.nn.recurrent.fused`; float32 only.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["gru_native_backward", "gru_native_forward", "lstm_native_backward",
           "lstm_native_forward", "use_native"]


def use_native(kind: str, dtype) -> bool:
    """Whether the float32 LSTM/GRU loop of ``impl="fused"`` runs natively: per
    ``fdl.config.rnn_backend`` (``auto``: when the native library loads; ``native``: an
    unavailable library is an error; ``xla``: never). The tanh RNN and float64 always use the
    XLA loop. Read when a function is traced."""
    if kind not in ("lstm", "gru") or jnp.dtype(dtype) != jnp.float32:
        return False
    from fdl._ext import loader

    return loader.enabled("rnn", "rnn_backend")


# Batch axes of each call's operands and results (None: none; for a result, a sum over the
# batch): the time-major (T, B, .) buffers have it at 1, the (B, H) states at 0; the weights
# have none and their gradients are sums. fdl._ext.calls partitions the calls over it under a
# sharded jit.
_LSTM_FWD = dict(batch_in=(1, None, 0, 0), batch_out=(1, 1, 1))
_LSTM_BWD = dict(batch_in=(1, None, 0, 1, 1, 0, 0, 0, 1, 1),
                 batch_out=(1, 0, 0, None, None, None))
_GRU_FWD = dict(batch_in=(1, None, None, 0), batch_out=(1, 1, 1))
_GRU_BWD = dict(batch_in=(1, None, 0, 1, 1, 1, 0, 1),
                batch_out=(1, 1, 0, None, None, None, None))


def _native_call(target, out_shapes, *args, batch_in, batch_out):
    from fdl._ext.calls import native_call

    # operand 0 (the (T, B, G*H) buffer) is updated in place: it becomes result 0
    return native_call(target, out_shapes, *args, batch_in=batch_in, batch_out=batch_out,
                       aliases=((0, 0),))


def lstm_native_forward(unroll, w_ih, w_hh, b, xs, h0, c0):
    t_len, batch, _ = xs.shape
    n_h = w_hh.shape[0]
    xp = jnp.einsum("tbc,cg->tbg", xs, w_ih) + b  # (no (T*B, C) reshape: B may be sharded)
    hs = (t_len, batch, n_h)
    acts, ys, cs = _native_call("fdl_lstm_fwd", (xp.shape, hs, hs), xp, w_hh, h0, c0,
                                **_LSTM_FWD)
    return (ys[-1], cs[-1]), ys, (acts, cs)


def lstm_native_backward(unroll, w_hh, h0, c0, ys, aux, d_carry, d_ys, xs):
    """The reverse loop, with the weight and bias gradients accumulated in the same call."""
    acts, cs = aux
    g = w_hh.shape[1]
    dg, dh0, dc0, d_w_hh, d_w_ih, d_b = _native_call(
        "fdl_lstm_bwd_dw", (acts.shape, h0.shape, h0.shape, w_hh.shape, (xs.shape[-1], g), (g,)),
        acts, w_hh.T, c0, cs, d_ys, d_carry[0], d_carry[1], h0, ys, xs, **_LSTM_BWD)
    return (dh0, dc0), dg, dg, {"w_hh": d_w_hh, "w_ih": d_w_ih, "b_ih": d_b, "b_hh": d_b}


def gru_native_forward(unroll, w_ih, w_hh, b_ih, b_hh, xs, h0):
    t_len, batch, _ = xs.shape
    n_h = w_hh.shape[0]
    xp = jnp.einsum("tbc,cg->tbg", xs, w_ih) + b_ih
    hs = (t_len, batch, n_h)
    acts, ys, hns = _native_call("fdl_gru_fwd", (xp.shape, hs, hs), xp, w_hh, b_hh, h0,
                                 **_GRU_FWD)
    return ys[-1], ys, (acts, hns)


def gru_native_backward(unroll, w_hh, h0, ys, aux, d_h, d_ys, xs):
    """The reverse loop, with the weight and bias gradients accumulated in the same call."""
    acts, hns = aux
    g = w_hh.shape[1]
    d_xp, d_hh, dh0, d_w_hh, d_w_ih, d_b_ih, d_b_hh = _native_call(
        "fdl_gru_bwd_dw", (acts.shape, acts.shape, h0.shape, w_hh.shape, (xs.shape[-1], g),
                           (g,), (g,)),
        acts, w_hh.T, h0, ys, hns, d_ys, d_h, xs, **_GRU_BWD)
    return dh0, d_xp, d_hh, {"w_hh": d_w_hh, "w_ih": d_w_ih, "b_ih": d_b_ih, "b_hh": d_b_hh}
