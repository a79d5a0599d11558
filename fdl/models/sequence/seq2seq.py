"""Encoder--decoder (seq2seq) translation models of *Dive into Deep Learning* as Layers: the GRU
encoder--decoder ("Sequence to Sequence Learning") and the Bahdanau attention decoder ("Bahdanau
Attention"), built from ``nn`` parts and :func:`~fdl.models.sequence.encoder_decoder.
encoder_decoder`.

::

    model = seq2seq(len(src_vocab), len(tgt_vocab), attention=True)
    _, params, state = model.init(key, ((64, 10), (64,), (64, 10)))
    logits, state = model.apply(params, state, (src, src_valid_len, dec_in), key=k, train=True)
    result = translate(model, params, src, src_valid_len, bos_id=..., eos_id=..., max_len=10)

Params::

    {"encoder": {"embedding": {"table"}, "rnn": {"l0": {"fwd": {...}}, ...}},
     "decoder": {"embedding": {"table"}, "rnn": {...}, "dense": {"w", "b"},
                 "attention": {"w_q", "w_k", "w_v"}}}      # "attention" only with attention

Encoder: embedding -> multi-layer GRU (``carry="reset"``: every call starts from zeros; dropout
between layers); the source padding runs through the GRU as in the book (no ``valid_len``
masking in the encoder). Its state holds the final carry ``{"rnn": {"h": (B, layers, H)}}``.

Plain decoder (:func:`seq2seq_decoder`): the *context* is the encoder's final top-layer state,
concatenated to every decoder input embedding (``[embedding, context]``); the decoder GRU starts
from the encoder's final state. (d2l 2.0 keeps this context fixed while decoding; d2l 0.17's
PyTorch code reused the decoder's *current* top state at prediction time, a train/test mismatch
we do not copy.) Bound state: ``{"rnn": {"h": (B, layers, H)}, "context": (B, H)}``.

Attention decoder (:func:`attention_decoder`): at every step the query is the decoder's
previous top-layer state, the keys and values the encoder outputs masked to the source
``valid_len``; the GRU input is ``[context, embedding]``. Bound state: ``{"rnn": ...,
"memory": (B, T_src, H), "valid_len": (B,), "attention_weights": (B, T_src)}`` (the weights of
the last step, d2l's ``attention_weights``, for plotting; ``bind`` starts them at zeros).

Initialisation as the book's ``xavier_init_weights``: Xavier-uniform dense, attention and GRU
weight matrices (GRU biases keep PyTorch's ``U(-1/sqrt(H), 1/sqrt(H))``), ``N(0, 1)``
embeddings (:func:`seq2seq` applies it to the whole model).

Training is :func:`fdl.train.fit` with :func:`sequence_loss` (d2l's ``MaskedSoftmaxCELoss``),
teacher forcing (``dec_in = [<bos>, Y[:, :-1]]``, :func:`teacher_forcing_inputs`).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fdl import nn
from fdl.data.translation import truncate_pad
from fdl.models.sequence.decoding import DecodeResult, beam_search, greedy_search
from fdl.models.sequence.encoder_decoder import (
    Decoder,
    EncoderDecoder,
    check_bound,
    check_tokens,
    encoder_decoder,
)
from fdl.nn import initializers as inits
from fdl.nn.attention import additive_attention_apply, padding_mask
from fdl.nn.core import ShapeError, apply_child, init_child, require_key
from fdl.nn.losses import softmax_cross_entropy

__all__ = [
    "attention_decoder",
    "masked_softmax_ce_loss",
    "predict_seq2seq",
    "seq2seq",
    "seq2seq_decoder",
    "seq2seq_encoder",
    "sequence_loss",
    "teacher_forcing_inputs",
    "translate",
]


def seq2seq_encoder(vocab_size: int, embed_size: int = 32, num_hiddens: int = 32,
                    num_layers: int = 2, dropout: float = 0.1) -> nn.Layer:
    """``serial(embedding, gru(carry="reset"))``: src (B, T) int -> outputs (B, T, H); state
    ``{"rnn": {"h": (B, layers, H)}}`` holds the final carry."""
    return nn.serial(("embedding", nn.embedding(vocab_size, embed_size)),
                     ("rnn", nn.gru(num_hiddens, num_layers=num_layers, dropout=dropout,
                                    carry="reset")))


def _top_state(enc_state) -> jax.Array:
    """The encoder's final carry ``(B, layers, H)`` (``enc_state["rnn"]["h"]``)."""
    try:
        return enc_state["rnn"]["h"]
    except (KeyError, TypeError):
        raise ShapeError("seq2seq decoder", "bind expects the encoder state of a recurrent "
                         "encoder, {'rnn': {'h': (batch, layers, hidden)}}, got "
                         f"{jax.tree_util.tree_map(jnp.shape, enc_state)}") from None


