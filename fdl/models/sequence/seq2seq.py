"""Encoder–decoder (seq2seq) translation models of *Dive into Deep Learning*: the GRU
encoder–decoder ("Sequence to Sequence Learning") and the Bahdanau attention decoder ("Bahdanau
Attention"), as plain ``init``/``apply`` functions over named-dict params (DESIGN.md §2 "Complex
models").

Params::

    {"encoder": {"embedding": {"table"}, "rnn": {"l0": {"fwd": {...}}, ...}},
     "decoder": {"embedding": {"table"}, "rnn": {...}, "dense": {"w", "b"},
                 "attention": {"w_q", "w_k", "w_v"}}}      # "attention" only with attention

Encoder: embedding -> multi-layer GRU (dropout between layers, PyTorch semantics); the padding of
the source is run through the GRU as in the book (no ``valid_len`` masking in the encoder).

Plain decoder: the *context* is the encoder's final top-layer state, concatenated to every
decoder input embedding (``[embedding, context]``); the decoder GRU starts from the encoder's
final state. (d2l 2.0 keeps this context fixed while decoding; d2l 0.17's PyTorch code reused the
decoder's *current* top state at prediction time, a train/test mismatch we do not copy.)

Attention decoder: at every step the query is the decoder's previous top-layer state, the keys
and values the encoder outputs masked to the source ``valid_len``; the GRU input is
``[context, embedding]``. The attention weights of every step are returned for plotting.

Initialisation as the book's ``xavier_init_weights``: Xavier-uniform dense, attention and GRU
weight matrices (GRU biases keep PyTorch's ``U(-1/sqrt(H), 1/sqrt(H))``), ``N(0, 1)`` embeddings.

The decoder carry is batch-major (``{"h": (B, layers, H), ...}``) so that
:func:`fdl.models.sequence.decoding.beam_search` can reorder its rows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fdl.data.translation import truncate_pad
from fdl.models.sequence.decoding import DecodeResult, beam_search, greedy_search
from fdl.nn import initializers as inits
from fdl.nn.attention import additive_attention_apply, padding_mask
from fdl.nn.core import require_key
from fdl.nn.losses import softmax_cross_entropy
from fdl.nn.recurrent import gru
from fdl.optim import apply_updates

__all__ = [
    "Seq2SeqConfig",
    "apply_seq2seq",
    "decode_step",
    "decoder_apply",
    "decoder_init_carry",
    "encode",
    "init_seq2seq",
    "masked_softmax_ce_loss",
    "predict_seq2seq",
    "seq2seq_loss",
    "train_seq2seq",
    "translate",
]


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Hyperparameters (book defaults: embed 32, hidden 32, 2 GRU layers, dropout 0.1)."""

    src_vocab_size: int
    tgt_vocab_size: int
    embed_size: int = 32
    num_hiddens: int = 32
    num_layers: int = 2
    dropout: float = 0.1
    attention: bool = False

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "embed_size", "num_hiddens",
                     "num_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Seq2SeqConfig: {name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Seq2SeqConfig: dropout must be in [0, 1), got {self.dropout}")

    def rnn(self):
        return gru(self.num_hiddens, num_layers=self.num_layers, dropout=self.dropout)


def _xavier_rnn(key, params):
    """Replace every GRU weight matrix by Xavier-uniform (the book's ``xavier_init_weights``)."""
    out = {}
    for i, (lname, layer) in enumerate(sorted(params.items())):
        out[lname] = {}
        for j, (dname, p) in enumerate(sorted(layer.items())):
            k = jax.random.fold_in(key, 2 * i + j)
            k1, k2 = jax.random.split(k)
            out[lname][dname] = dict(p)
            out[lname][dname]["w_ih"] = inits.xavier_uniform()(k1, p["w_ih"].shape)
            out[lname][dname]["w_hh"] = inits.xavier_uniform()(k2, p["w_hh"].shape)
    return out


