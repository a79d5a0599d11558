"""BERT (d2l "Bidirectional Encoder Representations from Transformers"; HF ``BertModel``).

- :func:`bert_encoder`: ``x = (tokens (B, T), segments (B, T), valid_lens (B,)) -> (encoded
  (B, T, d), pooled (B, d))``: token + segment + learned position embeddings (+ LayerNorm with
  ``embedding_norm``), post-LN encoder blocks, the pooler ``tanh(dense(encoded[:, 0]))`` on
  ``<cls>`` (d2l's NSP "hidden" layer).
- :func:`bert_pretraining`: adds the MLM head on the **gathered masked positions only**
  (``dense -> act -> LayerNorm -> decoder + bias``, the decoder **tied** to the token embedding
  via ``nn.shared("bert/embeddings/token", nn.attend_embedding())``) and NSP (``dense(2)`` on the
  pooled ``<cls>``). ``x = (tokens, segments, valid_lens, pred_positions (B, P))`` ->
  :class:`BertOutput` ``(encoded, mlm_logits (B, P, V), nsp_logits (B, 2), pooled)``.
- Fine-tuning heads: :func:`bert_classifier` (on the pooled ``<cls>``), :func:`bert_tagger`
  (per token), :func:`bert_qa` (extractive QA start/end logits). Their params are
  ``{"bert": <bert_encoder params>, "head": ...}``: load pretrained ``"bert"`` params into them.

Params mirror HuggingFace's layout (``fdl.interop.hf_bert`` converts both ways):
``{"bert": {"embeddings": {"token", "segment", "position", ["norm"]}, "blocks": {"0": {
"attention": {"qkv", "out"}, "norm1", "ffn": {"dense1", "dense2"}, "norm2"}, ...}, "pooler"},
"mlm": {"dense", "norm", "bias", ["decoder"] (untied)}, "nsp"}``.

:class:`BertConfig` presets: :meth:`BertConfig.d2l` (the book's model: ReLU, LayerNorm eps
1e-5, no embedding LayerNorm, no attention biases, N(0, 1) embeddings) and the default
HuggingFace-style config (GELU, eps 1e-12, embedding LayerNorm, N(0, 0.02) init).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fdl.models.sequence.transformer import cast_floating, check_compute_dtype, check_tokens
from fdl.nn import initializers as inits
from fdl.nn.core import (
    Layer,
    ShapeError,
    apply_child,
    check_positive_int,
    child_key,
    init_child,
    shared,
)
from fdl.nn.embedding import attend_embedding, embedding
from fdl.nn.linear import dense
from fdl.nn.losses import softmax_cross_entropy
from fdl.nn.norm import layer_norm
from fdl.nn.transformer import ACTIVATIONS, _dropout, block_stack, encoder_block

__all__ = [
    "BertConfig",
    "BertOutput",
    "bert_encoder",
    "bert_pretraining",
    "bert_classifier",
    "bert_tagger",
    "bert_qa",
    "pretraining_loss",
    "pretraining_objective",
    "gather_positions",
    "ENCODER_INPUTS",
    "PRETRAINING_INPUTS",
    "PRETRAINING_TARGETS",
]

#: the names (and tuple order) of the inputs: ``x`` is a tuple in this order or a dict with
#: these keys (``valid_lens`` and ``pred_positions`` may be missing: no padding / no MLM head)
ENCODER_INPUTS = ("tokens", "segments", "valid_lens")
PRETRAINING_INPUTS = (*ENCODER_INPUTS, "pred_positions")
#: the pretraining targets of :func:`pretraining_objective` (tuple order or dict keys), as
#: :func:`fdl.data.bert.bert_pretraining_data` names its arrays
PRETRAINING_TARGETS = ("mlm_labels", "mlm_weights", "nsp_labels")


def _fields(x, names: tuple[str, ...], where: str, required: int = 2) -> tuple:
    """``x`` (a tuple in ``names`` order or a dict with those keys; the first ``required``
    keys must be present, the others default to ``None``) as a tuple in ``names`` order."""
    if isinstance(x, Mapping):
        missing = [n for n in names[:required] if n not in x]
        if missing:
            raise ShapeError(where, f"the input dict needs the keys {list(names)} (the last "
                             f"{len(names) - required} optional); missing {missing}, got "
                             f"{sorted(x)}")
        return tuple(x.get(n) for n in names)
    if isinstance(x, (tuple, list)) and len(x) == len(names):
        return tuple(x)
    got = f"a {type(x).__name__} of {len(x)}" if isinstance(x, (tuple, list)) else repr(x)
    raise ShapeError(where, f"expected ({', '.join(names)}) as a tuple or a dict with those "
                     f"keys, got {got}")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyperparameters (HF names in brackets). Checked eagerly: sizes >= 1, ``num_heads``
    dividing ``num_hiddens``, rates in ``[0, 1)``, a known activation."""

    vocab_size: int
    num_hiddens: int = 768  # hidden_size
    ffn_hiddens: int = 3072  # intermediate_size
    num_heads: int = 12  # num_attention_heads
    num_layers: int = 12  # num_hidden_layers
    max_len: int = 512  # max_position_embeddings
    type_vocab_size: int = 2
    dropout: float = 0.1  # hidden_dropout_prob (= attention_probs_dropout_prob here)
    activation: str = "gelu"  # hidden_act
    eps: float = 1e-12  # layer_norm_eps
    embedding_norm: bool = True
    use_bias: bool = True
    init_std: float | None = 0.02  # initializer_range; None: the layers' PyTorch defaults
    tie_mlm_decoder: bool = True
    scan_layers: bool = False
    remat: bool | str = False  # True or a policy name: fdl.nn.remat on every block
    compute_dtype: Any = None  # None, "bfloat16", jnp.bfloat16, ... (COMPUTE_DTYPES)

    def __post_init__(self):
        for n in ("vocab_size", "num_hiddens", "ffn_hiddens", "num_heads", "num_layers",
                  "max_len", "type_vocab_size"):
            check_positive_int("BertConfig", n, getattr(self, n))
        if self.num_hiddens % self.num_heads:
            raise ValueError(f"BertConfig: num_hiddens ({self.num_hiddens}) must be divisible "
                             f"by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertConfig: dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "compute_dtype",
                           check_compute_dtype("BertConfig", self.compute_dtype))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BertConfig: activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{self.activation!r}")

    @classmethod
    def d2l(cls, vocab_size: int, num_hiddens: int = 128, ffn_hiddens: int = 256,
            num_heads: int = 2, num_layers: int = 2, max_len: int = 1000, dropout: float = 0.2,
            **kw) -> BertConfig:
        """The book's ``BERTModel`` (defaults: its small pretraining model)."""
        base = dict(activation="relu", eps=1e-5, embedding_norm=False, use_bias=False,
                    init_std=None)
        base.update(kw)
        return cls(vocab_size, num_hiddens, ffn_hiddens, num_heads, num_layers, max_len,
                   dropout=dropout, **base)