def _decoder_parts(vocab_size, embed_size, num_hiddens, num_layers, dropout):
    return (nn.embedding(vocab_size, embed_size),
            nn.gru(num_hiddens, num_layers=num_layers, dropout=dropout, carry="keep"),
            nn.dense(vocab_size))


def seq2seq_decoder(vocab_size: int, embed_size: int = 32, num_hiddens: int = 32,
                    num_layers: int = 2, dropout: float = 0.1, *,
                    memory_size: int | None = None) -> Decoder:
    """The plain GRU decoder (see the module docstring): tokens (B, T) -> logits (B, T, V).
    ``memory_size``: the encoder's hidden size (default ``num_hiddens``)."""
    emb, rnn, dense = _decoder_parts(vocab_size, embed_size, num_hiddens, num_layers, dropout)
    keys = ("context", "rnn")
    mem = memory_size or num_hiddens

    def init(key, in_shape):
        check_tokens("seq2seq_decoder", in_shape)
        e_shape, p_emb, _ = init_child("embedding", emb, jax.random.fold_in(key, 0), in_shape)
        r_shape, p_rnn, _ = init_child("rnn", rnn, jax.random.fold_in(key, 1),
                                       (*e_shape[:-1], e_shape[-1] + mem))
        out, p_dense, _ = init_child("dense", dense, jax.random.fold_in(key, 2), r_shape)
        return out, {"embedding": p_emb, "rnn": p_rnn, "dense": p_dense}, {}

    def bind(params, enc_outputs, enc_state, src_valid_len=None):
        h = _top_state(enc_state)
        return {"rnn": {"h": h}, "context": h[:, -1]}

    def apply(params, state, x, *, key=None, train=False):
        batch = check_bound("seq2seq_decoder", state, keys)
        check_tokens("seq2seq_decoder", jnp.shape(x), jnp.result_type(x), batch)
        e, _ = apply_child("embedding", emb, params["embedding"], {}, x)
        ctx = state["context"]
        ctx = jnp.broadcast_to(ctx[:, None, :], e.shape[:2] + ctx.shape[-1:])
        ys, s_rnn = apply_child("rnn", rnn, params["rnn"], state["rnn"],
                                jnp.concatenate([e, ctx.astype(e.dtype)], -1), key=key,
                                train=train)
        logits, _ = apply_child("dense", dense, params["dense"], {}, ys)
        return logits, {**state, "rnn": s_rnn}

    return Decoder(init, apply, name="seq2seq_decoder",
                   children=(("embedding", emb), ("rnn", rnn), ("dense", dense)),
                   config={"memory_size": mem}, bind=bind, state_keys=keys)


def _attention_params(key, num_hiddens, memory_size=None):
    xavier = inits.xavier_uniform()
    ka = jax.random.split(key, 3)
    h = num_hiddens
    return {"w_q": xavier(ka[0], (h, h)), "w_k": xavier(ka[1], (memory_size or h, h)),
            "w_v": xavier(ka[2], (h, 1)).reshape(h)}


