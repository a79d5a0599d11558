"""Recurrent cells on pre-projected inputs, the hoisted input projection and the parameter
initialisation of one direction of one layer (see :mod:`fdl.nn.recurrent` for the layouts and
equations)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["CELLS", "CELL_GATES", "gru_cell", "init_direction_params", "lstm_cell",
           "project_inputs", "rnn_cell", "rnn_relu_cell"]

# gate blocks per cell kind; ``"rnn_relu"`` is the RNN with ``nonlinearity="relu"``
CELL_GATES = {"rnn": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


def rnn_cell(params: dict, h: jax.Array, xp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tanh RNN step. ``xp = x_t @ w_ih + b_ih + b_hh`` (batch, H); ``h`` (batch, H).
    Returns ``(h', h')``."""
    h = jnp.tanh(xp + h @ params["w_hh"])
    return h, h


def rnn_relu_cell(params: dict, h: jax.Array, xp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ReLU RNN step (PyTorch's ``nonlinearity="relu"``): ``h' = relu(xp + h @ w_hh)``."""
    h = jax.nn.relu(xp + h @ params["w_hh"])
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
    ``carry = (h, c)``, each (batch, H). Returns ``((h', c'), h')``.

    With a projection (PyTorch's ``proj_size`` P: params hold ``w_hr`` (H, P) and ``w_hh`` is
    (P, 4H)) ``h' = (o * tanh(c')) @ w_hr`` is (batch, P); ``c`` stays (batch, H)."""
    h, c = carry
    gates = xp + h @ params["w_hh"]
    n_h = c.shape[-1]
    i = jax.nn.sigmoid(gates[..., :n_h])
    f = jax.nn.sigmoid(gates[..., n_h : 2 * n_h])
    g = jnp.tanh(gates[..., 2 * n_h : 3 * n_h])
    o = jax.nn.sigmoid(gates[..., 3 * n_h :])
    c = f * c + i * g
    h = o * jnp.tanh(c)
    if "w_hr" in params:
        h = h @ params["w_hr"]
    return (h, c), h


CELLS: dict[str, Callable] = {"rnn": rnn_cell, "rnn_relu": rnn_relu_cell, "gru": gru_cell,
                              "lstm": lstm_cell}


def project_inputs(kind: str, params: dict, x: jax.Array) -> jax.Array:
    """The input projection for all steps at once: ``x @ w_ih + b_ih`` (``+ b_hh`` for
    ``"rnn"``/``"lstm"``). ``x`` (..., in) -> (..., G*H)."""
    b = params["b_ih"] if kind == "gru" else params["b_ih"] + params["b_hh"]
    return x @ params["w_ih"] + b


def init_direction_params(key, kind: str, in_features: int, hidden: int, dtype=jnp.float32,
                          *, proj_size: int = 0) -> dict:
    """PyTorch's initialisation: every weight and bias ``U(-1/sqrt(H), 1/sqrt(H))``.
    ``proj_size`` P > 0 (LSTM only) adds ``w_hr`` (H, P) and makes ``w_hh`` (P, 4H)."""
    g = CELL_GATES[kind]
    bound = 1.0 / math.sqrt(hidden)
    k = jax.random.split(key, 4)
    u = lambda kk, shape: jax.random.uniform(kk, shape, dtype, -bound, bound)  # noqa: E731
    params = {
        "w_ih": u(k[0], (in_features, g * hidden)),
        "w_hh": u(k[1], (proj_size or hidden, g * hidden)),
        "b_ih": u(k[2], (g * hidden,)),
        "b_hh": u(k[3], (g * hidden,)),
    }
    if proj_size:
        if kind != "lstm":
            raise ValueError(f"init_direction_params: proj_size is for the LSTM, got {kind!r}")
        params["w_hr"] = u(jax.random.fold_in(key, 4), (hidden, proj_size))
    return params
