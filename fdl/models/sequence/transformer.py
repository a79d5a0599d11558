"""The transformer (d2l "The Transformer Architecture"): encoder, decoder with a KV cache in
its state, the encoder–decoder model, and fixed-shape greedy / beam translation.

Every model is a :class:`~fdl.nn.core.Layer`:

- :func:`transformer_encoder`: ``tokens (B, S) -> (B, S, d)``; ``apply(..., valid_lens=None)``.
- :func:`transformer_decoder`: ``tokens (B, T) -> logits (B, T, V)``. Its **state** says what
  to attend to: :func:`decoder_state` (the encoder's ``memory`` and lengths: the teacher-forced
  full pass, state returned unchanged) or :func:`init_decoding` (KV caches, projected memory and
  the position ``index``: every call treats ``tokens`` as the next positions, appends their keys
  and values to the caches and returns the advanced state). Step-by-step decoding equals the
  full pass (tested); with ``cross_attention=False`` it is a decoder-only (GPT-style) LM.
- :func:`transformer`: ``x = (src (B, S), src_valid_lens (B,), tgt_in (B, T)) -> logits
  (B, T, V)``, no persistent state; trains with ``fdl.train.fit`` like any layer.

Params (post-LN, d2l's layout): ``{"embedding": {"table"}, "positional": {} | {"table"},
"blocks": {"0": block, ...} (stacked leaves with scan_layers), ["final_norm"] (pre-LN),
["dense"] (decoder)}``. Embeddings are scaled by ``sqrt(d)`` before the positional encoding
(d2l). Options: ``scan_layers`` (one compiled body for all layers), ``remat`` (``True`` or a
policy name: :func:`fdl.nn.remat` on every layer), ``compute_dtype`` (e.g. ``"bfloat16"``:
params cast on entry, float32 master weights stay in ``params``; softmax and LayerNorm
statistics in float32; logits float32).

``compute_dtype`` vs :func:`fdl.nn.mixed_precision`: for a full pass (training, the BERT heads)
``nn.mixed_precision(model, "bfloat16")`` is the library-wide policy and works on these models
(it also keeps the LayerNorm params float32 and casts every output to float32).
``compute_dtype`` is the model-local form, needed for incremental decoding: the KV caches in
``state`` are made in the compute dtype (``init_decoding``), which ``mixed_precision`` (it
never casts state) cannot do.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdl.models.sequence.decoding import DecodeResult, beam_search_steps, greedy_search_steps
from fdl.nn.core import Layer, ShapeError, apply_child, check_positive_int, child_key, init_child
from fdl.nn.embedding import embedding
from fdl.nn.linear import dense
from fdl.nn.multi_head import init_kv_cache, project_kv
from fdl.nn.norm import layer_norm
from fdl.nn.precision import cast_floating as _cast_floating
from fdl.nn.transformer import block_stack, decoder_block, encoder_block, positional_encoding

__all__ = [
    "transformer_encoder",
    "transformer_decoder",
    "transformer",
    "decoder_state",
    "init_decoding",
    "start_decoding",
    "translate",
    "check_tokens",
    "cast_floating",
    "check_compute_dtype",
    "COMPUTE_DTYPES",
]

#: the compute dtypes the models' ``compute_dtype`` accepts (as :func:`fdl.nn.mixed_precision`)
COMPUTE_DTYPES = ("bfloat16", "float16", "float32", "float64")


def cast_floating(tree, dtype):
    """Cast the floating-point leaves of ``tree`` to ``dtype`` (``None``: unchanged);
    :func:`fdl.nn.precision.cast_floating`."""
    return tree if dtype is None else _cast_floating(tree, dtype)


def check_compute_dtype(where: str, compute_dtype) -> Any:
    """``None`` or the scalar type of ``compute_dtype`` (one of
    :data:`COMPUTE_DTYPES`), else a ``ValueError`` naming the valid values."""
    if compute_dtype is None:
        return None
    try:
        dt = jnp.dtype(compute_dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in COMPUTE_DTYPES:
        raise ValueError(f"{where}: compute_dtype must be None or one of {COMPUTE_DTYPES}, got "
                         f"{compute_dtype!r}")
    return dt.type  # a scalar type (jnp.bfloat16, ...): truthy, unlike a np.dtype


def check_tokens(tokens, vocab_size: int, max_len: int | None = None, name: str = "tokens"
                 ) -> None:
    """Eagerly validate token ids: integers in ``[0, vocab_size)``, length ``<= max_len``.

    Out-of-range gathers under ``jit`` are silent (clamped), so call this on the data (the
    models call it themselves when their inputs are concrete)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    t = np.asarray(tokens)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"{name}: token ids must be integers, got dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}) (the vocabulary "
                         f"size), got values in [{t.min()}, {t.max()}]")
    if max_len is not None and t.ndim >= 2 and t.shape[1] > max_len:
        raise ValueError(f"{name}: sequence length {t.shape[1]} exceeds max_len {max_len}")