def _attend_step(params, rnn, dropout, train, mem, mask, state, inp):
    """One decoder step of the attention decoder (scanned over time)."""
    x_t, k = inp
    h = state["rnn"]["h"]  # (B, layers, H)
    ctx, w = additive_attention_apply(params["attention"], h[:, -1][:, None, :], mem, mem,
                                      mask=mask, dropout_rate=dropout,
                                      key=None if k is None else jax.random.fold_in(k, 1),
                                      train=train)
    x = jnp.concatenate([ctx[:, 0], x_t], -1)[:, None, :]
    out, s_rnn = apply_child("rnn", rnn, params["rnn"], state["rnn"], x, key=k, train=train)
    return {**state, "rnn": s_rnn}, (out[:, 0], w[:, 0])


def attention_decoder(vocab_size: int, embed_size: int = 32, num_hiddens: int = 32,
                      num_layers: int = 2, dropout: float = 0.1, *,
                      memory_size: int | None = None) -> Decoder:
    """The Bahdanau attention decoder (see the module docstring): tokens (B, T) -> logits
    (B, T, V); the state's ``attention_weights`` are the last step's weights (B, T_src).
    ``memory_size``: the encoder's hidden size (default ``num_hiddens``; the book's additive
    attention projects queries and keys to ``num_hiddens``)."""
    emb, rnn, dense = _decoder_parts(vocab_size, embed_size, num_hiddens, num_layers, dropout)
    keys = ("attention_weights", "memory", "rnn", "valid_len")
    mem_size = memory_size or num_hiddens

    def init(key, in_shape):
        check_tokens("attention_decoder", in_shape)
        e_shape, p_emb, _ = init_child("embedding", emb, jax.random.fold_in(key, 0), in_shape)
        r_shape, p_rnn, _ = init_child("rnn", rnn, jax.random.fold_in(key, 1),
                                       (in_shape[0], 1, e_shape[-1] + mem_size))
        out, p_dense, _ = init_child("dense", dense, jax.random.fold_in(key, 2),
                                     (*in_shape, r_shape[-1]))
        params = {"embedding": p_emb, "rnn": p_rnn, "dense": p_dense,
                  "attention": _attention_params(jax.random.fold_in(key, 3), num_hiddens,
                                                 mem_size)}
        return out, params, {}

    def bind(params, enc_outputs, enc_state, src_valid_len=None):
        b, t = enc_outputs.shape[:2]
        if src_valid_len is None:
            src_valid_len = jnp.full((b,), t, jnp.int32)
        return {"rnn": {"h": _top_state(enc_state)}, "memory": enc_outputs,
                "valid_len": jnp.asarray(src_valid_len, jnp.int32),
                "attention_weights": jnp.zeros((b, t), enc_outputs.dtype)}

    def apply(params, state, x, *, key=None, train=False):
        batch = check_bound("attention_decoder", state, keys)
        check_tokens("attention_decoder", jnp.shape(x), jnp.result_type(x), batch)
        if train and dropout > 0:
            require_key("attention_decoder", key)
        e, _ = apply_child("embedding", emb, params["embedding"], {}, x)
        mem = state["memory"]
        mask = padding_mask(state["valid_len"], mem.shape[1])[:, None, :]
        steps = x.shape[1]
        ks = None if key is None else jax.vmap(lambda t: jax.random.fold_in(key, t))(
            jnp.arange(steps))

        def step(s, inp):
            return _attend_step(params, rnn, dropout, train, mem, mask, s, inp)

        state, (outs, ws) = jax.lax.scan(step, state, (jnp.swapaxes(e, 0, 1), ks))
        logits, _ = apply_child("dense", dense, params["dense"], {}, jnp.swapaxes(outs, 0, 1))
        return logits, {**state, "attention_weights": ws[-1].astype(mem.dtype)}

    return Decoder(init, apply, name="attention_decoder",
                   children=(("embedding", emb), ("rnn", rnn), ("dense", dense)),
                   config={"memory_size": mem_size}, bind=bind, state_keys=keys)


def _xavier_rnn(key, params):
    """Every GRU weight matrix Xavier-uniform (the book's ``xavier_init_weights``)."""
    out = {}
    for i, (lname, layer) in enumerate(sorted(params.items())):
        out[lname] = {}
        for j, (dname, p) in enumerate(sorted(layer.items())):
            k1, k2 = jax.random.split(jax.random.fold_in(key, 2 * i + j))
            out[lname][dname] = {**p, "w_ih": inits.xavier_uniform()(k1, p["w_ih"].shape),
                                 "w_hh": inits.xavier_uniform()(k2, p["w_hh"].shape)}
    return out


