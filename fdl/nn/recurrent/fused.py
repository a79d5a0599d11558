"""One direction of one built-in layer (input projection + recurrence) with hand-written
derivatives: :func:`fused_direction`, with the XLA time loops of the RNN, GRU and LSTM.

The float32 LSTM/GRU loops may instead run in fdl's native library
(:mod:`fdl.nn.recurrent.native`); :func:`fused_direction` dispatches.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fdl.nn.recurrent.cells import CELL_GATES, CELLS, project_inputs
from fdl.nn.recurrent.linear import linear_call
from fdl.nn.recurrent.native import (
    gru_native_backward,
    gru_native_forward,
    lstm_native_backward,
    lstm_native_forward,
    use_native,
)
from fdl.nn.recurrent.scan import scan_cell

__all__ = ["fused_direction"]

# ----------------------------------------------------------------------------- fused direction
#
# ``fused_direction``: one direction of one layer (input projection + recurrence) with a custom
# JVP whose tangent is a linear map (:func:`fdl.nn.recurrent.linear.linear_call`) transposed by
# the hand-written backward loop: forward mode (jvp, jacfwd) evaluates the XLA loop's JVP,
# reverse mode runs the backward below, derivatives of order two and up differentiate the XLA
# loops. What it does differently from differentiating ``scan_cell`` (see
# docs/results/sequence_lm.md, section "Step time", for what each part gained):
#
# - forward: the projection ``x @ w_ih + b`` for all steps is one matmul; the scan carries that
#   (T, B, G*H) buffer and overwrites step t with the activated gates in place (no second
#   (T, B, G*H) buffer, no zero-fill); the LSTM's four activations are one ``tanh`` over the
#   whole gate row (``sigmoid(x) = (tanh(x/2) + 1)/2``), so no slice/concatenate per step;
# - backward: the reverse loop computes only the gate gradients and ``dgates @ w_hh.T``; the
#   gradients of ``w_hh``, ``w_ih`` and both biases are one matmul (sum) over all T*B rows after
#   the loop, written as plain ``(K, T*B) @ (T*B, G*H)`` products (the native LSTM/GRU loops
#   instead accumulate them on a helper thread while the loop runs).


def _project(xs, w_ih, b):
    """``xs @ w_ih + b`` for all steps: (T, B, C) -> (T, B, G*H). An einsum, not a (T*B, C)
    reshape: under a sharded jit B may be split over devices, and the reshape made XLA
    all-gather it."""
    return jnp.einsum("tbc,cg->tbg", xs, w_ih) + b


def _outer_sum(a, b):
    """``sum over t, b of a[t, b, :, None] * b[t, b, None, :]``: (T, B, K), (T, B, N) -> (K, N)
    as one dot over both leading axes (in that order: XLA keeps them a free reshape)."""
    return lax.dot_general(a, b, (((0, 1), (0, 1)), ((), ())))


def _gate_vec(n_h: int, values, dtype) -> jax.Array:
    """A (len(values)*n_h,) vector: ``values[k]`` repeated over gate block k."""
    return jnp.concatenate([jnp.full((n_h,), v, dtype) for v in values])


def _lstm_dir_forward(unroll, w_ih, w_hh, b, xs, h0, c0):
    t_len, n_h = xs.shape[0], w_hh.shape[0]
    xp = _project(xs, w_ih, b)
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
    t_len, n_h = xs.shape[0], w_hh.shape[0]
    xp = _project(xs, w_ih, b_ih)

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


def _rnn_dir_forward(unroll, w_ih, w_hh, b, xs, h0, relu=False):
    xp = _project(xs, w_ih, b)
    act = jax.nn.relu if relu else jnp.tanh

    def step(h, x):
        h = act(x + h @ w_hh)
        return h, h

    h, ys = lax.scan(step, h0, xp, unroll=unroll)
    return h, ys, ()


def _rnn_dir_backward(unroll, w_hh, h0, ys, aux, d_h, d_ys, relu=False):
    w_t = w_hh.T

    def step(dh, inp):
        dy, h = inp
        # d act / d a from the output: relu' = [h > 0], tanh' = 1 - h^2
        da = (dh + dy) * ((h > 0).astype(h.dtype) if relu else (1 - h * h))
        return da @ w_t, da

    d0, da = lax.scan(step, d_h, (d_ys, ys), reverse=True, unroll=unroll)
    return d0, da, da


def _dir_forward(kind, unroll, native, params, xs, carry):
    w_ih, w_hh, b_ih, b_hh = params["w_ih"], params["w_hh"], params["b_ih"], params["b_hh"]
    if kind == "lstm":
        fwd = lstm_native_forward if native else _lstm_dir_forward
        return fwd(unroll, w_ih, w_hh, b_ih + b_hh, xs, carry[0], carry[1])
    if kind == "gru":
        fwd = gru_native_forward if native else _gru_dir_forward
        return fwd(unroll, w_ih, w_hh, b_ih, b_hh, xs, carry)
    return _rnn_dir_forward(unroll, w_ih, w_hh, b_ih + b_hh, xs, carry, kind == "rnn_relu")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _native_forward(kind, unroll, params, xs, carry):
    """The native loop's results and saved activations; their derivatives (needed only for
    derivatives of order two and up) by autodiff of the XLA loop, which computes the same."""
    return _dir_forward(kind, unroll, True, params, xs, carry)


@_native_forward.defjvp
def _native_forward_jvp(kind, unroll, primals, tangents):
    return jax.jvp(functools.partial(_dir_forward, kind, unroll, False), primals, tangents)


def _dir_backward(kind, unroll, native, res, cts):
    """The hand-written VJP of :func:`_dir_forward` from its residuals ``(params, xs, carry0,
    ys, aux)``: cotangents ``(d_carry, d_ys)`` -> ``(d_params, d_xs, d_carry0)``."""
    params, xs, carry0, ys, aux = res
    d_carry, d_ys = cts
    w_ih, w_hh = params["w_ih"], params["w_hh"]
    done = None  # weight/bias gradients the native backward already computed
    if kind == "lstm":
        h0 = carry0[0]
        if native:
            d0, d_xp, d_hh, *rest = lstm_native_backward(unroll, w_hh, h0, carry0[1], ys, aux,
                                                          d_carry, d_ys, xs=xs)
            done = rest[0] if rest else None
        else:
            d0, d_xp, d_hh = _lstm_dir_backward(unroll, w_hh, h0, carry0[1], ys, aux, d_carry,
                                                d_ys)
    elif kind == "gru":
        h0 = carry0
        if native:
            d0, d_xp, d_hh, *rest = gru_native_backward(unroll, w_hh, h0, ys, aux, d_carry,
                                                         d_ys, xs=xs)
            done = rest[0] if rest else None
        else:
            d0, d_xp, d_hh = _gru_dir_backward(unroll, w_hh, h0, ys, aux, d_carry, d_ys)
    else:
        h0 = carry0
        d0, d_xp, d_hh = _rnn_dir_backward(unroll, w_hh, h0, ys, aux, d_carry, d_ys,
                                           kind == "rnn_relu")
    # h_{t-1} for every step: h0 for t = 0, then ys[:-1] (split so no (T, B, H) concatenate);
    # dots over (T, B), no (T*B, .) reshapes (B may be sharded)
    if done is not None:
        d_params = done
    else:
        d_w_hh = h0.T @ d_hh[0] + _outer_sum(ys[:-1], d_hh[1:])
        d_b_ih = jnp.sum(d_xp, (0, 1))
        d_b_hh = jnp.sum(d_hh, (0, 1)) if kind == "gru" else d_b_ih
        d_params = {"w_ih": _outer_sum(xs, d_xp), "w_hh": d_w_hh,
                    "b_ih": d_b_ih, "b_hh": d_b_hh}
    d_xs = jnp.einsum("tbg,cg->tbc", d_xp, w_ih)  # (no (T*B, .) reshape: B may be sharded)
    # mixed dtypes (e.g. float32 params, float64 inputs) promote inside the loops: every
    # cotangent takes its primal's dtype
    like = lambda d, p: d.astype(jnp.result_type(p))  # noqa: E731
    return (jax.tree_util.tree_map(like, d_params, {k: params[k] for k in d_params}),
            like(d_xs, xs), jax.tree_util.tree_map(like, d0, carry0))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _native_backward(kind, unroll, res, cts):
    """:func:`_dir_backward` with the native loop; derivatives by autodiff of the XLA loop."""
    return _dir_backward(kind, unroll, True, res, cts)


@_native_backward.defjvp
def _native_backward_jvp(kind, unroll, primals, tangents):
    return jax.jvp(functools.partial(_dir_backward, kind, unroll, False), primals, tangents)


def _dir_tangent(kind, unroll, res, tangents):
    """The tangent ``(d_carry, d_ys)`` of :func:`_dir_forward` at residuals ``res`` along
    ``tangents = (d_params, d_xs, d_carry0)``: forward-mode autodiff of ``project_inputs`` +
    :func:`scan_cell` (the same function; its JVP is cheaper than that of the in-place gate
    buffer of :func:`_dir_forward`)."""
    params, xs, carry0 = res[:3]

    def fwd(p, x, c):
        return scan_cell(CELLS[kind], p, project_inputs(kind, p, x), c, unroll=unroll)

    return jax.jvp(fwd, (params, xs, carry0), tangents)[1]


@functools.cache
def _linear_pair(kind, unroll, native):
    """(tangent, transpose) of one direction for :func:`linear_call` (cached: the same
    function objects key JAX's caches)."""
    bwd = (functools.partial(_native_backward, kind, unroll) if native
           else functools.partial(_dir_backward, kind, unroll, False))
    return functools.partial(_dir_tangent, kind, unroll), bwd


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _fused_dir(kind, unroll, native, params, xs, carry):
    carry, ys, _ = _dir_forward(kind, unroll, native, params, xs, carry)
    return carry, ys


@_fused_dir.defjvp
def _fused_dir_jvp(kind, unroll, native, primals, tangents):
    """Primal by the (native or XLA) loop, saving its activations; the tangent by a linear map
    whose transpose is the hand-written backward loop, so reverse mode (JAX transposes the
    tangent) runs :func:`_dir_backward` and forward mode the XLA loop's JVP."""
    params, xs, carry = primals
    if native:
        carry_n, ys, aux = _native_forward(kind, unroll, params, xs, carry)
    else:
        carry_n, ys, aux = _dir_forward(kind, unroll, False, params, xs, carry)
    tangent, transpose = _linear_pair(kind, unroll, native)
    d_out = linear_call(tangent, transpose, (params, xs, carry, ys, aux), tuple(tangents))
    return (carry_n, ys), tuple(d_out)


def fused_direction(kind: str, params: dict, xs: jax.Array, carry: Any, *, unroll: int = 1
                    ) -> tuple[Any, jax.Array]:
    """One direction of one layer -- the input projection and the recurrence of a built-in
    cell (``kind`` in ``"rnn"``, ``"rnn_relu"``, ``"gru"``, ``"lstm"``; no LSTM projection,
    ``w_hr``: use :func:`~fdl.nn.recurrent.scan.scan_cell`) -- on time-major ``xs`` (T, B, in),
    with hand-written derivatives (see the comment above; every JAX transformation works:
    grad, jvp/jacfwd, Hessian-vector products, vmap). Same values as ``project_inputs`` +
    :func:`scan_cell`. Returns ``(final_carry, ys (T, B, H))``. The float32 LSTM/GRU time loop
    runs in the native library unless ``fdl.config.rnn_backend == "xla"`` (see
    :func:`fdl.nn.recurrent.native.use_native`)."""
    if kind not in CELL_GATES:
        raise ValueError(f"fused_direction: kind must be one of {sorted(CELL_GATES)}, got "
                         f"{kind!r}")
    if "w_hr" in params:
        raise ValueError("fused_direction: the LSTM projection (w_hr, proj_size) runs through "
                         "scan_cell / impl='scan'")
    if kind == "lstm":
        carry = tuple(carry)
    params = {k: params[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")}
    if xs.shape[0] == 0:
        return scan_cell(CELLS[kind], params, project_inputs(kind, params, xs), carry)
    dtypes = {jnp.result_type(a) for a in (*params.values(), xs,
                                           *jax.tree_util.tree_leaves(carry))}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype is not None and use_native(kind, dtype):
        # the native loop when lowering for the CPU, the XLA loop for any other platform
        return lax.platform_dependent(
            params, xs, carry, cpu=functools.partial(_fused_dir, kind, int(unroll), True),
            default=functools.partial(_fused_dir, kind, int(unroll), False))
    return _fused_dir(kind, int(unroll), False, params, xs, carry)
