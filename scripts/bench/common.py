"""Shared pieces of the benchmark workloads: data, hyperparameters, fdl step builder, FLOPs.

Every implementation of a workload trains on the same synthetic batch (numpy, fixed seed),
converted to its library's preferred layout (NHWC for the JAX libraries, NCHW for PyTorch).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

# hyperparameters shared by every implementation
LENET = dict(batch=256, lr=0.1, momentum=0.9, bn_decay=0.9, eps=1e-5)
RESNET = dict(batch=32, lr=0.05, momentum=0.9, bn_decay=0.9, eps=1e-5, classes=10)
CHARLM = dict(batch=32, steps=35, vocab=28, hidden=256, lr=1.0, clip=1.0)
BERT = dict(batch=32, seq=64, vocab=10_000, d=256, heads=4, ffn=512, layers=2, masked=10,
            lr=1e-3)


def image_batch(batch: int, hw: int, channels: int, classes: int, seed: int = 0):
    """``(x_nhwc float32, y int32)`` numpy arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, hw, hw, channels), dtype=np.float32)
    y = rng.integers(0, classes, size=(batch,), dtype=np.int32)
    return x, y


def char_batch(batch: int, steps: int, vocab: int, seed: int = 0):
    """``(tokens (B, T) int32, targets (B, T) int32)``: targets are tokens shifted by one."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, vocab, size=(batch, steps + 1), dtype=np.int32)
    return seq[:, :-1], seq[:, 1:]


def bert_batch(batch: int, seq: int, vocab: int, masked: int, seed: int = 0):
    """``(tokens, segments, pred_positions, mlm_labels, nsp_labels)`` int32 numpy arrays;
    full-length sequences (no padding), ``masked`` distinct predicted positions per sequence."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, seq), dtype=np.int32)
    segments = (np.arange(seq)[None, :] >= seq // 2).astype(np.int32).repeat(batch, 0)
    positions = np.stack([np.sort(rng.choice(np.arange(1, seq), masked, replace=False))
                          for _ in range(batch)]).astype(np.int32)
    mlm = rng.integers(0, vocab, size=(batch, masked), dtype=np.int32)
    nsp = rng.integers(0, 2, size=(batch,), dtype=np.int32)
    return tokens, segments, positions, mlm, nsp


def bert_flops(batch: int, seq: int, vocab: int, d: int, heads: int, ffn: int, layers: int,
               masked: int, **_) -> float:
    """Analytic matmul FLOPs of one BERT MLM+NSP training step (forward x 3): per token and
    layer the Q/K/V/O projections (8 d^2), the FFN (4 d ffn) and attention scores and mixing
    (4 seq d); the MLM head (dense d->d, dense d->vocab) on the gathered positions; NSP head."""
    enc = batch * seq * layers * (8 * d * d + 4 * d * ffn + 4 * seq * d)
    mlm = batch * masked * 2 * (d * d + d * vocab)
    nsp = batch * 2 * (d * d + 2 * d)
    return 3.0 * (enc + mlm + nsp)


def nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def xla_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of ``fn(*args)`` by XLA's HLO cost analysis of the lowered (not compiled) step.

    The lowered module's count agrees with the compiled one's within ~1% (LeNet: 0.422 vs
    0.426 GFLOP) and needs no XLA compilation; falls back to the compiled module's analysis.
    """
    import jax

    lowered = jax.jit(fn).lower(*args)
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001
        cost = None
    if not cost:
        cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def rnn_flops(kind: str, batch: int, steps: int, vocab: int, hidden: int) -> float:
    """Analytic matmul FLOPs of one char-LM training step (forward + backward = 3x forward).

    Per time step the forward pass does the gate matmuls ``x @ W_x`` (vocab -> G*hidden) and
    ``h @ W_h`` (hidden -> G*hidden) with G = 4 (LSTM) or 3 (GRU), and the output projection
    (hidden -> vocab); 2 FLOPs per multiply-add; the backward pass costs twice the forward.
    Elementwise gate work is not counted (a few % of the total). XLA's cost analysis counts a
    ``scan`` body once, not per step, so it cannot be used here directly.
    """
    g = {"lstm": 4, "gru": 3}[kind]
    per_step = 2 * batch * (vocab * g * hidden + hidden * g * hidden + hidden * vocab)
    return 3.0 * steps * per_step


def fdl_classifier_step(net, params, state, opt, x, y) -> Callable[[], Any]:
    """A jitted (donated) fdl training step on a fixed batch: forward with ``train=True``,
    softmax cross-entropy, ``value_and_grad``, optimizer step (``fdl.optim.apply_gradients``,
    as ``make_train_step``: fused where the optimizer has a fused step). Returns the blocking
    zero-argument ``step`` the harness wants."""
    import jax

    import fdl.nn as fnn
    from fdl import optim

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, state, opt_state, x, y):
        def loss_fn(p):
            logits, new_state = net.apply(p, state, x, train=True)
            return fnn.losses.softmax_cross_entropy(logits, y), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params, opt_state = optim.apply_gradients(opt, grads, opt_state, params)
        return params, new_state, opt_state, loss

    carry = [params, state, opt.init(params)]

    def step():
        p, s, o, loss = train_step(*carry, x, y)
        carry[:] = [p, s, o]
        return loss.block_until_ready()

    return step


_XLA = {"conv_backend": "xla", "dense_backend": "xla", "rnn_backend": "xla",
        "optim_backend": "xla", "norm_backend": "xla"}


def xla_kernels(builder: Callable[[], Callable[[], Any]]) -> Callable[[], Callable[[], Any]]:
    """The ``fdl (xla)`` row of a workload: ``builder``'s step traced with XLA's kernels
    (``fdl.config`` conv/dense/rnn/optim/norm backends ``xla``), i.e. what an install without
    the native kernels runs. The step is traced on its first call, so every call runs under the
    override (a context-variable set, negligible next to a step)."""

    def build():
        from fdl import config

        with config.override(**_XLA):
            step = builder()

        def step_xla():
            with config.override(**_XLA):
                return step()

        return step_xla

    return build