def init_seq2seq(key, cfg: Seq2SeqConfig) -> dict[str, Any]:
    """Initialise encoder and decoder params (see the module docstring for the layout)."""
    ks = jax.random.split(key, 8)
    h, e = cfg.num_hiddens, cfg.embed_size
    rnn = cfg.rnn()
    _, enc_rnn, _ = rnn.init(ks[0], (1, 1, e))
    _, dec_rnn, _ = rnn.init(ks[1], (1, 1, e + h))
    xavier = inits.xavier_uniform()
    f32 = jnp.float32
    bound = 1.0 / np.sqrt(h)
    encoder = {
        "embedding": {"table": jax.random.normal(ks[2], (cfg.src_vocab_size, e), f32)},
        "rnn": _xavier_rnn(ks[3], enc_rnn),
    }
    decoder = {
        "embedding": {"table": jax.random.normal(ks[4], (cfg.tgt_vocab_size, e), f32)},
        "rnn": _xavier_rnn(ks[5], dec_rnn),
        "dense": {"w": xavier(ks[6], (h, cfg.tgt_vocab_size)),
                  "b": jax.random.uniform(ks[7], (cfg.tgt_vocab_size,), f32, -bound, bound)},
    }
    if cfg.attention:
        ka = jax.random.split(jax.random.fold_in(key, 99), 3)
        decoder["attention"] = {
            "w_q": xavier(ka[0], (h, h)),
            "w_k": xavier(ka[1], (h, h)),
            "w_v": xavier(ka[2], (h, 1)).reshape(h),
        }
    return {"encoder": encoder, "decoder": decoder}


def _check_tokens(name: str, x, batch: int | None = None) -> None:
    if jnp.ndim(x) != 2 or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
        raise ValueError(f"{name}: expected integer tokens (batch, steps), got "
                         f"{jnp.shape(x)} {jnp.asarray(x).dtype}")
    if batch is not None and jnp.shape(x)[0] != batch:
        raise ValueError(f"{name}: batch size {jnp.shape(x)[0]} differs from {batch}")


def encode(params, cfg: Seq2SeqConfig, src: jax.Array, *, key=None, train: bool = False
           ) -> tuple[jax.Array, jax.Array]:
    """``src (B, T)`` int -> ``(outputs (B, T, H), final_state (layers, B, H))``."""
    _check_tokens("encode", src)
    x = params["encoder"]["embedding"]["table"][src]
    return cfg.rnn().apply_with_state(params["encoder"]["rnn"], x, None, key=key, train=train)


def decoder_init_carry(cfg: Seq2SeqConfig, enc_outputs: jax.Array, enc_state: jax.Array,
                       src_valid_len: jax.Array | None = None) -> dict[str, jax.Array]:
    """The decoder's initial carry (batch-major leaves): ``h (B, layers, H)`` from the encoder
    state; plain decoder: ``context (B, H)``; attention decoder: ``enc_outputs (B, T, H)`` and
    ``enc_valid_len (B,)`` (all of ``T`` if ``src_valid_len`` is None)."""
    carry = {"h": jnp.swapaxes(enc_state, 0, 1)}
    if cfg.attention:
        b, t = enc_outputs.shape[:2]
        if src_valid_len is None:
            src_valid_len = jnp.full((b,), t, jnp.int32)
        carry["enc_outputs"] = enc_outputs
        carry["enc_valid_len"] = jnp.asarray(src_valid_len, jnp.int32)
    else:
        carry["context"] = enc_state[-1]
    return carry


def _attend(params, carry, step_key, train, dropout):
    """Bahdanau context for the current decoder state: ``(context (B, H), weights (B, T))``."""
    query = carry["h"][:, -1][:, None, :]  # (B, 1, H)
    enc = carry["enc_outputs"]
    mask = padding_mask(carry["enc_valid_len"], enc.shape[1])[:, None, :]
    ctx, w = additive_attention_apply(params["attention"], query, enc, enc, mask=mask,
                                      dropout_rate=dropout, key=step_key, train=train)
    return ctx[:, 0], w[:, 0]


