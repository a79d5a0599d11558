"""The encoder--decoder combinator (d2l's ``EncoderDecoder``) and the decoder protocol.

A **decoder** is a :class:`Decoder`: a :class:`~fdl.nn.Layer` whose state is built from the
encoder's result by ``bind`` (d2l's ``init_state``) and then carried from call to call::

    state = decoder.bind(params, enc_outputs, enc_state, src_valid_len)
    logits, state = decoder.apply(params, state, tokens)     # tokens (B, T) -> (B, T, V)
    logits, state = decoder.apply(params, state, next_tok)   # continues (greedy/beam search)

``init(key, (B, T))`` takes the target token shape (the decoder is built for its encoder's
hidden size, e.g. ``memory_size=``); it returns the *unbound* state ``{}``, and ``apply`` on an
unbound state raises a :class:`~fdl.nn.ShapeError` saying to call ``bind``. Every leaf of a bound
state has the batch axis first, so :mod:`fdl.models.sequence.decoding` can reorder rows (beams).

:func:`encoder_decoder` composes an encoder Layer and a decoder into one Layer whose input is
``x = (src (B, T_src) int, src_valid_len (B,) int, dec_in (B, T) int)`` and output the decoder's
logits; its params are ``{"encoder": ..., "decoder": ...}`` and its state the encoder's (the
decoder's state is rebuilt from the encoder on every call). :meth:`EncoderDecoder.encode`
returns the bound decoder state for decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fdl.nn.core import Layer, ShapeError, apply_child, child_key, init_child

__all__ = ["Decoder", "EncoderDecoder", "check_bound", "check_tokens", "encoder_decoder"]

BindFn = Callable[..., dict]


@dataclasses.dataclass(frozen=True, repr=False)
class Decoder(Layer):
    """A Layer plus ``bind(params, enc_outputs, enc_state, src_valid_len) -> state`` (see the
    module docstring). ``state_keys`` names the keys a bound state must hold."""

    bind: BindFn | None = None
    state_keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, repr=False)
class EncoderDecoder(Layer):
    """What :func:`encoder_decoder` returns: a Layer plus :meth:`encode`."""

    encoder: Layer | None = None
    decoder: Decoder | None = None

    def encode(self, params: dict, state: dict, src: jax.Array, src_valid_len: jax.Array,
               *, key=None, train: bool = False) -> dict:
        """Run the encoder on ``src`` and return the decoder's bound state."""
        enc_out, enc_state = apply_child("encoder", self.encoder, params["encoder"],
                                         state.get("encoder", {}), src,
                                         key=child_key(key, 0), train=train)
        return self.decoder.bind(params["decoder"], enc_out, enc_state, src_valid_len)


def check_tokens(layer: str, shape, dtype=None, batch: int | None = None) -> None:
    """ShapeError unless ``shape`` is ``(batch, steps)`` of an integer dtype."""
    if len(shape) != 2 or (dtype is not None and not jnp.issubdtype(dtype, jnp.integer)):
        got = f"{dtype} {tuple(shape)}" if dtype is not None else f"{tuple(shape)}"
        raise ShapeError(layer, f"expected integer tokens of shape (batch, steps), got {got}")
    if batch is not None and shape[0] != batch:
        raise ShapeError(layer, f"expected tokens of shape ({batch}, steps) for a decoder state "
                         f"of batch {batch}, got {tuple(shape)}")


def check_bound(decoder: str, state: Any, keys: tuple[str, ...]) -> int:
    """Raise unless ``state`` is a bound decoder state (all ``keys``, batch-first leaves of
    one batch size); return that batch size."""
    if not isinstance(state, dict) or not state:
        raise ShapeError(decoder, "called without its encoder state (the state init returns is "
                         "unbound): build it with decoder.bind(params, enc_outputs, enc_state, "
                         "src_valid_len), or EncoderDecoder.encode(...)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ShapeError(decoder, f"expected a bound state with keys {sorted(keys)}, got "
                         f"{sorted(state)} (a state from another layer?)")
    rows = {k: jnp.shape(v)[0] for k, v in jax.tree_util.tree_leaves_with_path(state)
            for k in [jax.tree_util.keystr(k)]}
    if len(set(rows.values())) != 1:
        raise ShapeError(decoder, f"state leaves disagree on the batch size (axis 0): {rows}")
    return next(iter(rows.values()))


def _unpack(x) -> tuple[Any, Any, Any]:
    if not (isinstance(x, (tuple, list)) and len(x) == 3):
        raise ShapeError("encoder_decoder", "expected x = (src (B, T_src), src_valid_len (B,), "
                         f"dec_in (B, T)), got {type(x).__name__}")
    return tuple(x)


def encoder_decoder(encoder: Layer, decoder: Decoder) -> EncoderDecoder:
    """Compose ``encoder`` and ``decoder`` (see the module docstring). The encoder maps ``src``
    to ``(outputs (B, T_src, H), state)``; the decoder's ``bind`` reads both."""
    if not isinstance(decoder, Decoder):
        raise TypeError(f"encoder_decoder: decoder must be a Decoder, got {decoder!r}")

    def init(key, in_shape):
        src_shape, len_shape, tgt_shape = _unpack(in_shape)
        if tuple(len_shape) != (src_shape[0],):
            raise ShapeError("encoder_decoder", f"expected src_valid_len of shape "
                             f"({src_shape[0]},), got {tuple(len_shape)}")
        mem_shape, p_enc, s_enc = init_child("encoder", encoder, child_key(key, 0), src_shape)
        want = decoder.config.get("memory_size")
        if want is not None and mem_shape[-1] != want:
            raise ShapeError("encoder_decoder", f"the encoder's output {tuple(mem_shape)} has "
                             f"{mem_shape[-1]} features; the decoder was built for "
                             f"memory_size={want}")
        out_shape, p_dec, _ = init_child("decoder", decoder, child_key(key, 1),
                                         tuple(tgt_shape))
        state = {"encoder": s_enc} if s_enc else {}
        return out_shape, {"encoder": p_enc, "decoder": p_dec}, state

    def apply(params, state, x, *, key=None, train=False):
        src, src_valid_len, dec_in = _unpack(x)
        enc_out, enc_state = apply_child("encoder", encoder, params["encoder"],
                                         state.get("encoder", {}), src,
                                         key=child_key(key, 0), train=train)
        dec_state = decoder.bind(params["decoder"], enc_out, enc_state, src_valid_len)
        logits, _ = apply_child("decoder", decoder, params["decoder"], dec_state, dec_in,
                                key=child_key(key, 1), train=train)
        return logits, ({"encoder": enc_state} if enc_state else {})

    return EncoderDecoder(init, apply, name="encoder_decoder",
                          children=(("encoder", encoder), ("decoder", decoder)),
                          encoder=encoder, decoder=decoder)
