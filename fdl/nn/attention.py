"""The attention core: masks, masked softmax, scaled dot-product and additive attention.

Every attention function and layer takes ``(queries, keys, values)`` and the masking as
**keyword arguments**, never as a fourth positional element:

- ``mask``: a bool array, ``True`` where a query *may* attend to a key, broadcastable to the score
  shape ``(..., q_len, k_len)``;
- ``valid_lens`` (layers and :func:`masked_softmax`): d2l's convention, ``(batch,)`` (one length
  per sequence, shared by all its queries) or ``(batch, q_len)`` (one length per query): keys at
  positions ``>= valid_lens`` are masked. Given together, the two are combined (logical AND).

Helpers build masks: :func:`padding_mask` (from lengths), :func:`valid_lens_mask` (lengths as a
mask for a given score shape), :func:`causal_mask` (autoregressive, also for cached decoding
where queries are the last positions) and :func:`combine_masks`.

Masked scores are filled with ``jnp.finfo(dtype).min`` (:func:`mask_fill_value`; a fixed
``-1e6`` is no mask at all in float16 and too weak for large scores) and masked positions get
weight **exactly 0** after the softmax. The softmax runs in at least float32 (bfloat16/float16
scores are promoted; the weights are cast back to the values' dtype for the weighted sum).

**Fully masked rows** (a query that may attend to no key, e.g. ``valid_lens == 0``): every weight
in the row is 0 and the attention output for that query is the zero vector; gradients are finite
(zero). This differs from d2l's ``masked_softmax``, which gives such a row uniform weights over
all (padding) keys; for ``valid_lens >= 1`` the two agree.

The attention weights (before dropout) are returned next to the output, for heat maps.
The multi-head layers (fused QKV self-attention, the KV cache) are in :mod:`fdl.nn.multi_head`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fdl.nn import initializers as inits
from fdl.nn.core import Layer, ShapeError, check_positive_int, require_key

__all__ = [
    "mask_fill_value",
    "padding_mask",
    "causal_mask",
    "combine_masks",
    "valid_lens_mask",
    "attention_mask",
    "masked_softmax",
    "dot_product_attention",
    "additive_attention",
    "additive_attention_apply",
    "unpack_qkv",
    "check_dropout",
]


def mask_fill_value(dtype) -> Any:
    """The score given to masked positions before the softmax: ``finfo(dtype).min``."""
    return jnp.finfo(jnp.dtype(dtype)).min


def padding_mask(valid_lens: jax.Array, max_len: int) -> jax.Array:
    """``mask[..., j] = j < valid_lens[...]``: shape ``valid_lens.shape + (max_len,)``, bool.

    ``(batch,)`` lengths give ``(batch, max_len)``; per-query ``(batch, q_len)`` lengths give
    ``(batch, q_len, max_len)``."""
    valid_lens = jnp.asarray(valid_lens)
    return jnp.arange(max_len) < valid_lens[..., None]


def causal_mask(q_len: int, k_len: int | None = None) -> jax.Array:
    """Lower-triangular ``(q_len, k_len)`` bool mask: query ``i`` sees keys ``j <= i``.

    With ``k_len > q_len`` the queries are taken to be the *last* ``q_len`` positions (cached
    decoding), i.e. query ``i`` sees keys ``j <= i + k_len - q_len``.
    """
    k_len = q_len if k_len is None else k_len
    offset = k_len - q_len
    return jnp.arange(k_len)[None, :] <= (jnp.arange(q_len)[:, None] + offset)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the given masks (``None`` entries ignored; all ``None`` -> ``None``)."""
    real = [jnp.asarray(m, bool) for m in masks if m is not None]
    if not real:
        return None
    out = real[0]
    for m in real[1:]:
        out = jnp.logical_and(out, m)
    return out


def valid_lens_mask(valid_lens: jax.Array | None, score_shape: tuple[int, ...]) -> jax.Array | None:
    """The d2l ``valid_lens`` convention as a mask broadcastable to ``score_shape``.

    ``score_shape`` is ``(batch, ..., q_len, k_len)``. ``valid_lens`` is ``None``, 1-D
    ``(batch,)`` (one length per example, shared by all queries) or 2-D ``(batch, q_len)`` (one
    length per query). Any axes between batch and ``q_len`` (e.g. heads) are broadcast.
    Floating-point or boolean lengths are refused (a bool array is a mask: pass ``mask=``).
    """
    if valid_lens is None:
        return None
    valid_lens = jnp.asarray(valid_lens)
    if not jnp.issubdtype(valid_lens.dtype, jnp.integer):
        raise TypeError(
            f"valid_lens must be integer lengths, got dtype {valid_lens.dtype}; pass a boolean "
            "mask as mask=... instead"
        )
    if len(score_shape) < 3:
        raise ShapeError(
            "masked_softmax", f"scores must be (batch, ..., q_len, k_len), got {score_shape}"
        )
    batch, q_len, k_len = score_shape[0], score_shape[-2], score_shape[-1]
    middle = len(score_shape) - 3
    if valid_lens.ndim == 1 and valid_lens.shape[0] == batch:
        m = padding_mask(valid_lens, k_len)  # (B, K)
        return m.reshape((batch,) + (1,) * (middle + 1) + (k_len,))
    if valid_lens.ndim == 2 and valid_lens.shape == (batch, q_len):
        m = padding_mask(valid_lens, k_len)  # (B, Q, K)
        return m.reshape((batch,) + (1,) * middle + (q_len, k_len))
    raise ShapeError(
        "masked_softmax",
        f"valid_lens must be ({batch},) or ({batch}, {q_len}) for scores {score_shape}, "
        f"got {tuple(valid_lens.shape)}",
    )