def _common(num_hiddens, ffn_hiddens, num_heads, num_layers, name):
    for n, v in (("num_hiddens", num_hiddens), ("ffn_hiddens", ffn_hiddens),
                 ("num_heads", num_heads), ("num_layers", num_layers)):
        check_positive_int(name, n, v)
    if num_hiddens % num_heads:
        raise ValueError(f"{name}: num_hiddens ({num_hiddens}) must be divisible by num_heads "
                         f"({num_heads})")


def _embed(params, kids, tokens, *, d, scale, key, train, offset=None, dtype=None):
    x, _ = apply_child("embedding", kids["embedding"], params["embedding"], {}, tokens)
    x = x.astype(dtype or x.dtype)
    if scale:
        x = x * jnp.asarray(math.sqrt(d), x.dtype)
    x, _ = apply_child("positional", kids["positional"], params.get("positional", {}), {}, x,
                       key=child_key(key, 1), train=train, offset=offset)
    return x


def _init_model(children, key, shapes):
    params = {}
    for i, (name, layer) in enumerate(children):
        out, p, _ = init_child(name, layer, child_key(key, i), shapes[name])
        if p:
            params[name] = p
    return params


def transformer_encoder(vocab_size: int, num_hiddens: int, ffn_hiddens: int, num_heads: int,
                        num_layers: int, *, dropout: float = 0.0, max_len: int = 1000,
                        positional: str = "sinusoidal", norm_first: bool = False,
                        activation: str = "relu", use_bias: bool = True,
                        scale_embedding: bool = True, eps: float = 1e-5,
                        scan_layers: bool = False, remat: bool | str = False,
                        compute_dtype=None) -> Layer:
    """d2l's ``TransformerEncoder``: ``tokens (B, S) int -> (B, S, num_hiddens)``.

    ``apply(params, state, tokens, *, valid_lens=None, key, train, return_attention=False)``;
    with ``return_attention`` the output is ``(y, weights)``, one ``(B, heads, S, S)`` array per
    layer. Token ids outside ``[0, vocab_size)`` and ``S > max_len`` are refused eagerly.
    """
    _common(num_hiddens, ffn_hiddens, num_heads, num_layers, "transformer_encoder")
    compute_dtype = check_compute_dtype("transformer_encoder", compute_dtype)
    check_positive_int("transformer_encoder", "vocab_size", vocab_size)
    block = encoder_block(num_heads, num_hiddens, ffn_hiddens, dropout=dropout,
                          norm_first=norm_first, activation=activation, use_bias=use_bias,
                          eps=eps)
    children = [("embedding", embedding(vocab_size, num_hiddens)),
                ("positional", positional_encoding(max_len, kind=positional, dropout=dropout)),
                ("blocks", block_stack(block, num_layers, scan=scan_layers, remat=remat))]
    if norm_first:
        children.append(("final_norm", layer_norm(eps=eps)))
    children = tuple(children)
    kids = dict(children)

    def init(key, in_shape):
        if len(in_shape) != 2:
            raise ShapeError("transformer_encoder", f"expected tokens (B, S), got {in_shape}")
        h = (*tuple(in_shape), num_hiddens)
        params = _init_model(children, key, {"embedding": in_shape, "positional": h,
                                             "blocks": h, "final_norm": h})
        return h, params, {}

    def apply(params, state, tokens, *, key=None, train=False, valid_lens=None,
              return_attention=False):
        check_tokens(tokens, vocab_size, max_len, "transformer_encoder")
        params = cast_floating(params, compute_dtype)
        x = _embed(params, kids, tokens, d=num_hiddens, scale=scale_embedding, key=key,
                   train=train)
        (x, w), _ = apply_child("blocks", kids["blocks"], params["blocks"], {}, x,
                                key=child_key(key, 2), train=train,
                                collect_weights=return_attention, valid_lens=valid_lens)
        if norm_first:
            x, _ = apply_child("final_norm", kids["final_norm"], params["final_norm"], {}, x)
        return ((x, w) if return_attention else x), state

    return Layer(init, apply, name="transformer_encoder", children=children,
                 config={"vocab_size": vocab_size, "num_hiddens": num_hiddens,
                         "ffn_hiddens": ffn_hiddens, "num_heads": num_heads,
                         "num_layers": num_layers, "max_len": max_len,
                         "norm_first": norm_first, "scan_layers": scan_layers})