class BertOutput(NamedTuple):
    """``encoded (B, T, d)``, ``mlm_logits (B, P, V)`` (None without positions),
    ``nsp_logits (B, 2)``, ``pooled (B, d)``."""

    encoded: jax.Array
    mlm_logits: jax.Array | None
    nsp_logits: jax.Array
    pooled: jax.Array


def _w_init(cfg: BertConfig):
    return None if cfg.init_std is None else inits.normal(cfg.init_std)


def _init_children(children, key, shapes, params=None):
    params = {} if params is None else params
    for i, (name, layer) in enumerate(children):
        _, p, _ = init_child(name, layer, child_key(key, i), shapes[name])
        if p:
            params[name] = p
    return params


def _embeddings(cfg: BertConfig) -> Layer:
    """``(tokens, segments) -> (B, T, d)``: the sum of three lookups (+ LayerNorm), dropout."""
    d, std = cfg.num_hiddens, cfg.init_std
    emb_init = inits.normal(1.0 if std is None else std)
    children = [("token", embedding(cfg.vocab_size, d, w_init=emb_init)),
                ("segment", embedding(cfg.type_vocab_size, d, w_init=emb_init)),
                ("position", embedding(cfg.max_len, d, w_init=emb_init))]
    if cfg.embedding_norm:
        children.append(("norm", layer_norm(eps=cfg.eps)))
    children = tuple(children)
    kids = dict(children)

    def init(key, in_shape):
        tok, _ = in_shape
        h = (*tuple(tok), d)
        params = _init_children(children, key, {"token": tok, "segment": tok,
                                                "position": tok, "norm": h})
        return h, params, {}

    def apply(params, state, x, *, key=None, train=False):
        tokens, segments = x
        t = tokens.shape[1]
        if t > cfg.max_len:
            raise ShapeError("bert_embeddings", f"sequence length {t} exceeds max_len "
                             f"{cfg.max_len}")
        check_tokens(tokens, cfg.vocab_size, cfg.max_len, "bert: tokens")
        check_tokens(segments, cfg.type_vocab_size, None, "bert: segments")
        e = (params["token"]["table"][tokens] + params["segment"]["table"][segments]
             + params["position"]["table"][None, :t])
        if cfg.embedding_norm:
            e, _ = apply_child("norm", kids["norm"], params["norm"], {}, e)
        return _dropout(e, cfg.dropout, key, train, "bert_embeddings"), state

    return Layer(init, apply, name="bert_embeddings", children=children)


