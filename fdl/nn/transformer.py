"""Transformer blocks: positional encodings, the position-wise FFN, encoder and decoder blocks.

Blocks are layers over ``(B, T, d)`` activations. ``norm_first=False`` is the post-LN
"AddNorm" of the original transformer, d2l and BERT: ``x = norm(x + dropout(sublayer(x)))``;
``norm_first=True`` the pre-LN form ``x = x + dropout(sublayer(norm(x)))`` (a stack of pre-LN
blocks needs a final LayerNorm, which the models add). Blocks return ``(y, weights)``: the
attention weights (before dropout) for heat maps; XLA removes them when unused.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fdl.nn import initializers as inits
from fdl.nn.activation import activation as activation_layer
from fdl.nn.activation import gelu_fn, relu_fn
from fdl.nn.attention import check_dropout
from fdl.nn.core import (
    Layer,
    ShapeError,
    apply_child,
    check_positive_int,
    child_key,
    init_child,
    require_key,
    serial,
)
from fdl.nn.linear import dense
from fdl.nn.multi_head import multi_head_attention, self_attention
from fdl.nn.norm import layer_norm
from fdl.nn.wrappers import remat as remat_layer

__all__ = [
    "sinusoidal_positions",
    "positional_encoding",
    "position_wise_ffn",
    "encoder_block",
    "decoder_block",
    "block_stack",
    "ACTIVATIONS",
]

ACTIVATIONS = {
    "relu": relu_fn,
    "gelu": lambda x: gelu_fn(x, approximate=False),  # BERT / HF "gelu" (erf form)
    "gelu_tanh": lambda x: gelu_fn(x, approximate=True),
}


def sinusoidal_positions(max_len: int, num_hiddens: int) -> np.ndarray:
    """d2l's table ``P (max_len, d)``: ``P[i, 2j] = sin(i / 10000^(2j/d))``,
    ``P[i, 2j+1] = cos(i / 10000^(2j/d))`` (float32 numpy)."""
    check_positive_int("sinusoidal_positions", "max_len", max_len)
    check_positive_int("sinusoidal_positions", "num_hiddens", num_hiddens)
    pos = np.arange(max_len, dtype=np.float32)[:, None]
    div = np.power(10000.0, np.arange(0, num_hiddens, 2, dtype=np.float32) / num_hiddens)
    p = np.zeros((max_len, num_hiddens), np.float32)
    p[:, 0::2] = np.sin(pos / div)
    p[:, 1::2] = np.cos(pos / div)[:, : num_hiddens // 2]
    return p


def _dropout(x, rate, key, train, name):
    if not train or rate == 0.0:
        return x
    require_key(name, key)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def positional_encoding(max_len: int, *, kind: str = "sinusoidal", dropout: float = 0.0,
                        w_init: inits.Initializer | None = None) -> Layer:
    """Add position information: ``x (B, T, d) -> dropout(x + P[offset : offset + T])``.

    ``kind="sinusoidal"`` (fixed table, no params) or ``"learned"`` (params ``{"table":
    (max_len, d)}``, ``w_init`` default ``normal(0.02)``). ``apply(..., offset=None)``: the
    position of ``x[:, 0]`` per row (``(B,)`` int, cached decoding); default 0.
    ``T > max_len`` is refused (a ``ShapeError`` naming both); with an ``offset`` under ``jit``
    the end position cannot be checked (the lookup clamps), so size ``max_len`` for decoding.
    """
    check_positive_int("positional_encoding", "max_len", max_len)
    if kind not in ("sinusoidal", "learned"):
        raise ValueError(f"positional_encoding: kind must be 'sinusoidal' or 'learned', got "
                         f"{kind!r}")
    dropout = check_dropout("positional_encoding", dropout)
    w_init = w_init or inits.normal(0.02)

    def init(key, in_shape):
        if len(in_shape) != 3:
            raise ShapeError("positional_encoding", f"expected input (B, T, d), got {in_shape}")
        if in_shape[1] > max_len:
            raise ShapeError("positional_encoding", f"sequence length {in_shape[1]} exceeds "
                             f"max_len {max_len}")
        params = {"table": w_init(key, (max_len, in_shape[-1]))} if kind == "learned" else {}
        return tuple(in_shape), params, {}

    def apply(params, state, x, *, key=None, train=False, offset=None):
        b, t, d = x.shape
        if t > max_len:
            raise ShapeError("positional_encoding",
                             f"sequence length {t} exceeds max_len {max_len}")
        table = params["table"] if kind == "learned" else jnp.asarray(
            sinusoidal_positions(max_len, d))
        if table.shape[-1] != d:
            raise ShapeError("positional_encoding", f"expected (B, T, {table.shape[-1]}), got "
                             f"{x.shape}")
        if offset is None:
            p = table[None, :t]
        else:
            if not isinstance(offset, jax.core.Tracer) and int(np.max(offset)) + t > max_len:
                raise ValueError(f"positional_encoding: positions up to "
                                 f"{int(np.max(offset)) + t} exceed max_len {max_len}")
            p = jnp.take(table, jnp.asarray(offset)[:, None] + jnp.arange(t), axis=0,
                         mode="clip")
        return _dropout(x + p.astype(x.dtype), dropout, key, train, "positional_encoding"), state

    return Layer(init, apply, name=f"positional_encoding[{kind}]",
                 config={"max_len": max_len, "kind": kind, "dropout": dropout})


def position_wise_ffn(ffn_hiddens: int, num_outputs: int, *, activation: str = "relu"
                      ) -> Layer:
    """``dense2(act(dense1(x)))`` on the last axis: ``(B, T, d) -> (B, T, num_outputs)``.
    Params ``{"dense1": (d, ffn_hiddens), "dense2": (ffn_hiddens, num_outputs)}``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"position_wise_ffn: activation must be one of {sorted(ACTIVATIONS)}, "
                         f"got {activation!r}")
    act = ACTIVATIONS[activation]
    return serial(("dense1", dense(ffn_hiddens)), ("act", activation_layer(act, activation)),
                  ("dense2", dense(num_outputs)))