def decoder_state(memory: jax.Array | None, memory_valid_lens: jax.Array | None = None
                  ) -> dict[str, Any]:
    """The decoder state for the full (teacher-forced) pass: the encoder's ``memory (B, S, d)``
    and its ``memory_valid_lens (B,)`` (all of ``S`` when ``None``)."""
    if memory is None:
        return {}
    if memory_valid_lens is None:
        memory_valid_lens = jnp.full((memory.shape[0],), memory.shape[1], jnp.int32)
    return {"memory": memory, "memory_valid_lens": jnp.asarray(memory_valid_lens, jnp.int32)}


def init_decoding(decoder: Layer, params, batch_size: int, max_len: int, *,
                  memory: jax.Array | None = None, memory_valid_lens: jax.Array | None = None,
                  dtype=jnp.float32) -> dict[str, Any]:
    """The decoder state for incremental decoding of up to ``max_len`` positions: a KV cache
    per layer, the memory's keys and values projected once per layer, ``index (B,)`` zeros.
    Every leaf has the row axis first (beam search reorders rows)."""
    cfg = decoder.config
    heads, d, n = cfg["num_heads"], cfg["num_hiddens"], cfg["num_layers"]
    if max_len > cfg["max_len"]:
        raise ValueError(f"init_decoding: max_len {max_len} exceeds the decoder's positional "
                         f"max_len {cfg['max_len']}")
    if cfg["cross_attention"] and memory is None:
        raise ValueError("init_decoding: this decoder attends to an encoder; pass memory=")
    params = cast_floating(params, cfg.get("compute_dtype"))
    blocks = {}
    for i in range(n):
        bp = (jax.tree_util.tree_map(lambda a, i=i: a[i], params["blocks"])
              if cfg["scan_layers"] else params["blocks"][str(i)])
        st = {"self_attention": init_kv_cache(batch_size, max_len, heads, d // heads,
                                              cfg.get("compute_dtype") or dtype)}
        if cfg["cross_attention"]:
            mem = memory.astype(cfg.get("compute_dtype") or memory.dtype)
            st["cross_attention"] = project_kv(bp["cross_attention"], mem, mem, heads)
        blocks[str(i)] = st
    state = {"index": jnp.zeros((batch_size,), jnp.int32), "blocks": blocks}
    if cfg["cross_attention"]:
        state["memory_valid_lens"] = decoder_state(memory, memory_valid_lens)[
            "memory_valid_lens"]
    return state