def _book_init(key, params, rnn: nn.Layer):
    """The book's initialisation of the whole model (the draws of fdl's pre-Layer
    ``init_seq2seq``: GRU biases from ``rnn.init``, then Xavier weights)."""
    ks = jax.random.split(key, 8)
    enc, dec = params["encoder"], params["decoder"]
    h, v = dec["dense"]["w"].shape
    e = enc["embedding"]["table"].shape[1]
    bound = 1.0 / np.sqrt(h)
    _, enc_rnn, _ = rnn.init(ks[0], (1, 1, e))
    _, dec_rnn, _ = rnn.init(ks[1], (1, 1, e + h))
    new_enc = {"embedding": {"table": jax.random.normal(ks[2], enc["embedding"]["table"].shape)},
               "rnn": _xavier_rnn(ks[3], enc_rnn)}
    new_dec = {"embedding": {"table": jax.random.normal(ks[4], dec["embedding"]["table"].shape)},
               "rnn": _xavier_rnn(ks[5], dec_rnn),
               "dense": {"w": inits.xavier_uniform()(ks[6], (h, v)),
                         "b": jax.random.uniform(ks[7], (v,), jnp.float32, -bound, bound)}}
    if "attention" in dec:
        new_dec["attention"] = _attention_params(jax.random.fold_in(key, 99), h)
    return {"encoder": new_enc, "decoder": new_dec}


def seq2seq(src_vocab_size: int, tgt_vocab_size: int, *, embed_size: int = 32,
            num_hiddens: int = 32, num_layers: int = 2, dropout: float = 0.1,
            attention: bool = False) -> EncoderDecoder:
    """The book's translation model (defaults: embed 32, hidden 32, 2 GRU layers, dropout
    0.1): ``encoder_decoder(seq2seq_encoder, seq2seq_decoder | attention_decoder)`` with the
    book's initialisation. Input ``(src, src_valid_len, dec_in)``, output logits (B, T, V)."""
    for name, v in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size),
                    ("embed_size", embed_size), ("num_hiddens", num_hiddens),
                    ("num_layers", num_layers)):
        nn.check_positive_int("seq2seq", name, v)
    if isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"seq2seq: dropout must be in [0, 1), got {dropout!r}")
    make_dec = attention_decoder if attention else seq2seq_decoder
    inner = encoder_decoder(
        seq2seq_encoder(src_vocab_size, embed_size, num_hiddens, num_layers, dropout),
        make_dec(tgt_vocab_size, embed_size, num_hiddens, num_layers, dropout))

    rnn = nn.gru(num_hiddens, num_layers=num_layers, dropout=dropout)

    def init(key, in_shape):
        # the children's own init gives shapes and state; the book's draws replace the params
        out, params, state = inner.init(jax.random.clone(key), in_shape)
        book = _book_init(key, params, rnn)
        if jax.tree_util.tree_structure(book) != jax.tree_util.tree_structure(params):
            raise AssertionError("seq2seq: the book's initialisation misses params")
        return out, book, state

    config = {"src_vocab_size": src_vocab_size, "tgt_vocab_size": tgt_vocab_size,
              "embed_size": embed_size, "num_hiddens": num_hiddens, "num_layers": num_layers,
              "dropout": dropout, "attention": attention}
    return EncoderDecoder(init, inner.apply, name="seq2seq", children=inner.children,
                          config=config, encoder=inner.encoder, decoder=inner.decoder)


# ----------------------------------------------------------------------------- loss