def decoder_apply(params, cfg: Seq2SeqConfig, carry: dict, tgt_in: jax.Array, *, key=None,
                  train: bool = False) -> tuple[jax.Array, dict, jax.Array | None]:
    """Teacher-forced decoding of ``tgt_in (B, T)`` from ``carry``.

    Returns ``(logits (B, T, V), new_carry, attention_weights (B, T, T_src) or None)``.
    """
    _check_tokens("decoder_apply", tgt_in, carry["h"].shape[0])
    dp = params["decoder"]
    rnn = cfg.rnn()
    if train and cfg.dropout > 0:
        require_key("seq2seq decoder", key)
    emb = dp["embedding"]["table"][tgt_in]  # (B, T, E)
    if not cfg.attention:
        h0 = jnp.swapaxes(carry["h"], 0, 1)
        ctx = carry["context"]
        ctx = jnp.broadcast_to(ctx[:, None, :], emb.shape[:2] + ctx.shape[-1:])
        out, h_n = rnn.apply_with_state(dp["rnn"], jnp.concatenate([emb, ctx], -1), h0,
                                        key=key, train=train)
        logits = out @ dp["dense"]["w"] + dp["dense"]["b"]
        return logits, {**carry, "h": jnp.swapaxes(h_n, 0, 1)}, None

    def step(c, inp):
        x_t, t = inp
        k = None if key is None else jax.random.fold_in(key, t)
        ka = None if k is None else jax.random.fold_in(k, 1)
        ctx, w = _attend(dp, c, ka, train, cfg.dropout)
        x = jnp.concatenate([ctx, x_t], -1)[:, None, :]
        out, h_n = rnn.apply_with_state(dp["rnn"], x, jnp.swapaxes(c["h"], 0, 1), key=k,
                                        train=train)
        return {**c, "h": jnp.swapaxes(h_n, 0, 1)}, (out[:, 0], w)

    steps = tgt_in.shape[1]
    carry, (outs, ws) = jax.lax.scan(step, carry, (jnp.swapaxes(emb, 0, 1), jnp.arange(steps)))
    outs = jnp.swapaxes(outs, 0, 1)
    logits = outs @ dp["dense"]["w"] + dp["dense"]["b"]
    return logits, carry, jnp.swapaxes(ws, 0, 1)


def apply_seq2seq(params, cfg: Seq2SeqConfig, src: jax.Array, src_valid_len: jax.Array,
                  tgt_in: jax.Array, *, key=None, train: bool = False
                  ) -> tuple[jax.Array, jax.Array | None]:
    """Full teacher-forced pass: ``(logits (B, T_tgt, V), attention weights or None)``."""
    k_enc = None if key is None else jax.random.fold_in(key, 0)
    k_dec = None if key is None else jax.random.fold_in(key, 1)
    enc_out, enc_state = encode(params, cfg, src, key=k_enc, train=train)
    carry = decoder_init_carry(cfg, enc_out, enc_state, src_valid_len)
    logits, _, w = decoder_apply(params, cfg, carry, tgt_in, key=k_dec, train=train)
    return logits, w


def masked_softmax_ce_loss(logits: jax.Array, labels: jax.Array, valid_len: jax.Array
                           ) -> jax.Array:
    """d2l's ``MaskedSoftmaxCELoss``: per-sequence cross-entropy averaged over *all* ``T``
    positions with positions ``>= valid_len`` zeroed. ``logits (B, T, V)``, ``labels (B, T)``,
    ``valid_len (B,)`` -> ``(B,)``."""
    mask = padding_mask(valid_len, labels.shape[1]).astype(logits.dtype)
    per_tok = softmax_cross_entropy(logits, labels, weights=mask, reduction="none")
    return per_tok.mean(axis=1)