def transformer_decoder(vocab_size: int, num_hiddens: int, ffn_hiddens: int, num_heads: int,
                        num_layers: int, *, dropout: float = 0.0, max_len: int = 1000,
                        positional: str = "sinusoidal", norm_first: bool = False,
                        activation: str = "relu", use_bias: bool = True,
                        cross_attention: bool = True, scale_embedding: bool = True,
                        eps: float = 1e-5, scan_layers: bool = False,
                        remat: bool | str = False,
                        compute_dtype=None) -> Layer:
    """d2l's ``TransformerDecoder``: ``tokens (B, T) -> logits (B, T, vocab_size)`` (float32).

    State: :func:`decoder_state` (full causal pass; needs the encoder ``memory`` unless
    ``cross_attention=False``) or :func:`init_decoding` (incremental; see the module
    docstring). ``apply(..., return_attention=False)``: with it, the output is ``(logits,
    weights)``, per layer ``(self (B, heads, T, K), cross (B, heads, T, S) or None)``.
    """
    _common(num_hiddens, ffn_hiddens, num_heads, num_layers, "transformer_decoder")
    compute_dtype = check_compute_dtype("transformer_decoder", compute_dtype)
    check_positive_int("transformer_decoder", "vocab_size", vocab_size)
    block = decoder_block(num_heads, num_hiddens, ffn_hiddens, dropout=dropout,
                          norm_first=norm_first, activation=activation, use_bias=use_bias,
                          cross_attention=cross_attention, eps=eps)
    children = [("embedding", embedding(vocab_size, num_hiddens)),
                ("positional", positional_encoding(max_len, kind=positional, dropout=dropout)),
                ("blocks", block_stack(block, num_layers, scan=scan_layers, remat=remat))]
    if norm_first:
        children.append(("final_norm", layer_norm(eps=eps)))
    children.append(("dense", dense(vocab_size)))
    children = tuple(children)
    kids = dict(children)

    def init(key, in_shape):
        if len(in_shape) != 2:
            raise ShapeError("transformer_decoder", f"expected tokens (B, T), got {in_shape}")
        h = (*tuple(in_shape), num_hiddens)
        params = _init_model(children, key, {"embedding": in_shape, "positional": h,
                                             "blocks": h, "final_norm": h, "dense": h})
        return (*tuple(in_shape), vocab_size), params, {}

    def apply(params, state, tokens, *, key=None, train=False, return_attention=False):
        check_tokens(tokens, vocab_size, max_len, "transformer_decoder")
        decoding = "index" in state
        if cross_attention and not decoding and "memory" not in state:
            raise ValueError("transformer_decoder: the state has no encoder memory; build it "
                             "with decoder_state(memory, valid_lens) or init_decoding(...)")
        params = cast_floating(params, compute_dtype)
        offset = state["index"] if decoding else None
        x = _embed(params, kids, tokens, d=num_hiddens, scale=scale_embedding, key=key,
                   train=train, offset=offset, dtype=compute_dtype)
        kw = {}
        if cross_attention:
            kw["memory_valid_lens"] = state["memory_valid_lens"]
            if not decoding:
                kw["memory"] = state["memory"].astype(x.dtype)
        (x, w), blocks = apply_child("blocks", kids["blocks"], params["blocks"],
                                     state.get("blocks", {}), x, key=child_key(key, 2),
                                     train=train, collect_weights=return_attention, **kw)
        if norm_first:
            x, _ = apply_child("final_norm", kids["final_norm"], params["final_norm"], {}, x)
        logits, _ = apply_child("dense", kids["dense"], params["dense"], {}, x)
        logits = logits.astype(jnp.float32)
        new_state = state
        if decoding:
            new_state = {**state, "blocks": blocks, "index": state["index"] + tokens.shape[1]}
        return ((logits, w) if return_attention else logits), new_state

    return Layer(init, apply, name="transformer_decoder", children=children,
                 config={"vocab_size": vocab_size, "num_hiddens": num_hiddens,
                         "ffn_hiddens": ffn_hiddens, "num_heads": num_heads,
                         "num_layers": num_layers, "max_len": max_len,
                         "norm_first": norm_first, "cross_attention": cross_attention,
                         "scan_layers": scan_layers, "compute_dtype": compute_dtype})


