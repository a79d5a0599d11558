"""English -> French seq2seq on fra-eng with the book's settings, with or without Bahdanau
attention; translates the book's four test sentences and prints their BLEU (k=2).

    python examples/sequence/seq2seq.py --data ../shared/data/fra-eng.zip [--attention]
        [--epochs 300] [--beam-size 1] [--out runs/seq2seq]

Book settings (d2l "Sequence to Sequence Learning" / "Bahdanau Attention"): the first 600 pairs,
embed 32, hidden 32, 2 GRU layers, dropout 0.1, batch 64, num_steps 10, Adam lr 0.005, gradient
clipping 1, 300 epochs; the model is a Layer (``fdl.models.sequence.seq2seq.seq2seq``) trained by
``fdl.train.fit`` with teacher forcing and the book's objective. Saves ``loss_<tag>.png`` and,
with ``--attention``, ``attention.png`` (the decoder's attention over the source for each test
sentence) under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

ENGS = ["go .", "i lost .", "he's calm .", "i'm home ."]
FRAS = ["va !", "j'ai perdu .", "il est calme .", "je suis chez moi ."]


def make_optimizer(lr: float, clip: float):
    """``chain(clip_by_global_norm(clip), adam(lr))``: the book clips the gradient, then
    steps with Adam."""
    from fdl.optim import adam, chain, clip_by_global_norm

    return chain(clip_by_global_norm(clip), adam(lr))


def book_objective():
    """The book's objective, ``l.sum()`` over the batch of d2l's ``MaskedSoftmaxCELoss`` (its
    scale matters: the gradient is clipped to norm 1 before Adam), with the loss per target
    token as the logged loss."""
    import jax.numpy as jnp

    from fdl.models.sequence.seq2seq import masked_softmax_ce_loss
    from fdl.train import Objective

    def fn(logits, y, mask):
        labels, valid_len = y
        per_seq = masked_softmax_ce_loss(logits, labels, valid_len)  # (B,), mean over T
        real = jnp.ones_like(per_seq) if mask is None else mask.astype(per_seq.dtype)
        tokens = jnp.sum(valid_len.astype(per_seq.dtype) * real)
        total = jnp.sum(per_seq * real)
        return total, {"loss": total * labels.shape[1], "count": tokens}

    return Objective(fn)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/fra-eng.zip")
    ap.add_argument("--attention", action="store_true", help="Bahdanau attention decoder")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--num-examples", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-steps", type=int, default=10)
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--beam-size", type=int, default=1, help="1 = greedy decoding")
    ap.add_argument("--alpha", type=float, default=0.75, help="beam length normalisation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--out", default="runs/seq2seq")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.beam_size < 1:
        ap.error(f"--beam-size must be >= 1, got {args.beam_size}")
    return args



def main(argv=None) -> dict:
    from fdl.data import ArrayLoader
    from fdl.data.translation import load_data_nmt
    from fdl.models.sequence.bleu import bleu
    from fdl.models.sequence.seq2seq import predict_seq2seq, seq2seq, teacher_forcing_inputs
    from fdl.train import fit, print_every

    args = parse_args(argv)
    t_wall = time.perf_counter()
    key = jax.random.key(args.seed)
    data, src_vocab, tgt_vocab = load_data_nmt(args.data, args.batch_size, args.num_steps,
                                               args.num_examples, seed=args.seed)
    model = seq2seq(len(src_vocab), len(tgt_vocab), embed_size=args.embed,
                    num_hiddens=args.hidden, num_layers=args.layers, dropout=args.dropout,
                    attention=args.attention)
    b, t = args.batch_size, args.num_steps
    _, params, state = model.init(jax.random.fold_in(key, 0), ((b, t), (b,), (b, t)))
    dec_in = np.asarray(teacher_forcing_inputs(data.tgt, tgt_vocab["<bos>"]))
    loader = ArrayLoader(((data.src, data.src_valid_len, dec_in),
                          (data.tgt, data.tgt_valid_len)), b, last_batch="pad",
                         key=jax.random.fold_in(key, 2))
    tag = "attention" if args.attention else "plain"
    print(f"{tag} seq2seq: {data.src.shape[0]} pairs, src vocab {len(src_vocab)}, tgt vocab "
          f"{len(tgt_vocab)}, {sum(x.size for x in jax.tree_util.tree_leaves(params)):,} params")
    t0 = time.perf_counter()
    res = fit(model, params, state, make_optimizer(args.lr, args.clip), loader,
              epochs=args.epochs, key=jax.random.fold_in(key, 1), loss=book_objective(),
              progress=False, print_fn=print_every(args.log_every))
    train_s = time.perf_counter() - t0
    params = res.params
    losses = res.history["train_loss"]
    # steady-state speed: median over the epochs after the first (which includes compilation);
    # fit's "examples" are target tokens here (the objective counts them)
    tps = [r for r in res.history["examples_per_sec"][1:] if r]
    steady = float(np.median(tps)) if tps else float("nan")
    print(f"final loss {losses[-1]:.4f}, {steady:.0f} tokens/s (median epoch), "
          f"training wall time {train_s:.1f} s")

    if args.beam_size > 1:  # greedy first, for comparison
        greedy, _ = predict_seq2seq(model, params, ENGS, src_vocab, tgt_vocab, args.num_steps)
        print("greedy: " + "; ".join(
            f"{e} => {p} ({bleu(p, f, k=2):.3f})"
            for e, p, f in zip(ENGS, greedy, FRAS, strict=True)))
    translations, weights = predict_seq2seq(model, params, ENGS, src_vocab, tgt_vocab,
                                            args.num_steps, beam_size=args.beam_size,
                                            alpha=args.alpha)
    scores = []
    how = "greedy" if args.beam_size == 1 else f"beam search k={args.beam_size}"
    print(f"translations ({how}):")
    for eng, fra, pred in zip(ENGS, FRAS, translations, strict=True):
        s = bleu(pred, fra, k=2)
        scores.append(s)
        print(f"{eng} => {pred}, bleu {s:.3f}")
    good = sum(s >= 0.6 for s in scores)
    print(f"{good} of {len(scores)} at BLEU >= 0.6; wall time {time.perf_counter() - t_wall:.1f} s")

    if not args.no_plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(args.out, exist_ok=True)
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.plot(np.arange(1, len(losses) + 1), losses)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss per token")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"loss_{tag}.png"), dpi=120)
        plt.close(fig)
        if weights is not None:
            fig, axes = plt.subplots(1, len(ENGS), figsize=(3.2 * len(ENGS), 3.2))
            for ax, eng, pred, w in zip(axes, ENGS, translations, weights, strict=True):
                src_toks = eng.split(" ") + ["<eos>"]
                out_toks = (pred.split(" ") if pred else []) + ["<eos>"]
                n_out = min(len(out_toks), w.shape[0])
                ax.imshow(w[:n_out, : len(src_toks)], cmap="Reds", vmin=0, vmax=1)
                ax.set_xticks(range(len(src_toks)), src_toks, rotation=45)
                ax.set_yticks(range(n_out), out_toks[:n_out])
                ax.set_xlabel("keys (source)")
            axes[0].set_ylabel("queries (output)")
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, "attention.png"), dpi=120)
            plt.close(fig)
        print(f"plots saved under {args.out}/")
    return {"loss": losses[-1], "tokens_per_s": steady, "bleu": scores,
            "translations": translations, "wall_s": train_s}


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