def attention_mask(score_shape: tuple[int, ...], *, mask: jax.Array | None = None,
                   valid_lens: jax.Array | None = None, causal: bool = False
                   ) -> jax.Array | None:
    """One bool mask broadcastable to ``score_shape = (batch, ..., q_len, k_len)`` from an
    explicit ``mask``, ``valid_lens`` (``(batch,)`` or ``(batch, q_len)``) and/or ``causal``
    (query ``i`` sees keys ``j <= i + k_len - q_len``); ``None`` when nothing masks."""
    if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True = may attend), got dtype {jnp.asarray(mask).dtype}; "
            "pass integer lengths as valid_lens=... instead"
        )
    cm = causal_mask(score_shape[-2], score_shape[-1]) if causal else None
    return combine_masks(mask, valid_lens_mask(valid_lens, tuple(score_shape)), cm)


def _stat_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _softmax_where(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Masked softmax over the last axis in at least float32; exact zeros where masked."""
    scores = scores.astype(_stat_dtype(scores.dtype))
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    mask = jnp.broadcast_to(mask, scores.shape)
    filled = jnp.where(mask, scores, mask_fill_value(scores.dtype))
    w = jax.nn.softmax(filled, axis=-1)
    # exact zeros at masked positions; a fully masked row becomes all zeros
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def masked_softmax(scores: jax.Array, valid_lens: jax.Array | None = None, *,
                   mask: jax.Array | None = None) -> jax.Array:
    """Softmax over the last axis keeping only the first ``valid_lens`` keys (d2l semantics).

    ``scores``: ``(batch, ..., q_len, k_len)``; ``valid_lens``: ``None``, ``(batch,)`` or
    ``(batch, q_len)``; ``mask``: an optional extra bool mask (``True`` = keep) combined with it.
    Returns weights of the same shape and dtype (computed in at least float32); masked entries
    are exactly 0 and a fully masked row is all zeros (see the module docstring).
    """
    scores = jnp.asarray(scores)
    m = attention_mask(tuple(scores.shape), mask=mask, valid_lens=valid_lens)
    return _softmax_where(scores, m).astype(scores.dtype)


def check_dropout(name: str, rate: float) -> float:
    """Validate an attention dropout rate (``0 <= rate < 1``)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: dropout rate must be in [0, 1), got {rate!r}")
    return float(rate)


def _dropout(x, rate, key, train, name):
    if not train or rate == 0.0:
        return x
    require_key(name, key)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    key=None,
    train: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention ``softmax(q k^T * scale, masked) v``, a pure function.

    Shapes: ``q (..., q_len, d)``, ``k (..., k_len, d)``, ``v (..., k_len, d_v)``; ``mask`` bool
    broadcastable to ``(..., q_len, k_len)`` (``True`` = attend; build it with
    :func:`attention_mask`); ``scale`` defaults to ``1 / sqrt(d)``. Returns
    ``(out (..., q_len, d_v), weights (..., q_len, k_len))``; ``weights`` are before dropout
    (for heat maps; computed in at least float32, returned in ``q``'s dtype). Dropout on the
    weights applies only when ``train`` and ``dropout_rate > 0`` (then ``key`` is required).
    """
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ShapeError("dot_product_attention",
                         f"expected q, k, v of rank >= 2, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ShapeError("dot_product_attention",
                         f"q and k need the same feature size, got {q.shape} and {k.shape}")
    if k.shape[-2] != v.shape[-2]:
        raise ShapeError("dot_product_attention",
                         f"k and v need the same length, got {k.shape} and {v.shape}")
    check_dropout("dot_product_attention", dropout_rate)
    if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
        raise TypeError(f"dot_product_attention: mask must be boolean, got "
                        f"{jnp.asarray(mask).dtype}; build one with attention_mask(...)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = jnp.einsum("...qd,...kd->...qk", q * jnp.asarray(scale, q.dtype), k)
    weights = _softmax_where(scores, mask)
    w = _dropout(weights, dropout_rate, key, train, "dot_product_attention")
    out = jnp.einsum("...qk,...kv->...qv", w.astype(v.dtype), v)
    return out, weights.astype(q.dtype)


# ----------------------------------------------------------------------------- additive


def additive_attention_apply(
    params: dict[str, jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    key=None,
    train: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Bahdanau attention ``softmax(w_v . tanh(q W_q + k W_k)) v`` as a pure function.

    ``params = {"w_q": (d_q, h), "w_k": (d_k, h), "w_v": (h,)}``; ``q (B, Q, d_q)``,
    ``k (B, K, d_k)``, ``v (B, K, d_v)``, ``mask`` bool broadcastable to ``(B, Q, K)``.
    Returns ``(out (B, Q, d_v), weights (B, Q, K))`` (weights before dropout).
    """
    qh = q @ params["w_q"]  # (B, Q, h)
    kh = k @ params["w_k"]  # (B, K, h)
    feats = jnp.tanh(qh[..., :, None, :] + kh[..., None, :, :])  # (B, Q, K, h)
    scores = feats @ params["w_v"]  # (B, Q, K)
    weights = _softmax_where(scores, mask)
    w = _dropout(weights, dropout_rate, key, train, "additive_attention")
    return jnp.einsum("...qk,...kv->...qv", w.astype(v.dtype), v), weights


def unpack_qkv(name: str, x) -> tuple[Any, Any, Any]:
    """Split an attention layer's input ``(queries, keys, values)``; refuse anything else (in
    particular the old 4-tuple with lengths or a mask: those are keyword arguments now)."""
    if isinstance(x, (tuple, list)) and len(x) == 4:
        raise ShapeError(
            name,
            "got a 4-tuple; attention takes (queries, keys, values) and the masking as keyword "
            "arguments: apply(params, state, (q, k, v), valid_lens=...) or mask=...",
        )
    if not isinstance(x, (tuple, list)) or len(x) != 3:
        raise ShapeError(name, f"expected input (queries, keys, values), got {type(x).__name__}")
    return x[0], x[1], x[2]


def additive_attention(num_hiddens: int, *, dropout: float = 0.0,
                       w_init: inits.Initializer | None = None) -> Layer:
    """Additive (Bahdanau) attention as a layer.

    Input ``x = (queries (B, Q, d_q), keys (B, K, d_k), values (B, K, d_v))``; ``init`` takes
    the matching tuple of shapes. ``apply(params, state, x, *, mask=None, valid_lens=None, key,
    train)`` with ``valid_lens`` ``(B,)`` or ``(B, Q)`` and/or a bool ``mask`` broadcastable to
    ``(B, Q, K)``. Output ``(context (B, Q, d_v), weights (B, Q, K))``.
    Params ``{"w_q": (d_q, h), "w_k": (d_k, h), "w_v": (h,)}`` (no biases, as d2l).
    Dropout (rate ``dropout``) acts on the attention weights in training.
    """
    check_positive_int("additive_attention", "num_hiddens", num_hiddens)
    dropout = check_dropout("additive_attention", dropout)
    w_init = w_init or inits.kaiming_uniform("fan_in", gain=1.0 / math.sqrt(3.0))

    def init(key, in_shape):
        qs, ks, vs = unpack_qkv("additive_attention", in_shape)
        if len(qs) != 3 or len(ks) != 3 or len(vs) != 3:
            raise ShapeError("additive_attention",
                             f"expected (B, Q, d_q), (B, K, d_k), (B, K, d_v), got {qs}, {ks}, "
                             f"{vs}")
        if ks[:2] != vs[:2] or qs[0] != ks[0]:
            raise ShapeError("additive_attention",
                             f"batch/key lengths disagree: {qs}, {ks}, {vs}")
        k1, k2, k3 = jax.random.split(key, 3)
        params = {
            "w_q": w_init(k1, (qs[-1], num_hiddens)),
            "w_k": w_init(k2, (ks[-1], num_hiddens)),
            "w_v": w_init(k3, (num_hiddens, 1)).reshape(num_hiddens),
        }
        return ((qs[0], qs[1], vs[-1]), (qs[0], qs[1], ks[1])), params, {}

    def apply(params, state, x, *, key=None, train=False, mask=None, valid_lens=None):
        q, k, v = unpack_qkv("additive_attention", x)
        if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
            raise ShapeError("additive_attention",
                             f"expected rank-3 q, k, v, got {q.shape}, {k.shape}, {v.shape}")
        if q.shape[-1] != params["w_q"].shape[0] or k.shape[-1] != params["w_k"].shape[0]:
            raise ShapeError("additive_attention",
                             f"expected q (..., {params['w_q'].shape[0]}) and k (..., "
                             f"{params['w_k'].shape[0]}), got {q.shape}, {k.shape}")
        if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
            raise ShapeError("additive_attention",
                             f"batch/key lengths disagree: {q.shape}, {k.shape}, {v.shape}")
        m = attention_mask((q.shape[0], q.shape[1], k.shape[1]), mask=mask,
                           valid_lens=valid_lens)
        out = additive_attention_apply(params, q, k, v, mask=m, dropout_rate=dropout, key=key,
                                       train=train)
        return out, state

    return Layer(init, apply, name="additive_attention",
                 config={"num_hiddens": num_hiddens, "dropout": dropout})
