"""HuggingFace BERT weights <-> fdl's BERT (:mod:`fdl.models.sequence.bert`), both ways.

- :func:`config_from_hf`: a ``transformers.BertConfig`` (or its ``to_dict()``, or a
  ``config.json`` path) -> :class:`~fdl.models.sequence.bert.BertConfig`.
- :func:`from_hf_bert`: a ``BertModel`` or ``BertForPreTraining`` state dict (a dict of arrays or
  torch tensors, or a ``.safetensors`` file) -> fdl params for :func:`bert_encoder` (keys
  ``embeddings.*``/``encoder.*``/``pooler.*``, optionally under ``bert.``) or, when the ``cls.*``
  heads are present, for :func:`bert_pretraining`. Fine-tuned models too:
  ``BertForSequenceClassification`` / ``BertForTokenClassification`` (``classifier.*``) and
  ``BertForQuestionAnswering`` (``qa_outputs.*``) -> ``{"bert", "head"}`` params for
  :func:`bert_classifier` / :func:`bert_tagger` / :func:`bert_qa` (the last two have no pooler
  in HF: fdl's unused pooler params are then zeros).
- :func:`to_hf_bert`: fdl params -> a flat HF-named ``{name: np.ndarray}`` state dict
  (``cls.predictions.decoder.weight`` is the token table when the decoder is tied; a
  fine-tuning ``"head"`` as ``classifier.*`` or ``qa_outputs.*``), which
  HF's ``load_state_dict`` accepts; ``from_hf_bert(to_hf_bert(p))`` round-trips exactly.

Conversions: PyTorch ``Linear.weight (out, in)`` is transposed to fdl's ``(in, out)``; the
separate query/key/value projections are concatenated into the fused ``qkv`` kernel
(``[q | k | v]`` columns) and split back on export; LayerNorm ``weight/bias`` are
``scale/offset``. A state dict that does not fit the config raises
:class:`~fdl.interop.state_dict.StateDictError` listing every missing, unexpected and
mis-shaped key (expected vs given shape) at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fdl.interop.state_dict import StateDictError, load_state_dict
from fdl.models.sequence.bert import BertConfig

__all__ = ["config_from_hf", "from_hf_bert", "to_hf_bert", "hf_bert_shapes"]

_IGNORED = ("embeddings.position_ids",)


def config_from_hf(hf_config: Any, **overrides) -> BertConfig:
    """fdl :class:`BertConfig` from a HF ``BertConfig``, its dict or a ``config.json`` path.
    Only absolute position embeddings are supported; ``overrides`` replace fields."""
    if isinstance(hf_config, (str, os.PathLike)):
        with open(hf_config) as f:
            hf_config = json.load(f)
    c = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    pos = c.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"config_from_hf: position_embedding_type {pos!r} is not supported "
                         "(only 'absolute')")
    act = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
           "gelu_pytorch_tanh": "gelu_tanh"}.get(c.get("hidden_act", "gelu"))
    if act is None:
        raise ValueError(f"config_from_hf: hidden_act {c.get('hidden_act')!r} is not supported "
                         "(gelu, relu, gelu_new, gelu_pytorch_tanh)")
    kw = dict(vocab_size=c["vocab_size"], num_hiddens=c["hidden_size"],
              ffn_hiddens=c["intermediate_size"], num_heads=c["num_attention_heads"],
              num_layers=c["num_hidden_layers"], max_len=c["max_position_embeddings"],
              type_vocab_size=c.get("type_vocab_size", 2),
              dropout=c.get("hidden_dropout_prob", 0.1), activation=act,
              eps=c.get("layer_norm_eps", 1e-12), init_std=c.get("initializer_range", 0.02),
              tie_mlm_decoder=c.get("tie_word_embeddings", True))
    kw.update(overrides)
    return BertConfig(**kw)


def _check_hf_style(cfg: BertConfig) -> None:
    if not (cfg.embedding_norm and cfg.use_bias):
        raise ValueError("HF BERT has an embedding LayerNorm and attention biases: use a config "
                         "with embedding_norm=True and use_bias=True (e.g. config_from_hf)")


_HEADS = {"classifier": "classifier", "qa_outputs": "qa_outputs"}


def hf_bert_shapes(cfg: BertConfig, pretraining: bool = True, head: tuple[str, int] | None = None,
                   pooler: bool = True) -> dict[str, tuple[int, ...]]:
    """Every HF state-dict name (with the ``bert.`` prefix) and its shape for ``cfg``; with
    ``head = (name, outputs)`` (``("classifier", num_labels)`` or ``("qa_outputs", 2)``) the
    fine-tuning head instead of the pretraining heads."""
    d, f, v = cfg.num_hiddens, cfg.ffn_hiddens, cfg.vocab_size
    s = {"bert.embeddings.word_embeddings.weight": (v, d),
         "bert.embeddings.position_embeddings.weight": (cfg.max_len, d),
         "bert.embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
         "bert.embeddings.LayerNorm.weight": (d,), "bert.embeddings.LayerNorm.bias": (d,)}
    if pooler:
        s["bert.pooler.dense.weight"], s["bert.pooler.dense.bias"] = (d, d), (d,)
    for i in range(cfg.num_layers):
        p = f"bert.encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            s[p + n + ".weight"], s[p + n + ".bias"] = (d, d), (d,)
        s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"] = (f, d), (f,)
        s[p + "output.dense.weight"], s[p + "output.dense.bias"] = (d, f), (d,)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            s[p + n + ".weight"], s[p + n + ".bias"] = (d,), (d,)
    if head is not None:
        s[head[0] + ".weight"], s[head[0] + ".bias"] = (head[1], d), (head[1],)
    elif pretraining:
        s.update({"cls.predictions.bias": (v,), "cls.predictions.transform.dense.weight": (d, d),
                  "cls.predictions.transform.dense.bias": (d,),
                  "cls.predictions.transform.LayerNorm.weight": (d,),
                  "cls.predictions.transform.LayerNorm.bias": (d,),
                  "cls.predictions.decoder.weight": (v, d),
                  "cls.seq_relationship.weight": (2, d), "cls.seq_relationship.bias": (2,)})
    return s


def _normalise_names(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, a in sd.items():
        if any(k.endswith(i) for i in _IGNORED):
            continue
        if k.startswith(("embeddings.", "encoder.", "pooler.")):
            k = "bert." + k
        out[k] = a
    return out


def _head_of(sd: dict[str, np.ndarray]) -> tuple[str, int] | None:
    """The fine-tuning head in a state dict: ``(name, outputs)`` or ``None``."""
    for name in _HEADS:
        w = sd.get(name + ".weight")
        if w is not None:
            return name, int(w.shape[0])
    return None


def _validate(sd: dict[str, np.ndarray], cfg: BertConfig, pretraining: bool,
              head: tuple[str, int] | None = None, pooler: bool = True) -> None:
    want = hf_bert_shapes(cfg, pretraining, head, pooler)
    optional = {"cls.predictions.decoder.bias"}  # tied to cls.predictions.bias
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want and k not in optional]
    mismatched = [f"{k}: expected {want[k]}, got {tuple(sd[k].shape)}"
                  for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or unexpected or mismatched:
        raise StateDictError(f"BERT config (vocab {cfg.vocab_size}, hidden {cfg.num_hiddens}, "
                             f"layers {cfg.num_layers}, ffn {cfg.ffn_hiddens}, max_len "
                             f"{cfg.max_len})", missing, unexpected, mismatched)


def _dense(sd, name):
    return {"w": np.ascontiguousarray(sd[name + ".weight"].T), "b": sd[name + ".bias"]}


def _norm(sd, name):
    return {"scale": sd[name + ".weight"], "offset": sd[name + ".bias"]}


def from_hf_bert(source: Mapping[str, Any] | str | os.PathLike, cfg: BertConfig
                 ) -> dict[str, Any]:
    """fdl params from a HF BERT state dict (see the module docstring). The result has numpy
    leaves (``jax.numpy.asarray`` them or pass them to ``jit`` directly); with ``cfg.scan_layers``
    the block params are stacked."""
    _check_hf_style(cfg)
    sd = _normalise_names(load_state_dict(source))
    pretraining = any(k.startswith("cls.") for k in sd)
    head = _head_of(sd)
    pooler = "bert.pooler.dense.weight" in sd or head is None
    _validate(sd, cfg, pretraining, head, pooler)
    sd = {k: np.asarray(a, np.float32) for k, a in sd.items()}
    e, d = "bert.embeddings.", cfg.num_hiddens
    bert = {"embeddings": {"token": {"table": sd[e + "word_embeddings.weight"]},
                           "segment": {"table": sd[e + "token_type_embeddings.weight"]},
                           "position": {"table": sd[e + "position_embeddings.weight"]},
                           "norm": _norm(sd, e + "LayerNorm")},
            "pooler": (_dense(sd, "bert.pooler.dense") if pooler else
                       {"w": np.zeros((d, d), np.float32), "b": np.zeros((d,), np.float32)}),
            "blocks": {}}
    for i in range(cfg.num_layers):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (_dense(sd, p + f"attention.self.{n}") for n in ("query", "key", "value"))
        bert["blocks"][str(i)] = {
            "attention": {"qkv": {"w": np.concatenate([q["w"], k["w"], v["w"]], 1),
                                  "b": np.concatenate([q["b"], k["b"], v["b"]])},
                          "out": _dense(sd, p + "attention.output.dense")},
            "norm1": _norm(sd, p + "attention.output.LayerNorm"),
            "ffn": {"dense1": _dense(sd, p + "intermediate.dense"),
                    "dense2": _dense(sd, p + "output.dense")},
            "norm2": _norm(sd, p + "output.LayerNorm"),
        }
    if cfg.scan_layers:
        blocks = [bert["blocks"][str(i)] for i in range(cfg.num_layers)]
        import jax

        bert["blocks"] = jax.tree_util.tree_map(lambda *a: np.stack(a), *blocks)
    if head is not None:
        return {"bert": bert, "head": _dense(sd, head[0])}
    if not pretraining:
        return bert
    c = "cls.predictions."
    mlm = {"dense": _dense(sd, c + "transform.dense"), "norm": _norm(sd, c + "transform.LayerNorm"),
           "bias": sd[c + "bias"]}
    dec = sd[c + "decoder.weight"]
    if cfg.tie_mlm_decoder:
        if not np.array_equal(dec, bert["embeddings"]["token"]["table"]):
            raise ValueError("from_hf_bert: cls.predictions.decoder.weight differs from the word "
                             "embeddings but the config ties them; use tie_mlm_decoder=False")
    else:
        mlm["decoder"] = {"w": np.ascontiguousarray(dec.T)}
    return {"bert": bert, "mlm": mlm, "nsp": _dense(sd, "cls.seq_relationship")}


def _t(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32).T)


def to_hf_bert(params: Mapping[str, Any], cfg: BertConfig, *, head: str = "classifier"
               ) -> dict[str, np.ndarray]:
    """A HF-named state dict (``bert.*`` and, for pretraining params, ``cls.*``) from fdl
    params (see the module docstring). Fine-tuning params (``{"bert", "head"}``): ``head=``
    ``"classifier"`` (``bert_classifier``: ``classifier.*``), ``"tagger"`` (``bert_tagger``:
    ``classifier.*``, no pooler, as HF's ``BertForTokenClassification``) or ``"qa"``
    (``bert_qa``: ``qa_outputs.*``, no pooler)."""
    _check_hf_style(cfg)
    if head not in ("classifier", "tagger", "qa"):
        raise ValueError(f"to_hf_bert: head must be 'classifier', 'tagger' or 'qa', got "
                         f"{head!r}")
    pretraining = "bert" in params and "mlm" in params
    finetuning = "bert" in params and "head" in params
    bert = params["bert"] if "bert" in params else params
    blocks = bert["blocks"]
    if cfg.scan_layers:
        blocks = {str(i): {k: v for k, v in _index(blocks, i).items()}
                  for i in range(cfg.num_layers)}
    out: dict[str, np.ndarray] = {}

    def dense(name, p):
        out[name + ".weight"], out[name + ".bias"] = _t(p["w"]), np.asarray(p["b"], np.float32)

    def norm(name, p):
        out[name + ".weight"] = np.asarray(p["scale"], np.float32)
        out[name + ".bias"] = np.asarray(p["offset"], np.float32)

    e, emb = "bert.embeddings.", bert["embeddings"]
    out[e + "word_embeddings.weight"] = np.asarray(emb["token"]["table"], np.float32)
    out[e + "position_embeddings.weight"] = np.asarray(emb["position"]["table"], np.float32)
    out[e + "token_type_embeddings.weight"] = np.asarray(emb["segment"]["table"], np.float32)
    norm(e + "LayerNorm", emb["norm"])
    d = cfg.num_hiddens
    for i in range(cfg.num_layers):
        p, b = f"bert.encoder.layer.{i}.", blocks[str(i)]
        w, bias = np.asarray(b["attention"]["qkv"]["w"]), np.asarray(b["attention"]["qkv"]["b"])
        for j, n in enumerate(("query", "key", "value")):
            dense(p + f"attention.self.{n}", {"w": w[:, j * d:(j + 1) * d],
                                               "b": bias[j * d:(j + 1) * d]})
        dense(p + "attention.output.dense", b["attention"]["out"])
        norm(p + "attention.output.LayerNorm", b["norm1"])
        dense(p + "intermediate.dense", b["ffn"]["dense1"])
        dense(p + "output.dense", b["ffn"]["dense2"])
        norm(p + "output.LayerNorm", b["norm2"])
    if not finetuning or head == "classifier":
        dense("bert.pooler.dense", bert["pooler"])
    if finetuning:
        dense("qa_outputs" if head == "qa" else "classifier", params["head"])
    if pretraining:
        c, mlm = "cls.predictions.", params["mlm"]
        dense(c + "transform.dense", mlm["dense"])
        norm(c + "transform.LayerNorm", mlm["norm"])
        out[c + "bias"] = np.asarray(mlm["bias"], np.float32)
        out[c + "decoder.weight"] = (out[e + "word_embeddings.weight"] if cfg.tie_mlm_decoder
                                     else _t(mlm["decoder"]["w"]))
        out[c + "decoder.bias"] = out[c + "bias"]
        dense("cls.seq_relationship", params["nsp"])
    return out


def _index(tree, i):
    if isinstance(tree, Mapping):
        return {k: _index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]
