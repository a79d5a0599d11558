"""Multi-head attention layers on the :mod:`fdl.nn.attention` core, and the KV cache.

- :func:`multi_head_attention`: general ``(queries, keys, values)`` attention (d2l's
  ``MultiHeadAttention``; separate Q/K/V/O projections; cross-attention).
- :func:`self_attention`: ``x -> attention(x, x, x)`` with one **fused QKV projection** (one
  ``(d_in, 3 * num_hiddens)`` matmul instead of three), optionally causal, and an optional
  **KV cache in the layer state** for incremental decoding.

Both take the masking as keyword arguments (``mask=`` bool, ``True`` = may attend, broadcastable
to ``(B, heads, Q, K)``; ``valid_lens=`` ``(B,)`` or ``(B, Q)``) and return
``((out (B, Q, num_hiddens), weights (B, heads, Q, K)), state)``: the weights are the attention
probabilities before dropout, for heat maps (XLA drops them when unused).

**KV cache.** ``self_attention``'s state is empty after ``init``: ``apply`` then attends over the
``T`` positions of ``x`` (the training / full-sequence pass). With a cache in the state
(:func:`init_kv_cache`: ``{"k", "v": (B, max_len, heads, head_dim), "index": (B,) int32}``)
``apply`` treats ``x`` as the next ``T`` positions ``index .. index + T - 1`` of every row: it
writes their keys and values at ``index``, attends over the cache (causally when the layer is
causal), and returns the state with ``index + T``. Feeding a sequence in pieces therefore equals
the full pass (tested). Every leaf has the row axis first, so beam search can reorder rows.
Writing past ``max_len`` is refused eagerly; under ``jit`` it cannot be checked (the write
would be clamped), so size ``max_len`` for the longest output.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdl.nn import heads_matmul
from fdl.nn import initializers as inits
from fdl.nn.attention import (
    _dropout,
    _softmax_where,
    attention_mask,
    check_dropout,
    combine_masks,
    unpack_qkv,
)
from fdl.nn.core import Layer, ShapeError, check_positive_int
from fdl.nn.matmul import matmul

__all__ = [
    "multi_head_attention",
    "self_attention",
    "init_kv_cache",
    "project_kv",
    "heads_attention",
]


def _check_heads(name: str, num_heads: int, num_hiddens: int) -> None:
    check_positive_int(name, "num_heads", num_heads)
    check_positive_int(name, "num_hiddens", num_hiddens)
    if num_hiddens % num_heads:
        raise ValueError(f"{name}: num_hiddens ({num_hiddens}) must be divisible by num_heads "
                         f"({num_heads}); e.g. num_heads in "
                         f"{[h for h in range(1, num_hiddens + 1) if num_hiddens % h == 0][:8]}")


def heads_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array | None, *,
                    dropout_rate: float = 0.0, key=None, train: bool = False,
                    name: str = "attention") -> tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention on head-split arrays ``(B, T, heads, head_dim)``.

    ``mask`` bool broadcastable to ``(B, heads, Q, K)``. Returns ``(out (B, Q, heads, d_v),
    weights (B, heads, Q, K))``. The same arithmetic as
    :func:`~fdl.nn.attention.dot_product_attention` without transposing to heads-first.
    """
    scale = jnp.asarray(1.0 / math.sqrt(qh.shape[-1]), qh.dtype)
    s = heads_matmul.scores(qh * scale, kh)
    weights = _softmax_where(s, mask)
    w = _dropout(weights, dropout_rate, key, train, name)
    out = heads_matmul.apply_weights(w.astype(vh.dtype), vh)
    return out, weights


def _proj(p, x):
    y = matmul(x, p["w"])
    return y + p["b"] if "b" in p else y


def _dense_params(key, d_in, d_out, w_init, use_bias):
    p = {"w": w_init(key, (d_in, d_out))}
    if use_bias:
        p["b"] = jnp.zeros((d_out,), jnp.float32)
    return p


def init_kv_cache(batch: int, max_len: int, num_heads: int, head_dim: int,
                  dtype=jnp.float32) -> dict[str, jax.Array]:
    """An empty KV cache: ``{"k", "v": (batch, max_len, num_heads, head_dim), "index":
    (batch,) int32 zeros}`` (see the module docstring)."""
    for n, v in (("batch", batch), ("max_len", max_len), ("num_heads", num_heads),
                 ("head_dim", head_dim)):
        check_positive_int("init_kv_cache", n, v)
    z = jnp.zeros((batch, max_len, num_heads, head_dim), dtype)
    return {"k": z, "v": z, "index": jnp.zeros((batch,), jnp.int32)}


