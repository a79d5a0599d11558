"""One LSTM/GRU direction through oneDNN's RNN primitives (``fdl/_ext/rnn_onednn.cc``), used by
:func:`fdl.nn.recurrent.fused.fused_direction` when ``FDL_RNN_BACKEND=onednn``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fdl.nn.recurrent.native import rnn_backend

__all__ = ["onednn_workspace_bytes", "rnn_onednn"]

_AUTO_ONEDNN = {"lstm": False, "gru": False}
_ONEDNN_KIND = {"lstm": 0, "gru": 1}


def onednn_workspace_bytes(kind: str, dtype, t_len: int, batch: int, n_in: int, n_h: int
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
def rnn_onednn(kind, ws_bytes, params, xs, carry):
    # not differentiated: forward_inference, no workspace
    t_len, batch, _ = xs.shape
    hs = (batch, params["w_hh"].shape[0])
    states = _onednn_states(kind, carry)
    ys, *fin = _onednn_call(kind, "infer", [((t_len, *hs), None)] + [(hs, None)] * len(states),
                            xs, *_onednn_operands(kind, params), *states)
    return (tuple(fin) if kind == "lstm" else fin[0]), ys


def rnn_onednn_fwd(kind, ws_bytes, params, xs, carry):
    t_len, batch, _ = xs.shape
    hs = (batch, params["w_hh"].shape[0])
    states = _onednn_states(kind, carry)
    ops = _onednn_operands(kind, params)
    ys, *fin, ws = _onednn_call(
        kind, "fwd", [((t_len, *hs), None)] + [(hs, None)] * len(states)
        + [((ws_bytes,), jnp.uint8)], xs, *ops, *states)
    carry_n = tuple(fin) if kind == "lstm" else fin[0]
    return (carry_n, ys), (xs, ops, states, ys, tuple(fin), ws)


def rnn_onednn_bwd(kind, ws_bytes, res, cts):
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


rnn_onednn.defvjp(rnn_onednn_fwd, rnn_onednn_bwd)