def transformer(src_vocab_size: int, tgt_vocab_size: int, num_hiddens: int, ffn_hiddens: int,
                num_heads: int, num_layers: int, **kwargs) -> Layer:
    """The encoder–decoder transformer: ``x = (src (B, S), src_valid_lens (B,), tgt_in (B, T))
    -> logits (B, T, tgt_vocab_size)``. Keyword options go to both :func:`transformer_encoder`
    and :func:`transformer_decoder`. Params ``{"encoder": ..., "decoder": ...}``; no state.
    ``apply(..., return_attention=True)`` returns ``(logits, {"encoder": [...], "decoder":
    [...]})``. Decode with :func:`translate`."""
    enc = transformer_encoder(src_vocab_size, num_hiddens, ffn_hiddens, num_heads, num_layers,
                              **kwargs)
    dec = transformer_decoder(tgt_vocab_size, num_hiddens, ffn_hiddens, num_heads, num_layers,
                              **kwargs)
    children = (("encoder", enc), ("decoder", dec))

    def init(key, in_shape):
        if not isinstance(in_shape, (tuple, list)) or len(in_shape) != 3:
            raise ShapeError("transformer", "expected input shapes (src (B, S), "
                             f"src_valid_lens (B,), tgt_in (B, T)), got {in_shape}")
        src, _, tgt = in_shape
        _, pe, _ = init_child("encoder", enc, child_key(key, 0), tuple(src))
        out, pd, _ = init_child("decoder", dec, child_key(key, 1), tuple(tgt))
        return out, {"encoder": pe, "decoder": pd}, {}

    def apply(params, state, x, *, key=None, train=False, return_attention=False):
        if not isinstance(x, (tuple, list)) or len(x) != 3:
            raise ShapeError("transformer", "expected x = (src, src_valid_lens, tgt_in)")
        src, src_valid_lens, tgt_in = x
        mem, _ = apply_child("encoder", enc, params["encoder"], {}, src, key=child_key(key, 0),
                             train=train, valid_lens=src_valid_lens,
                             return_attention=return_attention)
        w_enc = None
        if return_attention:
            mem, w_enc = mem
        out, _ = apply_child("decoder", dec, params["decoder"],
                             decoder_state(mem, src_valid_lens), tgt_in,
                             key=child_key(key, 1), train=train,
                             return_attention=return_attention)
        if return_attention:
            return (out[0], {"encoder": w_enc, "decoder": out[1]}), state
        return out, state

    return Layer(init, apply, name="transformer", children=children,
                 config={"src_vocab_size": src_vocab_size, "tgt_vocab_size": tgt_vocab_size,
                         "num_hiddens": num_hiddens, "num_layers": num_layers, **kwargs})


def start_decoding(model: Layer, params, src: jax.Array, src_valid_lens: jax.Array,
                   max_len: int) -> dict[str, Any]:
    """Encode ``src`` and return the decoder's incremental-decoding state (see
    :func:`init_decoding`)."""
    enc, dec = dict(model.children)["encoder"], dict(model.children)["decoder"]
    mem, _ = enc.apply(params["encoder"], {}, src, valid_lens=src_valid_lens)
    return init_decoding(dec, params["decoder"], src.shape[0], max_len, memory=mem,
                         memory_valid_lens=src_valid_lens)


def translate(model: Layer, params, src: jax.Array, src_valid_lens: jax.Array, *, bos_id: int,
              eos_id: int, max_len: int, beam_size: int = 1, alpha: float = 0.75
              ) -> DecodeResult:
    """Encode ``src (B, S)`` and decode greedily (``beam_size=1``) or with beam search, one
    token per step through the decoder's KV cache; fixed shapes, ``jit``-able with the ids,
    ``max_len`` and ``beam_size`` static. ``aux`` holds the cross-attention weights of every
    step, ``(B, max_len, layers, heads, S)`` (for heat maps)."""
    dec = dict(model.children)["decoder"]
    state = start_decoding(model, params, src, src_valid_lens, max_len)

    def step(carry, tokens):
        (logits, w), carry = dec.apply(params["decoder"], carry, tokens[:, None],
                                       return_attention=True)
        cross = jnp.stack([c[:, :, 0] for _, c in w], axis=1)  # (N, layers, heads, S)
        return logits[:, 0], carry, cross

    b = src.shape[0]
    if beam_size == 1:
        return greedy_search_steps(step, state, b, bos_id=bos_id, eos_id=eos_id,
                                   max_len=max_len)
    return beam_search_steps(step, state, b, beam_size=beam_size, bos_id=bos_id, eos_id=eos_id,
                             max_len=max_len, alpha=alpha)
