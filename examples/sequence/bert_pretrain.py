"""Pretrain the book's small BERT (MLM + NSP) on any text and print the two losses (d2l
"Pretraining BERT": 2 layers, 128 hidden, 2 heads, FFN 256, max_len 64, batch 512, Adam lr 0.01,
50 steps; the book reports MLM 5.885 / NSP 0.760 on WikiText-2).

    python examples/sequence/bert_pretrain.py [--data ../shared/data/timemachine.txt]
        [--steps 50] [--save runs/bert_small.safetensors]

``--data``: WikiText-2's ``wiki.train.tokens`` if you have it, a plain-text book (default: The
Time Machine) or ``fra-eng.zip`` (its English side). The losses depend on the text (vocabulary
size above all), so compare with the book only on WikiText-2. As the book, the printed losses
are the means over all steps; the last step's are printed too. By default the MLM decoder is
tied to the token embedding (initialised N(0, 0.02) as BERT); ``--untied`` is the book's exact
architecture (its own decoder, N(0, 1) embeddings). ``--save`` writes the params to a
safetensors file under fdl's flat param names (``fdl.tree.flatten_dict``).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> dict:
    from fdl import optim
    from fdl.data.bert import bert_pretraining_data, read_paragraphs
    from fdl.models.sequence.bert import BertConfig, bert_pretraining, pretraining_loss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/timemachine.txt")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--untied", action="store_true",
                    help="the book's architecture: an untied MLM decoder, N(0, 1) embeddings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="write the trained params (safetensors)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    paragraphs, desc = read_paragraphs(args.data)
    arrays, vocab = bert_pretraining_data(paragraphs, args.max_len, seed=args.seed)
    n = arrays["tokens"].shape[0]
    print(f"{desc}: {len(paragraphs)} paragraphs, {n} sentence pairs, vocab {len(vocab)}")
    # tied MLM decoder (default): N(0, 0.02) init as BERT/HF (a tied decoder over N(0, 1)
    # embeddings starts with logits of std ~sqrt(d) and an MLM loss ~40); --untied: the book's
    cfg = BertConfig.d2l(len(vocab), args.hidden, args.ffn, args.heads, args.layers,
                         max_len=args.max_len, dropout=args.dropout,
                         tie_mlm_decoder=not args.untied,
                         init_std=None if args.untied else 0.02)
    model = bert_pretraining(cfg)
    b = min(args.batch_size, n)
    p = arrays["pred_positions"].shape[1]
    key = jax.random.key(args.seed)
    _, params, _ = model.init(jax.random.fold_in(key, 0),
                              ((b, args.max_len), (b, args.max_len), (b,), (b, p)))
    opt = optim.adam(args.lr)
    opt_state = opt.init(params)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch, k):
        def loss_fn(pp):
            out, _ = model.apply(pp, {}, (batch["tokens"], batch["segments"],
                                          batch["valid_lens"], batch["pred_positions"]),
                                 key=k, train=True)
            return pretraining_loss(out, batch["mlm_labels"], batch["mlm_weights"],
                                    batch["nsp_labels"])

        (_, (mlm, nsp)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optim.apply_updates(params, upd), opt_state, mlm, nsp

    rng = np.random.default_rng(args.seed)
    order, pos, hist = rng.permutation(n), 0, []
    t_train = time.perf_counter()
    for s in range(args.steps):
        if pos + b > n:  # reshuffle for the next pass (full batches only, as d2l's loader)
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + b]
        pos += b
        batch = {k: jnp.asarray(v[idx]) for k, v in arrays.items()}
        params, opt_state, mlm, nsp = step(params, opt_state, batch, jax.random.fold_in(key, s))
        hist.append((mlm, nsp))
    hist = np.asarray(jax.device_get(hist), np.float64)
    dt = time.perf_counter() - t_train
    mean = hist.mean(0)
    print(f"MLM loss {mean[0]:.3f}, NSP loss {mean[1]:.3f} (means over {args.steps} steps; "
          f"last step {hist[-1, 0]:.3f} / {hist[-1, 1]:.3f}); book on WikiText-2: 5.885 / 0.760")
    print(f"{args.steps * b / dt:.1f} sentence pairs/s, {dt:.1f} s training, "
          f"{time.perf_counter() - t0:.1f} s total")
    if args.save:
        from fdl.interop.state_dict import save_safetensors
        from fdl.tree import flatten_dict

        save_safetensors(args.save, {k: np.asarray(v) for k, v in flatten_dict(params).items()})
        print(f"params saved to {args.save}")
    return {"mlm": float(mean[0]), "nsp": float(mean[1]), "last": hist[-1].tolist(),
            "vocab": len(vocab), "pairs": n}


if __name__ == "__main__":
    main()