def seq2seq_loss(params, cfg: Seq2SeqConfig, batch, bos_id: int, *, key=None,
                 train: bool = True) -> tuple[jax.Array, jax.Array]:
    """Teacher forcing: decoder input ``[<bos>, Y[:, :-1]]``. Returns ``(objective,
    summed token loss)``: the objective is the book's ``l.sum()`` (sum over the batch of
    :func:`masked_softmax_ce_loss`); dividing the second value by ``Y_valid_len.sum()`` gives
    the per-token loss the book prints."""
    x, x_len, y, y_len = batch
    bos = jnp.full((y.shape[0], 1), bos_id, y.dtype)
    dec_in = jnp.concatenate([bos, y[:, :-1]], axis=1)
    logits, _ = apply_seq2seq(params, cfg, x, x_len, dec_in, key=key, train=train)
    per_seq = masked_softmax_ce_loss(logits, y, y_len)
    return per_seq.sum(), per_seq.sum() * y.shape[1]


def _pad_batch(batch, full: int | None):
    """Pad a short final minibatch to ``full`` rows with ``valid_len = 0`` rows: they add
    nothing to the loss or the gradients (their mask is empty; a fully masked attention row is
    zero), and every step then has one shape, so the step compiles once."""
    x, x_len, y, y_len = (np.asarray(b) for b in batch)
    n = x.shape[0]
    if full is None or n >= full:
        return x, x_len, y, y_len
    extra = full - n

    def pad(a):
        return np.concatenate([a, np.broadcast_to(a[:1], (extra,) + a.shape[1:])], axis=0)

    zeros = np.zeros((extra,), x_len.dtype)
    return pad(x), np.concatenate([x_len, zeros]), pad(y), np.concatenate([y_len, zeros])