def _check_block(name, num_heads, num_hiddens, ffn_hiddens, dropout):
    check_positive_int(name, "ffn_hiddens", ffn_hiddens)
    check_positive_int(name, "num_heads", num_heads)
    check_positive_int(name, "num_hiddens", num_hiddens)
    if num_hiddens % num_heads:
        raise ValueError(f"{name}: num_hiddens ({num_hiddens}) must be divisible by num_heads "
                         f"({num_heads})")
    return check_dropout(name, dropout)


class _Sub:
    """Run a residual sub-layer in post-LN or pre-LN form inside a block's apply."""

    def __init__(self, params, state, key, train, dropout, norm_first, name):
        self.params, self.state, self.key, self.train = params, state, key, train
        self.dropout, self.norm_first, self.name = dropout, norm_first, name
        self.new_state = dict(state)

    def __call__(self, i, sub_name, sub, norm_name, norm, x, inputs, **kw):
        """``inputs(h)`` builds the sub-layer's input from the (normalised) ``h``."""
        k = child_key(self.key, i)
        h = x
        if self.norm_first:
            h, _ = apply_child(norm_name, norm, self.params.get(norm_name, {}), {}, x)
        (y, w), s = apply_child(sub_name, sub, self.params[sub_name],
                                self.state.get(sub_name, {}), inputs(h),
                                key=child_key(k, 0), train=self.train, **kw)
        if s:
            self.new_state[sub_name] = s
        y = x + _dropout(y, self.dropout, child_key(k, 1), self.train, self.name)
        if not self.norm_first:
            y, _ = apply_child(norm_name, norm, self.params.get(norm_name, {}), {}, y)
        return y, w

    def ffn(self, i, ffn, norm_name, norm, x):
        k = child_key(self.key, i)
        h = x
        if self.norm_first:
            h, _ = apply_child(norm_name, norm, self.params.get(norm_name, {}), {}, x)
        y, _ = apply_child("ffn", ffn, self.params["ffn"], {}, h)
        y = x + _dropout(y, self.dropout, child_key(k, 1), self.train, self.name)
        if not self.norm_first:
            y, _ = apply_child(norm_name, norm, self.params.get(norm_name, {}), {}, y)
        return y


def _init_children(children, key, shapes):
    params = {}
    for i, (name, layer) in enumerate(children):
        _, p, _ = init_child(name, layer, child_key(key, i), shapes[name])
        if p:
            params[name] = p
    return params


