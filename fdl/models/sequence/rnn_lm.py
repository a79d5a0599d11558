"""Character-level recurrent language model (d2l chapter 8/9) as a :class:`~fdl.nn.Layer`: RNN,
GRU or LSTM, deep and optionally bidirectional (the book's counter-example: it sees the future,
so its training perplexity is misleadingly low and its generation is useless).

::

    model = rnn_lm(len(vocab), 256, cell="gru")
    _, params, state = model.init(key, (32, 35))             # tokens (batch, steps)
    logits, state = model.apply(params, state, tokens)       # (32, 35, V); the carry moves on
    result = fdl.train.fit(model, params, state, optimizer, data, loss="cross_entropy", ...)
    print(predict(model, result.params, "time traveller", 50, vocab))

It is ``serial(one_hot | embedding, rnn, dense)``. Params: ``{"embed": {"table": (V, E)}}``
(only with ``embed_size``; otherwise the input is one-hot, the book's setting), ``"rnn": {"l0":
{"fwd": {...}}, ...}``, ``"out": {"w": (D*H, V), "b": (V,)}}``. State: the recurrent carry
``{"rnn": {"h": (batch, L*D, H)[, "c": ...]}}`` (:mod:`fdl.nn.recurrent`): with ``carry="keep"``
(the default) the next call continues from it -- truncated BPTT over the book's sequential
partitioning is feeding the returned state back (``fit`` does); ``carry="reset"`` starts every
call from zeros (the book's random sampling).

Training is :func:`fdl.train.fit` with ``loss="cross_entropy"`` (mean over all positions; its
``perplexity`` is ``exp`` of that) and ``fdl.optim.chain(clip_by_global_norm(theta),
sgd(lr))`` (d2l's ``grad_clipping`` then SGD).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fdl import nn
from fdl.nn.core import Layer, ShapeError
from fdl.nn.recurrent import RecurrentLayer

__all__ = ["CELLS", "perplexity", "predict", "rnn_lm"]

CELLS = ("rnn", "gru", "lstm")


def _one_hot(vocab_size: int) -> Layer:
    return nn.lambda_layer(lambda x: jax.nn.one_hot(x, vocab_size, dtype=jnp.float32),
                           name="one_hot", shape_fn=lambda s: (*s, vocab_size))


def _check_tokens(x_shape, dtype=None) -> None:
    if len(x_shape) != 2 or (dtype is not None and not jnp.issubdtype(dtype, jnp.integer)):
        got = f"{dtype} {tuple(x_shape)}" if dtype is not None else f"{tuple(x_shape)}"
        raise ShapeError("rnn_lm", f"expected integer tokens of shape (batch, steps), got {got}")


def rnn_lm(vocab_size: int, hidden_size: int = 256, *, cell: str = "gru", num_layers: int = 1,
           bidirectional: bool = False, dropout: float = 0.0, embed_size: int | None = None,
           carry: str | None = None, unroll: int = 1) -> Layer:
    """A recurrent LM Layer: tokens int (batch, steps) -> logits (batch, steps, vocab_size).

    ``cell`` ``"rnn"``, ``"gru"`` or ``"lstm"``; ``dropout`` between recurrent layers (training
    needs a ``key``); ``carry`` as in :func:`fdl.nn.gru` (``"keep"`` unless bidirectional).
    The output layer is PyTorch's ``nn.Linear`` initialisation (weights and bias
    ``U(-1/sqrt(D*H), 1/sqrt(D*H))``)."""
    if cell not in CELLS:
        raise ValueError(f"rnn_lm: cell must be one of {CELLS}, got {cell!r}")
    nn.check_positive_int("rnn_lm", "vocab_size", vocab_size)
    make = {"rnn": nn.rnn, "gru": nn.gru, "lstm": nn.lstm}[cell]
    rnn: RecurrentLayer = make(hidden_size, num_layers=num_layers, dropout=dropout,
                               bidirectional=bidirectional, carry=carry, unroll=unroll)
    bound = 1.0 / math.sqrt(hidden_size * rnn.num_directions)

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    first = (("embed", nn.embedding(vocab_size, embed_size)) if embed_size is not None
             else ("one_hot", _one_hot(vocab_size)))
    net = nn.serial(first, ("rnn", rnn), ("out", nn.dense(vocab_size, w_init=uniform,
                                                          b_init=uniform)))

    def init(key, in_shape):
        _check_tokens(in_shape)
        return net.init(key, in_shape)

    def apply(params, state, x, *, key=None, train=False):
        _check_tokens(jnp.shape(x), jnp.result_type(x))
        return net.apply(params, state, x, key=key, train=train)

    config = {"vocab_size": vocab_size, "hidden_size": hidden_size, "cell": cell,
              "num_layers": num_layers, "bidirectional": bidirectional, "dropout": dropout,
              "embed_size": embed_size, "carry": rnn.carry, "unroll": unroll}
    return Layer(init, apply, name="rnn_lm", children=net.children, config=config)


def _generate(model: Layer, params: dict, prefix_ids: jax.Array, num_preds: int) -> jax.Array:
    """Warm the carry up on ``prefix_ids`` (T,), then ``num_preds`` greedy tokens, one at a
    time, each step continuing the carry (PyTorch's ``(h0, c0)`` layout through
    :meth:`~fdl.nn.recurrent.RecurrentLayer.apply_with_state`, so it runs for every ``carry``
    mode and for a bidirectional model too)."""
    children = dict(model.children)
    first = "embed" if "embed" in children else "one_hot"
    rnn, out = children["rnn"], children["out"]

    def forward(tokens, carry):
        x, _ = children[first].apply(params.get(first, {}), {}, tokens)
        ys, carry = rnn.apply_with_state(params["rnn"], x, carry)
        logits, _ = out.apply(params["out"], {}, ys)
        return jnp.argmax(logits[0, -1], axis=-1).astype(jnp.int32), carry

    @jax.jit
    def run(prefix_ids):
        tok, carry = forward(prefix_ids[None, :], None)

        def body(c, _):
            tok, carry = c
            nxt, carry = forward(tok.reshape(1, 1), carry)
            return (nxt, carry), tok

        _, toks = jax.lax.scan(body, (tok, carry), None, length=num_preds)
        return toks

    return run(prefix_ids)


def predict(model: Layer, params: dict, prefix: str, num_preds: int, vocab) -> str:
    """Greedy generation (the book's ``predict_ch8``): warm the carry up on ``prefix`` (chars),
    then append ``num_preds`` argmax characters. Returns ``prefix`` + the generated text."""
    if not prefix:
        raise ValueError("predict: prefix must contain at least one token")
    if not isinstance(num_preds, int) or num_preds < 0:
        raise ValueError(f"predict: num_preds must be an integer >= 0, got {num_preds!r}")
    if num_preds == 0:
        return prefix
    ids = jnp.asarray(vocab[list(prefix)], jnp.int32)
    toks = np.asarray(_generate(model, params, ids, num_preds))
    return prefix + "".join(vocab.to_tokens(toks.tolist()))


def perplexity(mean_nll: float) -> float:
    """``exp`` of the mean negative log-likelihood per token."""
    return float(math.exp(mean_nll))