def bert_encoder(cfg: BertConfig) -> Layer:
    """HF ``BertModel``: ``(tokens, segments, valid_lens) -> (encoded (B, T, d), pooled
    (B, d))``. ``valid_lens`` ``(B,)`` masks the padding keys (``None``: no padding). ``x`` is
    a tuple or a dict with those keys (:data:`ENCODER_INPUTS`)."""
    w_init = _w_init(cfg)
    block = encoder_block(cfg.num_heads, cfg.num_hiddens, cfg.ffn_hiddens, dropout=cfg.dropout,
                          activation=cfg.activation, use_bias=cfg.use_bias, eps=cfg.eps)
    children = (("embeddings", _embeddings(cfg)),
                ("blocks", block_stack(block, cfg.num_layers, scan=cfg.scan_layers,
                                       remat=cfg.remat)),
                ("pooler", dense(cfg.num_hiddens, w_init=w_init)))
    kids = dict(children)

    def init(key, in_shape):
        tok = _fields(in_shape, ENCODER_INPUTS, "bert")[0]
        if not isinstance(tok, (tuple, list)) or len(tok) != 2:
            raise ShapeError("bert", "expected shapes (tokens (B, T), segments (B, T), "
                             f"valid_lens (B,)), got {in_shape}")
        tok = tuple(tok)
        h = (*tok, cfg.num_hiddens)
        params = _init_children(children, key, {"embeddings": (tok, tok), "blocks": h,
                                                "pooler": (tok[0], cfg.num_hiddens)})
        if cfg.init_std is not None:  # HF: every dense weight N(0, std), biases zero
            params = _normal_dense(params, key, cfg.init_std)
        return (h, (tok[0], cfg.num_hiddens)), params, {}

    def apply(params, state, x, *, key=None, train=False):
        tokens, segments, valid_lens = _fields(x, ENCODER_INPUTS, "bert")
        params = cast_floating(params, cfg.compute_dtype)
        e, _ = apply_child("embeddings", kids["embeddings"], params["embeddings"], {},
                           (tokens, segments), key=child_key(key, 0), train=train)
        (h, _), _ = apply_child("blocks", kids["blocks"], params["blocks"], {},
                                e.astype(cfg.compute_dtype or e.dtype), key=child_key(key, 1),
                                train=train, valid_lens=valid_lens)
        pooled, _ = apply_child("pooler", kids["pooler"], params["pooler"], {}, h[:, 0])
        return (h, jnp.tanh(pooled)), state

    return Layer(init, apply, name="bert", children=children, config={"cfg": cfg})


