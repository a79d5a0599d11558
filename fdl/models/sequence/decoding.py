"""Greedy and beam-search decoding with fixed shapes, for any decoder Layer.

A **decoder** is a Layer ``apply(params, state, tokens (N, 1)) -> (logits (N, 1, V), state)``
whose state carries everything between steps (a recurrent carry, a KV cache, the encoder memory:
a bound :class:`~fdl.models.sequence.encoder_decoder.Decoder` state). Every leaf of that state
has the row axis **first** (``(N, ...)``): beam search reorders rows by gathering on axis 0, and
the batch size is read from it. ``record(state) -> pytree`` (optional) picks per-step extras
from the state after each step, leaves with leading axis ``N`` (e.g. attention weights
``(N, K)``); they come back stacked over steps as ``aux``.

The same searches over a bare **step function** (:func:`greedy_search_steps`,
:func:`beam_search_steps`) take ``step_fn(carry, tokens (N,)) -> (logits (N, V), new_carry,
aux)`` with the same row-first rule for ``carry`` and ``aux`` (:func:`decoder_step` builds one
from a decoder Layer).

Both searches run ``max_len`` steps in one ``lax.scan`` (so they can be ``jit``-ed; ``max_len``,
``beam_size`` and the ids are static) and return a :class:`DecodeResult` of fixed shape:

- ``tokens (B, max_len)`` int32: the output tokens; position ``lengths[b]`` holds ``eos_id`` if the
  sequence ended, and every later position holds ``pad_id`` (default ``-1``);
- ``lengths (B,)`` int32: the number of tokens before ``<eos>`` (``max_len`` if none was produced);
  ``tokens[b, :lengths[b]]`` is the output sentence, as d2l's ``predict_seq2seq`` returns it;
- ``scores (B,)``: the summed log-probability of the output including ``<eos>`` (greedy), or the
  length-normalised score (beam search, below);
- ``aux``: the step function's ``aux`` stacked over steps, leaves ``(B, max_len, ...)`` (values at
  positions after the ``<eos>`` are zero).

**Beam search** (d2l "Beam Search"): at every step the ``k`` highest raw log-probabilities
``log P(y_1..y_t | c)`` among the ``k * V`` one-token extensions are kept; a beam that has produced
``<eos>`` is finished and carried along unchanged (its score no longer changes). At the end every
beam is ranked by ``log P(y_1..y_L | c) / L**alpha`` where ``L`` counts the generated tokens
*including* ``<eos>`` (so a beam that ends at once has ``L = 1``, never 0), and the best is
returned. ``beam_size=1`` is greedy search.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["DecodeResult", "StepFn", "beam_search", "beam_search_steps", "decoder_step",
           "greedy_search", "greedy_search_steps"]

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any, Any]]


class DecodeResult(NamedTuple):
    """Fixed-shape decoding output (see the module docstring)."""

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array
    aux: Any


def decoder_step(decoder, params, record: Callable[[Any], Any] | None = None) -> StepFn:
    """``step(state, tokens (N,)) -> (logits (N, V), state, aux)``: one evaluation-mode call
    of ``decoder`` on one token per row; ``aux = record(state)`` (or ``None``)."""

    def step(state, tokens):
        logits, state = decoder.apply(params, state, tokens[:, None], key=None, train=False)
        return logits[:, 0], state, (None if record is None else record(state))

    return step


def _rows(state: Any) -> int:
    """The batch size of a decoder state (axis 0 of every leaf, which must agree)."""
    rows = {jax.tree_util.keystr(path): jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
    if not rows or None in rows.values() or len(set(rows.values())) != 1:
        raise ValueError(f"decoding: every leaf of the decoder state needs the batch axis "
                         f"first, of one size; got first dims {rows}")
    return next(iter(rows.values()))


def _check_common(max_len: int, batch_size: int) -> None:
    for name, v in (("max_len", max_len), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"decoding: {name} must be an integer >= 1, got {v!r}")


def _aux_zeros(step_fn, carry, tokens, lead: tuple[int, ...], max_len: int):
    """A zero history buffer ``lead + (max_len, ...)`` for every aux leaf."""
    _, _, aux = jax.eval_shape(step_fn, carry, tokens)
    return jax.tree_util.tree_map(
        lambda s: jnp.zeros(lead + (max_len,) + tuple(s.shape[1:]), s.dtype), aux
    )


def _zero_rows(aux, rows_done):
    def z(a):
        m = rows_done.reshape(rows_done.shape + (1,) * (a.ndim - 1))
        return jnp.where(m, jnp.zeros((), a.dtype), a)

    return jax.tree_util.tree_map(z, aux)


def greedy_search(
    decoder,
    params: Any,
    state: Any,
    *,
    bos_id: int,
    eos_id: int,
    max_len: int,
    pad_id: int = -1,
    record: Callable[[Any], Any] | None = None,
) -> DecodeResult:
    """Greedy decoding: at every step feed back the arg-max token; stop a row at ``<eos>``.

    ``decoder``, ``params``: the decoder Layer and its params; ``state``: its initial (bound)
    state for ``B`` rows. Returns a :class:`DecodeResult` (``aux``: ``record``'s leaves
    ``(B, max_len, ...)``, or ``None``).
    """
    return greedy_search_steps(decoder_step(decoder, params, record), state, _rows(state),
                               bos_id=bos_id, eos_id=eos_id, max_len=max_len, pad_id=pad_id)


def greedy_search_steps(step_fn: StepFn, carry: Any, batch_size: int, *, bos_id: int,
                        eos_id: int, max_len: int, pad_id: int = -1) -> DecodeResult:
    """:func:`greedy_search` over a step function (see the module docstring) from ``carry``
    for ``batch_size`` rows."""
    _check_common(max_len, batch_size)
    tokens0 = jnp.full((batch_size,), bos_id, jnp.int32)

    def body(c, _):
        mc, prev, done, length, score = c
        logits, mc, aux = step_fn(mc, prev)
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        tok_logp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        score = score + jnp.where(done, 0.0, tok_logp.astype(jnp.float32))
        is_eos = tok == eos_id
        length = length + jnp.where(done | is_eos, 0, 1)
        out = jnp.where(done, pad_id, tok)
        aux = _zero_rows(aux, done)
        return (mc, jnp.where(done, eos_id, tok), done | is_eos, length, score), (out, aux)

    init = (
        carry,
        tokens0,
        jnp.zeros((batch_size,), bool),
        jnp.zeros((batch_size,), jnp.int32),
        jnp.zeros((batch_size,), jnp.float32),
    )
    (_, _, _, length, score), (out, aux) = lax.scan(body, init, None, length=max_len)
    aux = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), aux)
    return DecodeResult(out.T, length, score, aux)


def beam_search(
    decoder,
    params: Any,
    state: Any,
    *,
    beam_size: int,
    bos_id: int,
    eos_id: int,
    max_len: int,
    alpha: float = 0.75,
    pad_id: int = -1,
    return_all: bool = False,
    record: Callable[[Any], Any] | None = None,
) -> DecodeResult | tuple[DecodeResult, DecodeResult]:
    """Beam search with ``beam_size`` beams and length normalisation ``1 / L**alpha``.

    ``state`` is the decoder's initial state for ``B`` rows (it is repeated ``beam_size``
    times; row ``b * beam_size + j`` is beam ``j`` of example ``b``). Returns the best beam per
    example as a :class:`DecodeResult`; with ``return_all=True`` also a second one holding every
    beam (``tokens (B, k, max_len)``, ``lengths``/``scores (B, k)``, sorted best first).
    Raises ``ValueError`` if ``beam_size < 1``.
    """
    return beam_search_steps(decoder_step(decoder, params, record), state, _rows(state),
                             beam_size=beam_size, bos_id=bos_id, eos_id=eos_id,
                             max_len=max_len, alpha=alpha, pad_id=pad_id, return_all=return_all)


def beam_search_steps(step_fn: StepFn, carry: Any, batch_size: int, *, beam_size: int,
                      bos_id: int, eos_id: int, max_len: int, alpha: float = 0.75,
                      pad_id: int = -1, return_all: bool = False
                      ) -> DecodeResult | tuple[DecodeResult, DecodeResult]:
    """:func:`beam_search` over a step function (see the module docstring) from ``carry`` for
    ``batch_size`` rows."""
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_search: beam_size must be an integer >= 1, got {beam_size!r}")
    if alpha < 0:
        raise ValueError(f"beam_search: alpha must be >= 0, got {alpha}")
    _check_common(max_len, batch_size)
    k = beam_size
    n = batch_size * k
    carry = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), carry)
    tokens0 = jnp.full((n,), bos_id, jnp.int32)
    aux_hist = _aux_zeros(step_fn, carry, tokens0, (batch_size, k), max_len)
    neg_inf = jnp.float32(-jnp.inf)
    scores0 = jnp.where(jnp.arange(k) == 0, 0.0, neg_inf)
    scores0 = jnp.broadcast_to(scores0, (batch_size, k)).astype(jnp.float32)
    row_base = (jnp.arange(batch_size) * k)[:, None]

    def gather_beams(x, parent):  # x (B, k, ...), parent (B, k)
        idx = parent.reshape(parent.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    def body(c, t):
        mc, prev, hist, aux_h, score, done, gen_len = c
        logits, mc, aux = step_fn(mc, prev)
        v = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch_size, k, v)
        only_eos = jnp.where(jnp.arange(v) == eos_id, 0.0, neg_inf)
        ext = jnp.where(done[..., None], only_eos, logp)  # finished beams: one "stay" move
        cand = (score[..., None] + ext).reshape(batch_size, k * v)
        new_score, idx = lax.top_k(cand, k)
        parent = (idx // v).astype(jnp.int32)
        tok = (idx % v).astype(jnp.int32)
        parent_done = jnp.take_along_axis(done, parent, axis=1)
        new_done = parent_done | (tok == eos_id)
        gen_len = jnp.take_along_axis(gen_len, parent, axis=1) + jnp.where(parent_done, 0, 1)
        hist = gather_beams(hist, parent)
        hist = hist.at[:, :, t].set(jnp.where(parent_done, pad_id, tok))
        flat_parent = (row_base + parent).reshape(n)
        mc = jax.tree_util.tree_map(lambda x: x[flat_parent], mc)
        aux_h = jax.tree_util.tree_map(
            lambda h, a: gather_beams(h, parent).at[:, :, t].set(
                a[flat_parent].reshape((batch_size, k) + a.shape[1:])),
            aux_h, _zero_rows(aux, done.reshape(n)),
        )
        return (mc, tok.reshape(n), hist, aux_h, new_score, new_done, gen_len), None

    init = (
        carry,
        tokens0,
        jnp.full((batch_size, k, max_len), pad_id, jnp.int32),
        aux_hist,
        scores0,
        jnp.zeros((batch_size, k), bool),
        jnp.zeros((batch_size, k), jnp.int32),
    )
    (_, _, hist, aux_h, score, done, gen_len), _ = lax.scan(
        body, init, jnp.arange(max_len), length=max_len
    )
    norm = score / jnp.maximum(gen_len, 1).astype(jnp.float32) ** alpha
    lengths = gen_len - done.astype(jnp.int32)
    order = jnp.argsort(-norm, axis=1)

    def pick(x):
        idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    all_res = DecodeResult(pick(hist), pick(lengths), pick(norm),
                           jax.tree_util.tree_map(pick, aux_h))
    best = DecodeResult(all_res.tokens[:, 0], all_res.lengths[:, 0], all_res.scores[:, 0],
                        jax.tree_util.tree_map(lambda a: a[:, 0], all_res.aux))
    if return_all:
        return best, all_res
    return best
