"""The attention core: masks, masked softmax, scaled dot-product and additive attention.

Masks are boolean arrays, ``True`` where a query *may* attend to a key, broadcastable to the
score shape ``(..., q_len, k_len)``. Helpers build them from ``valid_lens``
(:func:`padding_mask`), for autoregressive decoding (:func:`causal_mask`) and combine them
(:func:`combine_masks`).

Masked scores are filled with ``jnp.finfo(dtype).min`` (not a fixed ``-1e6``, which is no mask at
all in float16 and too weak for large scores), and masked positions get weight **exactly 0**
after the softmax.

**Fully masked rows** (a query that may attend to no key, e.g. ``valid_lens == 0``): every weight in
the row is 0 and the attention output for that query is the zero vector; gradients are finite
(zero). This differs from d2l's ``masked_softmax``, which gives such a row uniform weights over
all (padding) keys; for ``valid_lens >= 1`` the two agree.
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
    "masked_softmax",
    "dot_product_attention",
    "additive_attention",
    "additive_attention_apply",
    "multi_head_attention",
]


def mask_fill_value(dtype) -> Any:
    """The score given to masked positions before the softmax: ``finfo(dtype).min``."""
    return jnp.finfo(jnp.dtype(dtype)).min


def padding_mask(valid_lens: jax.Array, max_len: int) -> jax.Array:
    """``mask[..., j] = j < valid_lens[...]``: shape ``valid_lens.shape + (max_len,)``, bool."""
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
    """
    if valid_lens is None:
        return None
    valid_lens = jnp.asarray(valid_lens)
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


def _softmax_where(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
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
    Returns weights of the same shape; masked entries are exactly 0 and a fully masked row is
    all zeros (see the module docstring).
    """
    scores = jnp.asarray(scores)
    if valid_lens is not None:
        m = valid_lens_mask(valid_lens, tuple(scores.shape))
    else:
        m = None
    return _softmax_where(scores, combine_masks(m, mask))


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    key=None,
    train: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(d) + mask) v``.

    Shapes: ``q (..., q_len, d)``, ``k (..., k_len, d)``, ``v (..., k_len, d_v)``, ``mask``
    bool broadcastable to ``(..., q_len, k_len)`` (``True`` = attend). Returns
    ``(out (..., q_len, d_v), weights (..., q_len, k_len))``; ``weights`` are before dropout
    (for plotting). Dropout on the weights is applied only when ``train`` and
    ``dropout_rate > 0`` (then ``key`` is required).
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
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dot_product_attention: dropout_rate must be in [0, 1), got "
                         f"{dropout_rate}")
    d = q.shape[-1]
    scores = jnp.einsum("...qd,...kd->...qk", q, k) / jnp.sqrt(jnp.asarray(d, q.dtype))
    weights = _softmax_where(scores, mask)
    w = _dropout(weights, dropout_rate, key, train, "dot_product_attention")
    out = jnp.einsum("...qk,...kv->...qv", w, v)
    return out, weights


def _dropout(x, rate, key, train, name):
    if not train or rate == 0.0:
        return x
    require_key(name, key)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------- additive


def additive_attention_apply(
    params: dict[str, jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    key=None,
    train: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Bahdanau attention ``softmax(w_v . tanh(q W_q + k W_k)) v`` as a pure function.

    ``params = {"w_q": (d_q, h), "w_k": (d_k, h), "w_v": (h,)}``; ``q (B, Q, d_q)``,
    ``k (B, K, d_k)``, ``v (B, K, d_v)``, ``mask`` broadcastable to ``(B, Q, K)``.
    Returns ``(out (B, Q, d_v), weights (B, Q, K))`` (weights before dropout).
    """
    qh = q @ params["w_q"]  # (B, Q, h)
    kh = k @ params["w_k"]  # (B, K, h)
    feats = jnp.tanh(qh[..., :, None, :] + kh[..., None, :, :])  # (B, Q, K, h)
    scores = feats @ params["w_v"]  # (B, Q, K)
    weights = _softmax_where(scores, mask)
    w = _dropout(weights, dropout_rate, key, train, "additive_attention")
    return jnp.einsum("...qk,...kv->...qv", w, v), weights


def _unpack_qkv(name: str, x) -> tuple[Any, Any, Any, Any]:
    if not isinstance(x, (tuple, list)) or len(x) not in (3, 4):
        raise ShapeError(name, "expected input (queries, keys, values[, valid_lens])")
    q, k, v = x[:3]
    vl = x[3] if len(x) == 4 else None
    return q, k, v, vl


def additive_attention(num_hiddens: int, *, dropout: float = 0.0,
                       w_init: inits.Initializer | None = None) -> Layer:
    """Additive (Bahdanau) attention as a layer.

    Input ``x = (queries (B, Q, d_q), keys (B, K, d_k), values (B, K, d_v)[, valid_lens])`` with
    ``valid_lens`` ``None``, ``(B,)`` or ``(B, Q)``; ``init`` takes the matching tuple of shapes
    (``valid_lens`` shape may be omitted). Output ``(context (B, Q, d_v), weights (B, Q, K))``.
    Params ``{"w_q": (d_q, h), "w_k": (d_k, h), "w_v": (h,)}`` (no biases, as d2l).
    Dropout (rate ``dropout``) acts on the attention weights in training.
    """
    check_positive_int("additive_attention", "num_hiddens", num_hiddens)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"additive_attention: dropout must be in [0, 1), got {dropout}")
    w_init = w_init or inits.kaiming_uniform("fan_in", gain=1.0 / math.sqrt(3.0))

    def init(key, in_shape):
        qs, ks, vs, _ = _unpack_qkv("additive_attention", in_shape)
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

    def apply(params, state, x, *, key=None, train=False):
        q, k, v, vl = _unpack_qkv("additive_attention", x)
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
        mask = valid_lens_mask(vl, (q.shape[0], q.shape[1], k.shape[1]))
        out = additive_attention_apply(params, q, k, v, mask, dropout_rate=dropout, key=key,
                                       train=train)
        return out, state

    return Layer(init, apply, name="additive_attention",
                 config={"num_hiddens": num_hiddens, "dropout": dropout})


