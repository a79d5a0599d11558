"""English -> French with the encoder-decoder transformer on fra-eng (d2l "The Transformer
Architecture"); translates the book's four test sentences (greedy and beam search, both under
``jit`` through the decoder's KV cache), prints their BLEU (k=2) and saves attention heat maps.

    python examples/sequence/transformer_mt.py --data ../shared/data/fra-eng.zip
        [--epochs 200] [--beam-size 2] [--out runs/transformer_mt]

Book settings: the first 600 pairs, num_hiddens 32, 2 blocks, 4 heads, FFN 64, dropout 0.1,
batch 64, num_steps 10, Adam lr 0.005, gradient clipping 1, 200 epochs; trained with
``fdl.train.fit`` on the book's loss (masked softmax cross-entropy, per-sequence mean, summed
over the batch). Saves ``loss.png``, ``attention_cross.png``
(decoder-encoder attention of the last block, every head, per test sentence) and
``attention_encoder.png`` (encoder self-attention) under ``--out``, each with a colour bar.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

ENGS = ["go .", "i lost .", "he's calm .", "i'm home ."]
FRAS = ["va !", "j'ai perdu .", "il est calme .", "je suis chez moi ."]


def build(args, src_vocab, tgt_vocab):
    from fdl.models.sequence.transformer import transformer

    return transformer(len(src_vocab), len(tgt_vocab), args.hidden, args.ffn, args.heads,
                       args.layers, dropout=args.dropout, max_len=max(64, args.num_steps))


def train(model, params, data, args, bos_id, key):
    """``fdl.train.fit`` with the book's objective: the per-sequence mean of the masked
    cross-entropy, summed over the batch (``loss_reduction="sum"``, tokens weighted by
    ``1 / num_steps``), clipping 1, Adam. The logged loss is that sum over the token count."""
    from fdl import optim
    from fdl.data.loader import ArrayLoader
    from fdl.train import fit, make_train_step

    opt = optim.chain(optim.clip_by_global_norm(args.clip), optim.adam(args.lr))
    t = data.tgt.shape[1]
    dec_in = np.concatenate([np.full((data.tgt.shape[0], 1), bos_id, data.tgt.dtype),
                             data.tgt[:, :-1]], 1)

    def loss(logits, y):
        tgt, tgt_len = y
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0] / t
        return ce, (jnp.arange(t) < tgt_len[:, None]).astype(ce.dtype)

    loader = ArrayLoader(((data.src, data.src_valid_len, dec_in), (data.tgt, data.tgt_valid_len)),
                         args.batch_size, key=jax.random.fold_in(key, 0), last_batch="pad")
    step = make_train_step(model, opt, loss, loss_reduction="sum")
    res = fit(model, params, {}, opt, loader, epochs=args.epochs, key=key, loss=loss,
              train_step=step, print_fn=None, progress=False)
    losses = [float(row["train_loss"]) for row in res.history.rows]
    for e, v in enumerate(losses):
        if (e + 1) % args.log_every == 0 or e == 0:
            print(f"epoch {e + 1}: loss {v:.4f}", flush=True)
    return res.params, losses


def encode_sentences(sentences, vocab, num_steps):
    from fdl.data.translation import truncate_pad

    rows, lens = [], []
    for s in sentences:
        toks = vocab[s.lower().split(" ")] + [vocab["<eos>"]]
        lens.append(min(len(toks), num_steps))
        rows.append(truncate_pad(toks, num_steps, vocab["<pad>"]))
    return jnp.asarray(rows, jnp.int32), jnp.asarray(lens, jnp.int32)


def main(argv=None) -> dict:
    from fdl.data.translation import load_data_nmt
    from fdl.models.sequence.bleu import bleu
    from fdl.models.sequence.transformer import translate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/fra-eng.zip")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--num-examples", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-steps", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--beam-size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--out", default="runs/transformer_mt")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    key = jax.random.key(args.seed)
    data, src_vocab, tgt_vocab = load_data_nmt(args.data, args.batch_size, args.num_steps,
                                               args.num_examples, seed=args.seed)
    model = build(args, src_vocab, tgt_vocab)
    n = args.batch_size
    _, params, _ = model.init(jax.random.fold_in(key, 0),
                              ((n, args.num_steps), (n,), (n, args.num_steps)))
    print(f"transformer: {data.src.shape[0]} pairs, src vocab {len(src_vocab)}, tgt vocab "
          f"{len(tgt_vocab)}, {sum(x.size for x in jax.tree_util.tree_leaves(params)):,} params")
    params, losses = train(model, params, data, args, tgt_vocab["<bos>"],
                           jax.random.fold_in(key, 1))
    t_train = time.perf_counter() - t0
    print(f"final loss {losses[-1]:.4f}, training wall time {t_train:.1f} s")

    src, src_len = encode_sentences(ENGS, src_vocab, args.num_steps)
    run = jax.jit(translate, static_argnums=0,
                  static_argnames=("bos_id", "eos_id", "max_len", "beam_size"))
    results = {}
    for beam in sorted({1, args.beam_size}):
        res = run(model, params, src, src_len, bos_id=tgt_vocab["<bos>"],
                  eos_id=tgt_vocab["<eos>"], max_len=args.num_steps, beam_size=beam)
        toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
        preds = [" ".join(tgt_vocab.to_tokens(toks[i, :lens[i]].tolist())) for i in range(4)]
        scores = [bleu(p, f, k=2) for p, f in zip(preds, FRAS, strict=True)]
        how = "greedy" if beam == 1 else f"beam search k={beam}"
        print(f"translations ({how}):")
        for e, p, s in zip(ENGS, preds, scores, strict=True):
            print(f"  {e} => {p}, bleu {s:.3f}")
        print(f"  {sum(s >= 0.6 for s in scores)} of 4 at BLEU >= 0.6")
        results[how] = {"translations": preds, "bleu": scores, "aux": np.asarray(res.aux),
                        "lengths": lens}
    if not args.no_plots:
        save_plots(model, params, src, src_len, losses, results["greedy"], args)
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return {"loss": losses, "results": {k: {kk: vv for kk, vv in v.items() if kk != "aux"}
                                        for k, v in results.items()}}


def save_plots(model, params, src, src_len, losses, greedy, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set(xlabel="epoch", ylabel="loss per token", yscale="log")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss.png"), dpi=120)
    plt.close(fig)
    # cross-attention of the last block, every head: rows = output tokens, columns = source
    aux, heads = greedy["aux"], args.heads
    fig, axes = plt.subplots(len(ENGS), heads, figsize=(2.4 * heads, 2.3 * len(ENGS)),
                             squeeze=False)
    for i, (eng, pred) in enumerate(zip(ENGS, greedy["translations"], strict=True)):
        src_toks = eng.split(" ") + ["<eos>"]
        out_toks = (pred.split(" ") if pred else []) + ["<eos>"]
        n_out = min(len(out_toks), aux.shape[1])
        for h in range(heads):
            ax = axes[i, h]
            im = ax.imshow(aux[i, :n_out, -1, h, :len(src_toks)], cmap="Reds", vmin=0, vmax=1)
            ax.set_xticks(range(len(src_toks)), src_toks, rotation=45, fontsize=7)
            ax.set_yticks(range(n_out), out_toks[:n_out], fontsize=7)
            if i == 0:
                ax.set_title(f"head {h + 1}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.savefig(os.path.join(args.out, "attention_cross.png"), dpi=120)
    plt.close(fig)
    enc = dict(model.children)["encoder"]
    (_, w), _ = enc.apply(params["encoder"], {}, src, valid_lens=src_len, return_attention=True)
    n_src = int(src_len[-1])
    toks = ENGS[-1].split(" ") + ["<eos>"]
    fig, axes = plt.subplots(len(w), heads, figsize=(2.4 * heads, 2.4 * len(w)), squeeze=False)
    for layer, wl in enumerate(w):
        for h in range(heads):
            ax = axes[layer, h]
            im = ax.imshow(np.asarray(wl[-1, h, :n_src, :n_src]), cmap="Reds", vmin=0, vmax=1)
            ax.set_xticks(range(n_src), toks, rotation=45, fontsize=7)
            ax.set_yticks(range(n_src), toks, fontsize=7)
            ax.set_title(f"block {layer + 1}, head {h + 1}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.savefig(os.path.join(args.out, "attention_encoder.png"), dpi=120)
    plt.close(fig)
    print(f"plots saved under {args.out}/")


if __name__ == "__main__":
    main()
