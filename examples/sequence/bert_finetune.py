"""Does pretraining help? Fine-tune a small BERT on a task built from the shipped data with few
labelled examples, from a pretrained encoder and from scratch, over several seeds.

    python examples/sequence/bert_finetune.py [--data ../shared/data/fra-eng.zip]
        [--pretrain-steps 400] [--save-pretrained runs/bert_fra.safetensors]
        [--pretrained runs/bert_fra.safetensors] [--train-examples 100] [--seeds 5]

Task: is an English sentence of fra-eng a question? Only its words are given (the final
punctuation is removed), so the model must read "do you ...", "what ...", word order.
Unlabelled text: the encoder is pretrained with MLM + NSP on the English side of fra-eng with
``fdl.train.fit`` (sentence-final punctuation is stripped there too, so pretraining never sees
the label); ``--pretrained`` loads an encoder saved by ``--save-pretrained`` instead.
Fine-tuning: :func:`~fdl.models.sequence.bert.bert_classifier` (a ``dense(2)`` head on the
pooled ``<cls>``) trained with ``fit`` on ``--train-examples`` labelled sentences (balanced),
evaluated on ``--test-examples`` held-out sentences that never occur in the labelled set. For
every seed (the labelled subset, head init, dropout and batch order) the same fine-tuning runs
once from the pretrained encoder and once from a random one; prints every accuracy, the mean
and standard deviation of each and of the per-seed difference. Before that it prints what
each encoder hands the classifier (:func:`encoder_health`: kernel RMS, how much the ``<cls>``
encoding differs between sentences, pooler saturation).

Pretraining uses Adam 1e-3, not the book's 0.01: 100 steps at 0.01 (batch 128) triple the
kernels' RMS and saturate a quarter of the pooler's ``tanh`` units, and an encoder pretrained
that way fine-tuned *worse* than a random one (docs/results/transformer.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
import zipfile

import jax
import numpy as np


def _pretrain_module():
    """examples/sequence/bert_pretrain.py (its fit-based pretraining and params files)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bert_pretrain.py")
    spec = importlib.util.spec_from_file_location("bert_pretrain_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_question_task(path: str) -> tuple[list[list[str]], np.ndarray]:
    """Every distinct English sentence of fra-eng ending in ``?`` (label 1) or ``.``/``!``
    (label 0), as words without punctuation (apostrophes split words as in
    :mod:`fdl.data.bert`'s readers): ``(sentences, labels)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fra-eng not found at {path!r} (cwd {os.getcwd()!r}); pass "
                                "--data ../shared/data/fra-eng.zip")
    with zipfile.ZipFile(path) as zf:
        name = next(m for m in zf.namelist() if m.endswith("fra.txt"))
        lines = zf.read(name).decode("utf-8").split("\n")
    seen, sentences, labels = set(), [], []
    for line in lines:
        if "\t" not in line:
            continue
        s = line.split("\t")[0].strip().lower()
        if not s.endswith(("?", ".", "!")):
            continue
        words = "".join(c if "a" <= c <= "z" else " " for c in s[:-1]).split()
        key = " ".join(words)
        if not words or key in seen:
            continue
        seen.add(key)
        sentences.append(words)
        labels.append(int(s.endswith("?")))
    return sentences, np.asarray(labels, np.int32)


def split_task(labels: np.ndarray, n_train: int, n_test: int, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Balanced index sets: ``n_test`` fixed test sentences (seed 0) and ``n_train``
    labelled ones drawn with ``seed`` from the rest."""
    pools = [np.flatnonzero(labels == c) for c in (0, 1)]
    rng0 = np.random.default_rng(0)
    pools = [rng0.permutation(p) for p in pools]
    test = np.concatenate([p[: n_test // 2] for p in pools])
    rest = [p[n_test // 2:] for p in pools]
    rng = np.random.default_rng(1000 + seed)
    train = np.concatenate([rng.choice(r, n_train // 2, replace=False) for r in rest])
    return rng.permutation(train), test


def encode(sentences, vocab, max_len: int) -> dict[str, np.ndarray]:
    """``<cls> words <sep>`` ids padded to ``max_len``: the encoder's dict inputs."""
    from fdl.data.bert import tokens_and_segments

    tokens = np.full((len(sentences), max_len), vocab["<pad>"], np.int32)
    valid = np.zeros((len(sentences),), np.int32)
    for i, words in enumerate(sentences):
        toks, _ = tokens_and_segments(words[: max_len - 2])
        ids = vocab[toks]
        tokens[i, :len(ids)], valid[i] = ids, len(ids)
    return {"tokens": tokens, "segments": np.zeros_like(tokens), "valid_lens": valid}


def finetune(cfg, encoder_params, x, y, x_test, y_test, *, seed: int, epochs: int,
             batch_size: int, lr: float) -> float:
    """Fine-tune ``bert_classifier`` (encoder from ``encoder_params``, or random when
    ``None``) with ``fit``; returns the held-out accuracy."""
    from fdl import optim
    from fdl.models.sequence.bert import bert_classifier
    from fdl.train import evaluate, fit

    clf = bert_classifier(cfg, 2)
    b = min(batch_size, len(y))
    shapes = {k: v.shape[1:] for k, v in x.items()}
    _, params, _ = clf.init(jax.random.key(seed), {k: (b, *s) for k, s in shapes.items()})
    if encoder_params is not None:
        params = {"bert": encoder_params, "head": params["head"]}
    res = fit(clf, params, {}, optim.adam(lr), (x, y), epochs=epochs, batch_size=b,
              key=jax.random.key(10_000 + seed), print_fn=None, progress=False)
    return evaluate(res.params, {}, (x_test, y_test), model=clf, batch_size=500)["acc"]


def encoder_health(cfg, encoder_params, x, n: int = 500) -> dict[str, float]:
    """What an encoder hands the classifier, on ``n`` sentences of ``x`` (evaluation mode):
    ``weight_rms`` (RMS of the blocks' and pooler's kernels; init is N(0, 0.02)),
    ``cls_spread`` (the share of the ``<cls>`` encodings' mean square that differs between
    sentences: near 0 = every sentence looks alike to the head), ``pooler_saturated`` (share
    of ``|tanh| > 0.99`` in the pooled output, where the pooler's gradient vanishes)."""
    from fdl.models.sequence.bert import bert_encoder
    from fdl.tree import flatten_dict

    xs = {k: v[:n] for k, v in x.items()}
    (h, pooled), _ = jax.jit(bert_encoder(cfg).apply)(encoder_params, {}, xs)
    cls = np.asarray(h[:, 0], np.float64)
    kernels = [np.asarray(v) for k, v in flatten_dict(encoder_params).items()
               if k.endswith("/w") and not k.startswith("embeddings")]
    return {"weight_rms": float(np.sqrt(np.mean(np.concatenate([a.ravel() ** 2
                                                                for a in kernels])))),
            "cls_spread": float(cls.var(0).sum() / np.mean(np.sum(cls ** 2, 1))),
            "pooler_saturated": float(np.mean(np.abs(np.asarray(pooled)) > 0.99))}


def _std(a: np.ndarray) -> float:
    return float(a.std(ddof=1)) if len(a) > 1 else 0.0


def main(argv=None) -> dict:
    from fdl.data.bert import bert_pretraining_data, read_fra_eng_english
    from fdl.models.sequence.bert import BertConfig, bert_pretraining

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/fra-eng.zip")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--pretrain-batch-size", type=int, default=128)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--pretrained", default=None,
                    help="load the pretrained params from this file (skips pretraining)")
    ap.add_argument("--save-pretrained", default=None, help="write the pretrained params")
    ap.add_argument("--train-examples", type=int, default=100)
    ap.add_argument("--test-examples", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch runs")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    pre_mod = _pretrain_module()

    arrays, vocab = bert_pretraining_data(read_fra_eng_english(args.data), args.max_len, seed=0)
    cfg = BertConfig.d2l(len(vocab), args.hidden, 2 * args.hidden, num_layers=args.layers,
                         max_len=args.max_len, dropout=0.1, init_std=0.02)
    pre = bert_pretraining(cfg)
    b = args.pretrain_batch_size
    p = arrays["pred_positions"].shape[1]
    _, params, _ = pre.init(jax.random.key(0), ((b, args.max_len),) * 2 + ((b,), (b, p)))
    if args.pretrained:
        params = pre_mod.load_params(args.pretrained, params)
        print(f"pretrained params loaded from {args.pretrained}")
    elif args.pretrain_steps:
        n = arrays["tokens"].shape[0]
        print(f"pretraining: {args.pretrain_steps} steps of batch {b} on {n} sentence pairs "
              f"(the English side of fra-eng, vocab {len(vocab)}), Adam {args.pretrain_lr}")
        res = pre_mod.pretrain(pre, params, arrays, steps=args.pretrain_steps, batch_size=b,
                               lr=args.pretrain_lr, seed=0)
        params = res.params
        if args.save_pretrained:
            pre_mod.save_params(args.save_pretrained, params)
            print(f"pretrained params saved to {args.save_pretrained}")

    sentences, labels = read_question_task(args.data)
    inputs = encode(sentences, vocab, args.max_len)
    print(f"task: {len(labels)} distinct sentences ({labels.mean():.2f} questions); "
          f"{args.train_examples} labelled, {args.test_examples} held out; fine-tuning "
          f"{args.epochs} epochs, batch {args.batch_size}, Adam {args.lr}")
    runs = {"pretrained": [], "scratch": []}
    kinds = ["pretrained"] + ([] if args.no_scratch else ["scratch"])
    _, te = split_task(labels, args.train_examples, args.test_examples, 0)
    x_health = {k: v[te] for k, v in inputs.items()}
    _, rand, _ = pre.init(jax.random.key(1), ((b, args.max_len),) * 2 + ((b,), (b, p)))
    for kind, enc in (("pretrained", params["bert"]), ("random", rand["bert"])):
        st = encoder_health(cfg, enc, x_health)
        print(f"{kind} encoder: kernel RMS {st['weight_rms']:.4f}, <cls> spread between "
              f"sentences {st['cls_spread']:.3f}, pooler |tanh| > 0.99: "
              f"{st['pooler_saturated']:.1%}")
    for seed in range(args.seeds):
        tr, te = split_task(labels, args.train_examples, args.test_examples, seed)
        x, x_test = ({k: v[idx] for k, v in inputs.items()} for idx in (tr, te))
        for kind in kinds:
            enc = params["bert"] if kind == "pretrained" else None
            acc = finetune(cfg, enc, x, labels[tr], x_test, labels[te], seed=seed,
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
            runs[kind].append(acc)
        print(f"seed {seed}: " + ", ".join(f"{k} {runs[k][-1]:.3f}" for k in kinds))
    for kind in kinds if args.seeds else ():
        a = np.asarray(runs[kind])
        print(f"{kind:10s}: held-out accuracy {a.mean():.3f} +- {_std(a):.3f} over {len(a)} "
              f"seeds (chance 0.5)")
    if runs["scratch"] and runs["pretrained"]:
        d = np.asarray(runs["pretrained"]) - np.asarray(runs["scratch"])
        print(f"pretrained - scratch: {d.mean():+.3f} +- {_std(d):.3f}; better in "
              f"{int((d > 0).sum())} of {len(d)} seeds")
    print(f"{time.perf_counter() - t0:.1f} s")
    return runs


if __name__ == "__main__":
    main()