# ----------------------------------------------------------------------------- multi-head


def multi_head_attention(num_heads: int, num_hiddens: int, *, dropout: float = 0.0,
                         use_bias: bool = False, w_init: inits.Initializer | None = None
                         ) -> Layer:
    """Multi-head scaled dot-product attention (d2l's ``MultiHeadAttention``).

    Input ``x = (queries (B, Q, d_q), keys (B, K, d_k), values (B, K, d_v)[, mask_or_lens])``
    where the fourth entry is ``None``, ``valid_lens`` (``(B,)`` or ``(B, Q)``, integer) or a
    bool mask broadcastable to ``(B, heads, Q, K)``. Output ``(out (B, Q, num_hiddens),
    weights (B, heads, Q, K))``. Params ``{"w_q", "w_k", "w_v", "w_o"}`` each ``{"w": (in,
    num_hiddens)[, "b"]}``.
    """
    check_positive_int("multi_head_attention", "num_heads", num_heads)
    check_positive_int("multi_head_attention", "num_hiddens", num_hiddens)
    if num_hiddens % num_heads:
        raise ValueError(f"multi_head_attention: num_hiddens ({num_hiddens}) must be divisible "
                         f"by num_heads ({num_heads})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"multi_head_attention: dropout must be in [0, 1), got {dropout}")
    w_init = w_init or inits.kaiming_uniform("fan_in", gain=1.0 / math.sqrt(3.0))
    names = ("w_q", "w_k", "w_v", "w_o")

    def init(key, in_shape):
        qs, ks, vs, _ = _unpack_qkv("multi_head_attention", in_shape)
        if len(qs) != 3 or len(ks) != 3 or len(vs) != 3 or ks[:2] != vs[:2]:
            raise ShapeError("multi_head_attention",
                             f"expected (B, Q, d_q), (B, K, d_k), (B, K, d_v), got {qs}, {ks}, "
                             f"{vs}")
        ins = (qs[-1], ks[-1], vs[-1], num_hiddens)
        params = {}
        for i, (n, d_in) in enumerate(zip(names, ins, strict=True)):
            p = {"w": w_init(jax.random.fold_in(key, i), (d_in, num_hiddens))}
            if use_bias:
                p["b"] = jnp.zeros((num_hiddens,), jnp.float32)
            params[n] = p
        return ((qs[0], qs[1], num_hiddens), (qs[0], num_heads, qs[1], ks[1])), params, {}

    def proj(p, x):
        y = x @ p["w"]
        return y + p["b"] if use_bias else y

    def split(x):  # (B, T, H*d) -> (B, H, T, d)
        b, t, _ = x.shape
        return x.reshape(b, t, num_heads, -1).transpose(0, 2, 1, 3)

    def apply(params, state, x, *, key=None, train=False):
        q, k, v, m = _unpack_qkv("multi_head_attention", x)
        if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
            raise ShapeError("multi_head_attention",
                             f"expected rank-3 q, k, v, got {q.shape}, {k.shape}, {v.shape}")
        for n, t in zip(names[:3], (q, k, v), strict=True):
            if t.shape[-1] != params[n]["w"].shape[0]:
                raise ShapeError("multi_head_attention",
                                 f"{n[-1]} must have {params[n]['w'].shape[0]} features, got "
                                 f"{t.shape}")
        b, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
        if m is not None and not jnp.issubdtype(jnp.asarray(m).dtype, jnp.bool_):
            m = valid_lens_mask(m, (b, num_heads, q_len, k_len))
        qh, kh, vh = (split(proj(params[n], t)) for n, t in zip(names[:3], (q, k, v), strict=True))
        out, w = dot_product_attention(qh, kh, vh, m, dropout_rate=dropout, key=key,
                                       train=train)
        out = out.transpose(0, 2, 1, 3).reshape(b, q_len, num_hiddens)
        return (proj(params["w_o"], out), w), state

    return Layer(init, apply, name="multi_head_attention",
                 config={"num_heads": num_heads, "num_hiddens": num_hiddens,
                         "dropout": dropout, "use_bias": use_bias})