def encoder_block(num_heads: int, num_hiddens: int, ffn_hiddens: int, *, dropout: float = 0.0,
                  norm_first: bool = False, activation: str = "relu", use_bias: bool = True,
                  eps: float = 1e-5) -> Layer:
    """A transformer encoder block (d2l's ``TransformerEncoderBlock``; BERT's layer).

    ``x (B, T, d) -> (y (B, T, d), weights (B, heads, T, T))``; ``apply(..., valid_lens=None,
    mask=None)`` masks keys (padding). Params ``{"attention": {"qkv", "out"}, "norm1", "ffn":
    {"dense1", "dense2"}, "norm2"}``. ``dropout`` acts on the attention weights and on each
    sub-layer's output before the residual sum. ``d`` must equal ``num_hiddens``.
    """
    dropout = _check_block("encoder_block", num_heads, num_hiddens, ffn_hiddens, dropout)
    children = (
        ("attention", self_attention(num_heads, num_hiddens, dropout=dropout,
                                     use_bias=use_bias)),
        ("norm1", layer_norm(eps=eps)),
        ("ffn", position_wise_ffn(ffn_hiddens, num_hiddens, activation=activation)),
        ("norm2", layer_norm(eps=eps)),
    )
    kids = dict(children)

    def init(key, in_shape):
        if len(in_shape) != 3 or in_shape[-1] != num_hiddens:
            raise ShapeError("encoder_block", f"expected input (B, T, {num_hiddens}), got "
                             f"{tuple(in_shape)}")
        s = tuple(in_shape)
        params = _init_children(children, key, {n: s for n, _ in children})
        b, t = s[:2]
        return (s, (b, num_heads, t, t)), params, {}

    def apply(params, state, x, *, key=None, train=False, valid_lens=None, mask=None):
        if x.ndim != 3 or x.shape[-1] != num_hiddens:
            raise ShapeError("encoder_block", f"expected input (B, T, {num_hiddens}), got "
                             f"{x.shape}")
        sub = _Sub(params, state, key, train, dropout, norm_first, "encoder_block")
        x, w = sub(0, "attention", kids["attention"], "norm1", kids["norm1"], x, lambda h: h,
                   valid_lens=valid_lens, mask=mask)
        x = sub.ffn(1, kids["ffn"], "norm2", kids["norm2"], x)
        return (x, w), sub.new_state

    return Layer(init, apply, name="encoder_block", children=children,
                 config={"num_heads": num_heads, "num_hiddens": num_hiddens,
                         "ffn_hiddens": ffn_hiddens, "dropout": dropout,
                         "norm_first": norm_first, "activation": activation})


def decoder_block(num_heads: int, num_hiddens: int, ffn_hiddens: int, *, dropout: float = 0.0,
                  norm_first: bool = False, activation: str = "relu", use_bias: bool = True,
                  cross_attention: bool = True, eps: float = 1e-5) -> Layer:
    """A transformer decoder block: causal self-attention, cross-attention to an encoder's
    ``memory`` (unless ``cross_attention=False``: a decoder-only / GPT block), the FFN.

    ``x (B, T, d) -> (y (B, T, d), (self_weights (B, heads, T, K), cross_weights (B, heads, T,
    S) or None))``; ``apply(..., memory=None (B, S, d), memory_valid_lens=None (B,))``.
    State: empty (the full causal pass over ``x``) or, for incremental decoding,
    ``{"self_attention": KV cache, "cross_attention": projected memory}`` (see
    :mod:`fdl.nn.multi_head`; ``memory`` is then not needed). Params ``{"self_attention",
    "norm1", "cross_attention", "norm2", "ffn", "norm3"}``.
    """
    dropout = _check_block("decoder_block", num_heads, num_hiddens, ffn_hiddens, dropout)
    children = [
        ("self_attention", self_attention(num_heads, num_hiddens, causal=True, dropout=dropout,
                                          use_bias=use_bias)),
        ("norm1", layer_norm(eps=eps)),
    ]
    if cross_attention:
        children += [
            ("cross_attention", multi_head_attention(num_heads, num_hiddens, dropout=dropout,
                                                     use_bias=use_bias)),
            ("norm2", layer_norm(eps=eps)),
        ]
    children += [("ffn", position_wise_ffn(ffn_hiddens, num_hiddens, activation=activation)),
                 ("norm3", layer_norm(eps=eps))]
    children = tuple(children)
    kids = dict(children)

    def init(key, in_shape):
        if len(in_shape) != 3 or in_shape[-1] != num_hiddens:
            raise ShapeError("decoder_block", f"expected input (B, T, {num_hiddens}), got "
                             f"{tuple(in_shape)}")
        s = tuple(in_shape)
        shapes = {n: s for n, _ in children}
        shapes["cross_attention"] = (s, s, s)
        params = _init_children(children, key, shapes)
        return (s, None), params, {}

    def apply(params, state, x, *, key=None, train=False, memory=None, memory_valid_lens=None):
        if x.ndim != 3 or x.shape[-1] != num_hiddens:
            raise ShapeError("decoder_block", f"expected input (B, T, {num_hiddens}), got "
                             f"{x.shape}")
        sub = _Sub(params, state, key, train, dropout, norm_first, "decoder_block")
        x, w_self = sub(0, "self_attention", kids["self_attention"], "norm1", kids["norm1"], x,
                        lambda h: h)
        w_cross = None
        if cross_attention:
            if memory is None and "cross_attention" not in state:
                raise ValueError("decoder_block: cross-attention needs the encoder's memory= "
                                 "(or projected memory in the state); got neither")
            x, w_cross = sub(1, "cross_attention", kids["cross_attention"], "norm2",
                             kids["norm2"], x, lambda h: (h, memory, memory),
                             valid_lens=memory_valid_lens)
        x = sub.ffn(2, kids["ffn"], "norm3", kids["norm3"], x)
        return (x, (w_self, w_cross)), sub.new_state

    return Layer(init, apply, name="decoder_block", children=children,
                 config={"num_heads": num_heads, "num_hiddens": num_hiddens,
                         "ffn_hiddens": ffn_hiddens, "dropout": dropout,
                         "norm_first": norm_first, "activation": activation,
                         "cross_attention": cross_attention})