def train_seq2seq(
    params,
    cfg: Seq2SeqConfig,
    data: Any,
    optimizer: Any,
    *,
    bos_id: int,
    num_epochs: int,
    key,
    log_every: int = 10,
    log: Callable[[str], None] | None = print,
) -> tuple[Any, dict[str, list[float]]]:
    """Train with the book's loop: per minibatch, teacher-forced loss, gradients, one
    ``optimizer`` update (an fdl/optax-shaped ``(init, update)`` pair, e.g.
    ``chain(clip_by_global_norm(1), adam(0.005))``).

    ``data`` has ``batches(key)`` yielding ``(X, X_valid_len, Y, Y_valid_len)`` (see
    :func:`fdl.data.translation.load_data_nmt`); a short last minibatch is padded to
    ``data.batch_size`` with empty (``valid_len = 0``) rows, which changes no gradient.
    Returns ``(params, history)`` with per-epoch ``loss`` (per target token), ``tokens_per_s``
    and the total ``wall_s``.
    """
    opt_state = optimizer.init(params)

    def step(params, opt_state, batch, k):
        (obj, tok_loss), grads = jax.value_and_grad(
            lambda p: seq2seq_loss(p, cfg, batch, bos_id, key=k, train=True), has_aux=True
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = apply_updates(params, updates)
        return params, opt_state, tok_loss

    step = jax.jit(step)
    full = getattr(data, "batch_size", None)
    hist: dict[str, list[float]] = {"loss": [], "tokens_per_s": []}
    t_start = time.perf_counter()
    for epoch in range(num_epochs):
        k_epoch = jax.random.fold_in(key, epoch)
        t0 = time.perf_counter()
        total, tokens, pending = 0.0, 0, []
        for i, batch in enumerate(data.batches(jax.random.fold_in(k_epoch, 0))):
            tokens += int(np.asarray(batch[3]).sum())
            batch = tuple(jnp.asarray(b) for b in _pad_batch(batch, full))
            params, opt_state, tok_loss = step(params, opt_state, batch,
                                               jax.random.fold_in(k_epoch, i + 1))
            pending.append(tok_loss)
        total = float(sum(float(v) for v in pending))
        dt = time.perf_counter() - t0
        hist["loss"].append(total / max(tokens, 1))
        hist["tokens_per_s"].append(tokens / dt)
        if log is not None and ((epoch + 1) % log_every == 0 or epoch == 0):
            log(f"epoch {epoch + 1}: loss {hist['loss'][-1]:.4f}, "
                f"{hist['tokens_per_s'][-1]:.0f} tokens/s")
    hist["wall_s"] = [time.perf_counter() - t_start]
    return params, hist


def decode_step(params, cfg: Seq2SeqConfig) -> Callable:
    """A step function ``(carry, tokens (N,)) -> (logits (N, V), carry, aux)`` for
    :mod:`fdl.models.sequence.decoding` (evaluation mode). ``aux`` is the attention weights
    ``(N, T_src)`` for the attention decoder, else ``None``."""

    def step(carry, tokens):
        logits, carry, w = decoder_apply(params, cfg, carry, tokens[:, None], train=False)
        return logits[:, 0], carry, (None if w is None else w[:, 0])

    return step


def translate(params, cfg: Seq2SeqConfig, src: jax.Array, src_valid_len: jax.Array, *,
              bos_id: int, eos_id: int, max_len: int, beam_size: int = 1,
              alpha: float = 0.75) -> DecodeResult:
    """Encode ``src (B, T)`` and decode greedily (``beam_size=1``) or with beam search.
    Pure and fixed-shape: ``jax.jit(translate, static_argnames=(...))`` works. Returns a
    :class:`~fdl.models.sequence.decoding.DecodeResult` (``aux`` = attention weights
    ``(B, max_len, T)`` for the attention decoder)."""
    enc_out, enc_state = encode(params, cfg, src)
    carry = decoder_init_carry(cfg, enc_out, enc_state, src_valid_len)
    step = decode_step(params, cfg)
    b = src.shape[0]
    if beam_size == 1:
        return greedy_search(step, carry, b, bos_id=bos_id, eos_id=eos_id, max_len=max_len)
    return beam_search(step, carry, b, beam_size=beam_size, bos_id=bos_id, eos_id=eos_id,
                       max_len=max_len, alpha=alpha)


_translate_jit = jax.jit(translate, static_argnames=("cfg", "bos_id", "eos_id", "max_len",
                                                     "beam_size", "alpha"))


def predict_seq2seq(params, cfg: Seq2SeqConfig, sentences: str | Iterable[str], src_vocab,
                    tgt_vocab, num_steps: int, *, beam_size: int = 1, alpha: float = 0.75
                    ) -> tuple[list[str], np.ndarray | None]:
    """The book's ``predict_seq2seq`` for one or several (already preprocessed, space-
    separated) source sentences: lower-cased, ``<eos>`` appended, truncated/padded to
    ``num_steps``; decoded for at most ``num_steps`` tokens, stopping at ``<eos>``.
    Returns ``(translations, attention weights (n, num_steps, num_steps) or None)``."""
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    pad, eos = src_vocab["<pad>"], src_vocab["<eos>"]
    rows, lens = [], []
    for s in sentences:
        toks = src_vocab[s.lower().split(" ")] + [eos]
        lens.append(min(len(toks), num_steps))
        rows.append(truncate_pad(toks, num_steps, pad))
    src = jnp.asarray(rows, jnp.int32)
    res = _translate_jit(params, cfg, src, jnp.asarray(lens, jnp.int32),
                         bos_id=tgt_vocab["<bos>"], eos_id=tgt_vocab["<eos>"],
                         max_len=num_steps, beam_size=beam_size, alpha=alpha)
    toks, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
    out = [" ".join(tgt_vocab.to_tokens(toks[i, : lengths[i]].tolist()))
           for i in range(len(sentences))]
    return out, (None if res.aux is None else np.asarray(res.aux))