def _normal_dense(params, key, std):
    """Re-draw every attention/FFN dense kernel as N(0, std) (HF's ``_init_weights``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        names = [getattr(p, "key", "") for p in path]
        if names[-1] == "w" and leaf.ndim >= 2:
            leaf = std * jax.random.normal(jax.random.fold_in(key, 1000 + i), leaf.shape,
                                           leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def gather_positions(encoded: jax.Array, positions: jax.Array) -> jax.Array:
    """``encoded (B, T, d)``, ``positions (B, P)`` int -> ``(B, P, d)`` (d2l's
    ``masked_X = X[batch_idx, pred_positions]``)."""
    return jnp.take_along_axis(encoded, positions[..., None].astype(jnp.int32), axis=1)


def _mlm_head(cfg: BertConfig) -> Layer:
    """``(B, P, d) -> (B, P, V)``: dense, activation, LayerNorm, decoder (tied or not) + bias."""
    w_init = _w_init(cfg)
    decoder = (shared("bert/embeddings/token", attend_embedding()) if cfg.tie_mlm_decoder
               else dense(cfg.vocab_size, use_bias=False, w_init=w_init))
    children = (("dense", dense(cfg.num_hiddens, w_init=w_init)),
                ("norm", layer_norm(eps=cfg.eps)), ("decoder", decoder))
    kids = dict(children)
    act = ACTIVATIONS[cfg.activation]

    def init(key, in_shape):
        params = _init_children(children, key, {n: tuple(in_shape) for n, _ in children})
        params["bias"] = jnp.zeros((cfg.vocab_size,), jnp.float32)
        return (*tuple(in_shape[:-1]), cfg.vocab_size), params, {}

    def apply(params, state, x, *, key=None, train=False):
        h, _ = apply_child("dense", kids["dense"], params["dense"], {}, x)
        h, _ = apply_child("norm", kids["norm"], params["norm"], {}, act(h))
        y, _ = apply_child("decoder", kids["decoder"], params.get("decoder", {}), {}, h)
        return y + params["bias"].astype(y.dtype), state

    return Layer(init, apply, name="bert_mlm", children=children)


def bert_pretraining(cfg: BertConfig) -> Layer:
    """HF ``BertForPreTraining`` / d2l's ``BERTModel``: ``x = (tokens (B, T), segments (B, T),
    valid_lens (B,), pred_positions (B, P) or None)`` (or a dict with those keys,
    :data:`PRETRAINING_INPUTS`) -> :class:`BertOutput`. The MLM head runs on the gathered
    positions only; logits are float32. Train it with ``fdl.train.fit(...,
    loss=pretraining_objective())``."""
    children = (("bert", bert_encoder(cfg)), ("mlm", _mlm_head(cfg)),
                ("nsp", dense(2, w_init=_w_init(cfg))))
    kids = dict(children)

    def init(key, in_shape):
        tok, seg, vl, pos = _fields(in_shape, PRETRAINING_INPUTS, "bert_pretraining")
        (h, pooled), pb, _ = init_child("bert", kids["bert"], child_key(key, 0),
                                        (tok, seg, vl))
        params = {"bert": pb}
        pos = tuple(pos) if pos is not None else (tok[0], 1)
        mlm_out, params["mlm"], _ = init_child("mlm", kids["mlm"], child_key(key, 1),
                                               (*pos, cfg.num_hiddens))
        nsp_out, params["nsp"], _ = init_child("nsp", kids["nsp"], child_key(key, 2), pooled)
        return BertOutput(h, mlm_out, nsp_out, pooled), params, {}

    def apply(params, state, x, *, key=None, train=False):
        tokens, segments, valid_lens, positions = _fields(x, PRETRAINING_INPUTS,
                                                          "bert_pretraining")
        (h, pooled), _ = apply_child("bert", kids["bert"], params["bert"], {},
                                     (tokens, segments, valid_lens), key=child_key(key, 0),
                                     train=train)
        mlm = None
        if positions is not None:
            mp = cast_floating(params["mlm"], cfg.compute_dtype)
            mlm, _ = apply_child("mlm", kids["mlm"], mp, {}, gather_positions(h, positions))
            mlm = mlm.astype(jnp.float32)
        nsp, _ = apply_child("nsp", kids["nsp"], cast_floating(params["nsp"], cfg.compute_dtype),
                             {}, pooled)
        return BertOutput(h, mlm, nsp.astype(jnp.float32), pooled), state

    return Layer(init, apply, name="bert_pretraining", children=children, config={"cfg": cfg})


def pretraining_loss(out: BertOutput, mlm_labels: jax.Array, mlm_weights: jax.Array,
                     nsp_labels: jax.Array, mask: jax.Array | None = None
                     ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """d2l's ``_get_batch_loss_bert``: MLM cross-entropy averaged over the real (weight 1)
    predicted positions, plus the mean NSP cross-entropy. ``mask (B,)`` (optional, 1 = a real
    example) drops padding rows from both means. Returns ``(mlm + nsp, (mlm, nsp))``."""
    rows = jnp.ones(nsp_labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    w = mlm_weights.astype(jnp.float32) * rows[:, None]
    ce = softmax_cross_entropy(out.mlm_logits.astype(jnp.float32),
                               mlm_labels.astype(jnp.int32), weights=w, reduction="none")
    mlm = jnp.sum(ce) / (jnp.sum(w) + 1e-8)
    nce = softmax_cross_entropy(out.nsp_logits.astype(jnp.float32),
                                nsp_labels.astype(jnp.int32), weights=rows, reduction="none")
    nsp = jnp.sum(nce) / jnp.maximum(jnp.sum(rows), 1.0)
    return mlm + nsp, (mlm, nsp)


def pretraining_objective():
    """``fdl.train.fit``'s loss for :func:`bert_pretraining`: minimises
    :func:`pretraining_loss` (MLM mean + NSP mean) and reports ``mlm`` and ``nsp`` as the
    mean over batches of each batch's loss (the numbers d2l prints), next to ``loss``.
    Targets ``y``: ``(mlm_labels (B, P), mlm_weights (B, P), nsp_labels (B,))`` or a dict with
    those keys (:data:`PRETRAINING_TARGETS`, the names of
    :func:`fdl.data.bert.bert_pretraining_data`'s arrays)."""
    from fdl.train.metrics import Objective

    def fn(out, y, mask):
        labels, weights, nsp_labels = _fields(y, PRETRAINING_TARGETS, "pretraining_objective",
                                              required=3)
        total, (mlm, nsp) = pretraining_loss(out, labels, weights, nsp_labels, mask)
        return total, {"mlm": (mlm, 1.0), "nsp": (nsp, 1.0)}

    return Objective(fn)


def _finetune(cfg: BertConfig, head: Layer, use_pooled: bool, dropout: float, name: str,
              post=None) -> Layer:
    children = (("bert", bert_encoder(cfg)), ("head", head))
    kids = dict(children)

    def init(key, in_shape):
        shapes = _fields(in_shape, ENCODER_INPUTS, name)
        (h, pooled), pb, _ = init_child("bert", kids["bert"], child_key(key, 0), shapes)
        out, ph, _ = init_child("head", head, child_key(key, 1), pooled if use_pooled else h)
        return (post[1](out) if post else out), {"bert": pb, "head": ph}, {}

    def apply(params, state, x, *, key=None, train=False):
        (h, pooled), _ = apply_child("bert", kids["bert"], params["bert"], {}, x,
                                     key=child_key(key, 0), train=train)
        z = _dropout(pooled if use_pooled else h, dropout, child_key(key, 1), train, name)
        y, _ = apply_child("head", head, cast_floating(params["head"], cfg.compute_dtype), {}, z)
        y = y.astype(jnp.float32)
        return (post[0](y) if post else y), state

    return Layer(init, apply, name=name, children=children, config={"cfg": cfg})


def bert_classifier(cfg: BertConfig, num_classes: int, *, dropout: float | None = None
                    ) -> Layer:
    """Sequence classification on the pooled ``<cls>`` (HF ``BertForSequenceClassification``,
    d2l's ``BERTClassifier``): ``(tokens, segments, valid_lens) -> logits (B, num_classes)``."""
    check_positive_int("bert_classifier", "num_classes", num_classes)
    return _finetune(cfg, dense(num_classes, w_init=_w_init(cfg)), True,
                     cfg.dropout if dropout is None else dropout, "bert_classifier")


def bert_tagger(cfg: BertConfig, num_tags: int, *, dropout: float | None = None) -> Layer:
    """Token tagging (HF ``BertForTokenClassification``): ``-> logits (B, T, num_tags)``."""
    check_positive_int("bert_tagger", "num_tags", num_tags)
    return _finetune(cfg, dense(num_tags, w_init=_w_init(cfg)), False,
                     cfg.dropout if dropout is None else dropout, "bert_tagger")


def bert_qa(cfg: BertConfig) -> Layer:
    """Extractive QA (HF ``BertForQuestionAnswering``): ``-> (start_logits (B, T), end_logits
    (B, T))`` from one ``dense(2)`` per token (no dropout, as HF)."""
    post = (lambda y: (y[..., 0], y[..., 1]), lambda s: (s[:-1], s[:-1]))
    return _finetune(cfg, dense(2, w_init=_w_init(cfg)), False, 0.0, "bert_qa", post=post)