def block_stack(block: Layer, num_layers: int, *, scan: bool = False,
                remat: bool | str | Callable = False) -> Layer:
    """``num_layers`` copies of ``block`` applied in sequence (each with its own params).

    ``block`` maps ``x -> ((y, weights), state)`` like :func:`encoder_block`. Params
    ``{"0": ..., "1": ..., ...}``; with ``scan=True`` one tree whose leaves are stacked along a
    leading ``num_layers`` axis, applied by ``lax.scan`` (one compiled body for all layers:
    faster compiles for deep stacks; the full-sequence pass only, a KV cache runs the layers
    in a Python loop). ``remat`` wraps each layer in :func:`fdl.nn.remat` (``jax.checkpoint``:
    activations recomputed in the backward pass instead of stored): ``True`` saves nothing but
    each layer's input; a policy name (``"dots_saveable"``, ...,
    ``fdl.nn.wrappers.REMAT_POLICIES``) or a ``jax.checkpoint_policies`` function chooses what
    may be kept. ``apply(..., collect_weights=False, **masks)`` returns
    ``((y, weights), state)``: ``weights`` is a tuple with every layer's
    attention weights when ``collect_weights``, else ``None``. State (caches): ``{"0": ...}``.
    """
    check_positive_int("block_stack", "num_layers", num_layers)
    if remat is not False and remat is not None:
        # inside lax.scan the CSE that prevent_cse guards against cannot happen (JAX's advice)
        block_run = remat_layer(block, policy=None if remat is True else remat,
                                prevent_cse=not scan)
    else:
        block_run = block
    names = [str(i) for i in range(num_layers)]
    children = tuple((n, block) for n in names)

    def init(key, in_shape):
        params = {}
        out = None
        for i, n in enumerate(names):
            (out, _), p, _ = init_child(n, block, child_key(key, i), in_shape)
            params[n] = p
        if scan:
            params = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[params[n] for n in names])
        return out, params, {}

    def layer_fn(i, p, s, train, key, kw):
        def run(p, h):
            return apply_child(names[i] if isinstance(i, int) else "blocks", block_run, p, s, h,
                               key=key, train=train, **kw)

        return run

    def apply(params, state, x, *, key=None, train=False, collect_weights=False, **kw):
        if scan and not state:
            def body(h, inp):
                p, i = inp
                k = None if key is None else jax.random.fold_in(key, i)
                (h, w), _ = layer_fn(None, p, {}, train, k, kw)(p, h)
                return h, (w if collect_weights else None)

            h, ws = jax.lax.scan(body, x, (params, jnp.arange(num_layers)))
            weights = None
            if collect_weights:
                weights = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], ws)
                                for i in range(num_layers))
            return (h, weights), state
        new_state, ws, h = dict(state), [], x
        for i, n in enumerate(names):
            p = (jax.tree_util.tree_map(lambda a, i=i: a[i], params) if scan else params[n])
            (h, w), s = layer_fn(i, p, state.get(n, {}), train, child_key(key, i), kw)(p, h)
            if s:
                new_state[n] = s
            ws.append(w)
        return (h, tuple(ws) if collect_weights else None), new_state

    return Layer(init, apply, name="block_stack", children=children,
                 config={"num_layers": num_layers, "scan": scan,
                         "remat": remat if isinstance(remat, (bool, str)) or remat is None
                         else getattr(remat, "__name__", "policy")})