def masked_softmax_ce_loss(logits: jax.Array, labels: jax.Array, valid_len: jax.Array
                           ) -> jax.Array:
    """d2l's ``MaskedSoftmaxCELoss``: per-sequence cross-entropy averaged over *all* ``T``
    positions with positions ``>= valid_len`` zeroed. ``logits (B, T, V)``, ``labels (B, T)``,
    ``valid_len (B,)`` -> ``(B,)``."""
    mask = padding_mask(valid_len, labels.shape[1]).astype(logits.dtype)
    per_tok = softmax_cross_entropy(logits, labels, weights=mask, reduction="none")
    return per_tok.mean(axis=1)


def sequence_loss(logits: jax.Array, targets: tuple[jax.Array, jax.Array]) -> jax.Array:
    """A ``fit`` loss: ``targets = (labels (B, T), valid_len (B,))`` -> per-sequence
    :func:`masked_softmax_ce_loss` ``(B,)``."""
    labels, valid_len = targets
    return masked_softmax_ce_loss(logits, labels, valid_len)


def teacher_forcing_inputs(y: jax.Array, bos_id: int) -> jax.Array:
    """The decoder input of teacher forcing: ``[<bos>, y[:, :-1]]``."""
    y = jnp.asarray(y)
    return jnp.concatenate([jnp.full((y.shape[0], 1), bos_id, y.dtype), y[:, :-1]], axis=1)


# ----------------------------------------------------------------------------- decoding


def translate(model: EncoderDecoder, params, src: jax.Array, src_valid_len: jax.Array, *,
              bos_id: int, eos_id: int, max_len: int, beam_size: int = 1, alpha: float = 0.75,
              state: dict | None = None) -> DecodeResult:
    """Encode ``src (B, T)`` and decode greedily (``beam_size=1``) or with beam search.
    Pure and fixed-shape (``jit`` it with the model and the ints static). Returns a
    :class:`~fdl.models.sequence.decoding.DecodeResult`; ``aux`` is the attention weights
    ``(B, max_len, T)`` for the attention decoder, else ``None``."""
    dec_state = model.encode(params, state or {}, src, src_valid_len)
    record = ((lambda s: s["attention_weights"])
              if "attention_weights" in model.decoder.state_keys else None)
    if beam_size == 1:
        return greedy_search(model.decoder, params["decoder"], dec_state, bos_id=bos_id,
                             eos_id=eos_id, max_len=max_len, record=record)
    return beam_search(model.decoder, params["decoder"], dec_state, beam_size=beam_size,
                       bos_id=bos_id, eos_id=eos_id, max_len=max_len, alpha=alpha,
                       record=record)


_translate_jit = jax.jit(translate, static_argnames=("model", "bos_id", "eos_id", "max_len",
                                                     "beam_size", "alpha"))


def predict_seq2seq(model: EncoderDecoder, params, sentences: str | Iterable[str], src_vocab,
                    tgt_vocab, num_steps: int, *, beam_size: int = 1, alpha: float = 0.75
                    ) -> tuple[list[str], np.ndarray | None]:
    """The book's ``predict_seq2seq`` for one or several (already preprocessed, space-
    separated) source sentences: lower-cased, ``<eos>`` appended, truncated/padded to
    ``num_steps``; decoded for at most ``num_steps`` tokens, stopping at ``<eos>``.
    Returns ``(translations, attention weights (n, num_steps, num_steps) or None)``."""
    sentences = [sentences] if isinstance(sentences, str) else list(sentences)
    pad, eos = src_vocab["<pad>"], src_vocab["<eos>"]
    rows, lens = [], []
    for s in sentences:
        toks = src_vocab[s.lower().split(" ")] + [eos]
        lens.append(min(len(toks), num_steps))
        rows.append(truncate_pad(toks, num_steps, pad))
    res = _translate_jit(model, params, jnp.asarray(rows, jnp.int32),
                         jnp.asarray(lens, jnp.int32), bos_id=tgt_vocab["<bos>"],
                         eos_id=tgt_vocab["<eos>"], max_len=num_steps, beam_size=beam_size,
                         alpha=alpha)
    toks, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
    out = [" ".join(tgt_vocab.to_tokens(toks[i, : lengths[i]].tolist()))
           for i in range(len(sentences))]
    return out, (None if res.aux is None else np.asarray(res.aux))
