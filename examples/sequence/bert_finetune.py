"""Fine-tune a small BERT for sequence classification on a task built from the shipped data:
is an English sentence of fra-eng a question? (its words only: the final punctuation is
removed, so the model must read "do you ...", "what ...", word order).

    python examples/sequence/bert_finetune.py [--data ../shared/data/fra-eng.zip]
        [--pretrain-steps 200] [--steps 300]

The encoder is first pretrained with MLM + NSP on the English side of fra-eng (the book's small
BERT, ``--pretrain-steps`` steps, skipped with 0), then its ``"bert"`` params are loaded into
:func:`~fdl.models.sequence.bert.bert_classifier` (a ``dense(2)`` head on the pooled ``<cls>``)
and the whole model is fine-tuned with Adam. Prints test accuracy on held-out sentences; run
with ``--pretrain-steps 0`` for the from-scratch baseline.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def question_task(path, vocab, max_len, n, seed):
    """Balanced (sentence without its final punctuation, is_question) examples."""
    import zipfile

    from fdl.data.bert import tokens_and_segments

    with zipfile.ZipFile(path) as zf:
        name = next(m for m in zf.namelist() if m.endswith("fra.txt"))
        lines = zf.read(name).decode("utf-8").split("\n")
    eng = [ln.split("\t")[0].strip().lower() for ln in lines if "\t" in ln]
    rng = np.random.default_rng(seed)
    q = [s for s in eng if s.endswith("?")]
    other = [s for s in eng if s.endswith((".", "!"))]
    rng.shuffle(q)
    rng.shuffle(other)
    pairs = [(s, 1) for s in q[: n // 2]] + [(s, 0) for s in other[: n // 2]]
    rng.shuffle(pairs)
    tokens = np.full((len(pairs), max_len), vocab["<pad>"], np.int32)
    valid = np.zeros((len(pairs),), np.int32)
    for i, (s, _) in enumerate(pairs):
        words = "".join(c if c.isalpha() or c == " " else " " for c in s[:-1]).split()
        toks, _ = tokens_and_segments(words[: max_len - 2])
        ids = vocab[toks]
        tokens[i, :len(ids)], valid[i] = ids, len(ids)
    return tokens, np.zeros_like(tokens), valid, np.asarray([y for _, y in pairs], np.int32)


def main(argv=None) -> dict:
    from fdl import optim
    from fdl.data.bert import bert_pretraining_data, read_fra_eng_english
    from fdl.models.sequence.bert import (
        BertConfig,
        bert_classifier,
        bert_pretraining,
        pretraining_loss,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/fra-eng.zip")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    key = jax.random.key(args.seed)
    arrays, vocab = bert_pretraining_data(read_fra_eng_english(args.data), args.max_len,
                                          seed=args.seed)
    cfg = BertConfig.d2l(len(vocab), max_len=args.max_len, dropout=0.1, init_std=0.02)
    b = args.batch_size

    def sgd_loop(loss_fn, params, batches, lr, n_steps):
        opt = optim.adam(lr)

        @partial(jax.jit, donate_argnums=(0, 1))
        def step(p, o, batch, k):
            loss, g = jax.value_and_grad(loss_fn)(p, batch, k)
            upd, o = opt.update(g, o, p)
            return optim.apply_updates(p, upd), o, loss

        o, losses = opt.init(params), []
        for s in range(n_steps):
            params, o, loss = step(params, o, batches(s), jax.random.fold_in(key, s))
            losses.append(loss)
        return params, [float(v) for v in jax.device_get(losses)]

    n = arrays["tokens"].shape[0]
    pre = bert_pretraining(cfg)
    p_slots = arrays["pred_positions"].shape[1]
    _, params, _ = pre.init(jax.random.fold_in(key, 0),
                            ((b, args.max_len), (b, args.max_len), (b,), (b, p_slots)))
    if args.pretrain_steps:
        rng = np.random.default_rng(args.seed)

        def pre_batches(s):
            idx = rng.integers(0, n, b)
            return {k: jnp.asarray(v[idx]) for k, v in arrays.items()}

        def pre_loss(p, bt, k):
            out, _ = pre.apply(p, {}, (bt["tokens"], bt["segments"], bt["valid_lens"],
                                       bt["pred_positions"]), key=k, train=True)
            return pretraining_loss(out, bt["mlm_labels"], bt["mlm_weights"], bt["nsp_labels"])[0]

        params, pl = sgd_loop(pre_loss, params, pre_batches, 0.01, args.pretrain_steps)
        print(f"pretraining ({args.pretrain_steps} steps on {n} fra-eng English pairs): MLM+NSP "
              f"loss {pl[0]:.3f} -> {pl[-1]:.3f}")
    tokens, segments, valid, labels = question_task(args.data, vocab, args.max_len,
                                                    args.examples, args.seed)
    split = int(0.8 * len(labels))
    clf = bert_classifier(cfg, 2)
    _, cparams, _ = clf.init(jax.random.fold_in(key, 1), ((b, args.max_len),) * 2 + ((b,),))
    cparams = {"bert": params["bert"], "head": cparams["head"]}  # the pretrained encoder
    rng = np.random.default_rng(args.seed + 1)

    def ft_batches(s):
        idx = rng.integers(0, split, b)
        return tuple(jnp.asarray(a[idx]) for a in (tokens, segments, valid, labels))

    def ft_loss(p, bt, k):
        logits, _ = clf.apply(p, {}, bt[:3], key=k, train=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), bt[3][:, None], 1))

    cparams, fl = sgd_loop(ft_loss, cparams, ft_batches, args.lr, args.steps)
    predict = jax.jit(lambda p, x: jnp.argmax(clf.apply(p, {}, x)[0], -1))
    test = tuple(jnp.asarray(a[split:]) for a in (tokens, segments, valid))
    acc = float(np.mean(np.asarray(predict(cparams, test)) == labels[split:]))
    how = "pretrained" if args.pretrain_steps else "from scratch"
    print(f"fine-tuning ({how}, {args.steps} steps): loss {fl[0]:.3f} -> {fl[-1]:.3f}; test "
          f"accuracy {acc:.3f} on {len(labels) - split} held-out sentences (chance 0.5); "
          f"{time.perf_counter() - t0:.1f} s")
    return {"accuracy": acc, "finetune_loss": fl}


if __name__ == "__main__":
    main()