def _write(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Write ``new (B, T, ...)`` into ``cache (B, L, ...)`` at per-row offsets ``index (B,)``."""
    new = new.astype(cache.dtype)
    if new.shape[1] == 1:  # one position: an elementwise select (no scatter)
        hit = jnp.arange(cache.shape[1])[None, :] == index[:, None]
        return jnp.where(hit.reshape(hit.shape + (1,) * (cache.ndim - 2)), new, cache)
    return jax.vmap(lambda c, u, i: lax.dynamic_update_slice_in_dim(c, u, i, axis=0))(
        cache, new, index)


def _check_room(name: str, index, t: int, max_len: int) -> None:
    if isinstance(index, jax.core.Tracer):
        return
    hi = int(np.max(np.asarray(index))) + t
    if hi > max_len:
        raise ValueError(f"{name}: the KV cache holds {max_len} positions; writing {t} more at "
                         f"index {hi - t} needs {hi}. Build the cache with a larger max_len")


def self_attention(num_heads: int, num_hiddens: int, *, causal: bool = False,
                   dropout: float = 0.0, use_bias: bool = True,
                   w_init: inits.Initializer | None = None) -> Layer:
    """Multi-head self-attention with a fused QKV projection and an optional KV cache.

    Input ``x (B, T, d_in)``; ``apply(params, state, x, *, mask=None, valid_lens=None, key,
    train)``. Output ``(out (B, T, num_hiddens), weights (B, heads, T, K))`` with ``K = T``
    (no cache) or the cache's ``max_len``. ``causal=True``: position ``i`` attends to positions
    ``<= i`` only. Params ``{"qkv": {"w": (d_in, 3 * num_hiddens), "b"}, "out": {"w":
    (num_hiddens, num_hiddens), "b"}}`` (biases with ``use_bias``); the QKV columns are
    ``[queries | keys | values]``, each ``heads x head_dim``. State: empty, or a KV cache from
    :func:`init_kv_cache` (module docstring). ``dropout`` acts on the attention weights.
    """
    _check_heads("self_attention", num_heads, num_hiddens)
    dropout = check_dropout("self_attention", dropout)
    w_init = w_init or inits.kaiming_uniform("fan_in", gain=1.0 / math.sqrt(3.0))
    head_dim = num_hiddens // num_heads

    def init(key, in_shape):
        if len(in_shape) != 3:
            raise ShapeError("self_attention", f"expected input (B, T, d), got {in_shape}")
        k1, k2 = jax.random.split(key)
        params = {"qkv": _dense_params(k1, in_shape[-1], 3 * num_hiddens, w_init, use_bias),
                  "out": _dense_params(k2, num_hiddens, num_hiddens, w_init, use_bias)}
        b, t = in_shape[:2]
        return ((b, t, num_hiddens), (b, num_heads, t, t)), params, {}

    def apply(params, state, x, *, key=None, train=False, mask=None, valid_lens=None):
        d_in = params["qkv"]["w"].shape[0]
        if x.ndim != 3 or x.shape[-1] != d_in:
            raise ShapeError("self_attention", f"expected input (B, T, {d_in}), got {x.shape}")
        b, t, _ = x.shape
        qkv = _proj(params["qkv"], x).reshape(b, t, 3, num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        new_state = state
        if state and "k" in state:
            index = state["index"]
            max_len = state["k"].shape[1]
            _check_room("self_attention", index, t, max_len)
            k = _write(state["k"], k, index)
            v = _write(state["v"], v, index)
            new_state = {"k": k, "v": v, "index": index + t}
            pos = jnp.arange(max_len)[None, None, :]
            written = pos < (index + t)[:, None, None]  # (B, 1, L)
            if causal:
                written = pos <= (index[:, None] + jnp.arange(t))[:, :, None]  # (B, T, L)
            m = combine_masks(written[:, None],
                              attention_mask((b, num_heads, t, max_len), mask=mask,
                                             valid_lens=valid_lens))
        else:
            m = attention_mask((b, num_heads, t, t), mask=mask, valid_lens=valid_lens,
                               causal=causal)
        out, w = heads_attention(q, k, v, m, dropout_rate=dropout, key=key, train=train,
                                 name="self_attention")
        return (_proj(params["out"], out.reshape(b, t, num_hiddens)), w), new_state

    return Layer(init, apply, name="self_attention",
                 config={"num_heads": num_heads, "num_hiddens": num_hiddens, "causal": causal,
                         "dropout": dropout, "use_bias": use_bias})


def project_kv(params, keys: jax.Array, values: jax.Array, num_heads: int
               ) -> dict[str, jax.Array]:
    """Keys and values of :func:`multi_head_attention` projected and split into heads once:
    ``{"k": (B, K, heads, head_dim), "v": (B, K, heads, head_dim_v)}``. Put the result in the
    layer's state to reuse it at every decoding step (cross-attention to a fixed memory)."""
    def split(p, t):
        y = _proj(p, t)
        return y.reshape(y.shape[0], y.shape[1], num_heads, -1)

    return {"k": split(params["w_k"], keys), "v": split(params["w_v"], values)}


def multi_head_attention(num_heads: int, num_hiddens: int, *, dropout: float = 0.0,
                         use_bias: bool = False, w_init: inits.Initializer | None = None
                         ) -> Layer:
    """Multi-head scaled dot-product attention (d2l's ``MultiHeadAttention``).

    Input ``x = (queries (B, Q, d_q), keys (B, K, d_k), values (B, K, d_v))``;
    ``apply(params, state, x, *, mask=None, valid_lens=None, key, train)``. Output
    ``(out (B, Q, num_hiddens), weights (B, heads, Q, K))``. Params ``{"w_q", "w_k", "w_v",
    "w_o"}`` each ``{"w": (in, num_hiddens)[, "b"]}``. State: empty, or ``{"k", "v"}`` from
    :func:`project_kv` (keys and values already projected; ``x``'s keys and values are then
    ignored and may be ``None``).
    """
    _check_heads("multi_head_attention", num_heads, num_hiddens)
    dropout = check_dropout("multi_head_attention", dropout)
    w_init = w_init or inits.kaiming_uniform("fan_in", gain=1.0 / math.sqrt(3.0))
    names = ("w_q", "w_k", "w_v", "w_o")

    def init(key, in_shape):
        qs, ks, vs = unpack_qkv("multi_head_attention", in_shape)
        if len(qs) != 3 or len(ks) != 3 or len(vs) != 3 or ks[:2] != vs[:2]:
            raise ShapeError("multi_head_attention",
                             f"expected (B, Q, d_q), (B, K, d_k), (B, K, d_v), got {qs}, {ks}, "
                             f"{vs}")
        ins = (qs[-1], ks[-1], vs[-1], num_hiddens)
        params = {n: _dense_params(jax.random.fold_in(key, i), d_in, num_hiddens, w_init,
                                   use_bias)
                  for i, (n, d_in) in enumerate(zip(names, ins, strict=True))}
        return ((qs[0], qs[1], num_hiddens), (qs[0], num_heads, qs[1], ks[1])), params, {}

    def apply(params, state, x, *, key=None, train=False, mask=None, valid_lens=None):
        q, k, v = unpack_qkv("multi_head_attention", x)
        cached = bool(state) and "k" in state
        check = ((("w_q", q),) if cached else (("w_q", q), ("w_k", k), ("w_v", v)))
        for n, t in check:
            if t is None or t.ndim != 3 or t.shape[-1] != params[n]["w"].shape[0]:
                raise ShapeError("multi_head_attention",
                                 f"{n[-1]} must be (B, T, {params[n]['w'].shape[0]}), got "
                                 f"{None if t is None else t.shape}")
        kv = state if cached else project_kv(params, k, v, num_heads)
        b, q_len = q.shape[:2]
        k_len = kv["k"].shape[1]
        qh = _proj(params["w_q"], q).reshape(b, q_len, num_heads, -1)
        m = attention_mask((b, num_heads, q_len, k_len), mask=mask, valid_lens=valid_lens)
        out, w = heads_attention(qh, kv["k"], kv["v"], m, dropout_rate=dropout, key=key,
                                 train=train, name="multi_head_attention")
        return (_proj(params["w_o"], out.reshape(b, q_len, -1)), w), state

    return Layer(init, apply, name="multi_head_attention",
                 config={"num_heads": num_heads, "num_hiddens": num_hiddens,
                         "dropout": dropout, "use_bias": use_bias})
