"""Character-level language model on The Time Machine (d2l 8.5/9.1/9.2, book settings), trained
with ``fdl.train.fit``.

    python examples/sequence/char_lm.py --data ../shared/data/timemachine.txt --cell gru \
        --epochs 500

Book settings (defaults): batch 32, 35 steps, hidden 256, SGD lr 1, clipping theta=1, the first
10,000 characters, the book's sequential partitioning (a new random offset every epoch). The
recurrent carry is layer state, so ``fit`` carries it from one minibatch to the next (truncated
BPTT) and ``reset_state=("rnn",)`` restarts it at every epoch, as the book does;
``--random-iter`` samples at random and restarts the carry every minibatch (``carry="reset"``).
Prints perplexity, tokens/s and the generation from "time traveller"; saves the perplexity curve
as ``<out>/char_lm_<cell>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax

from fdl.data.text import load_data_time_machine
from fdl.models.sequence.rnn_lm import predict, rnn_lm
from fdl.optim import chain, clip_by_global_norm, sgd
from fdl.train import fit, print_every


def save_curve(perplexities: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(perplexities) + 1), perplexities)
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/timemachine.txt")
    ap.add_argument("--cell", choices=("rnn", "gru", "lstm"), default="gru")
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-steps", type=int, default=35)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--embed", type=int, default=None, help="embedding size (default one-hot)")
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=10000)
    ap.add_argument("--random-iter", action="store_true", help="random sampling")
    ap.add_argument("--unroll", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--num-preds", type=int, default=50)
    ap.add_argument("--out", default="runs/char_lm", help="directory for the PNG")
    return ap.parse_args(argv)



def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # the book's samplers; fit asks the loader for epoch e's batches (``loader.epoch(e)``)
    loader, vocab = load_data_time_machine(args.data, args.batch_size, args.num_steps,
                                           args.random_iter, args.max_tokens, seed=args.seed)
    key = jax.random.key(args.seed)
    k_init, k_train = jax.random.split(key)
    model = rnn_lm(len(vocab), args.hidden, cell=args.cell, num_layers=args.num_layers,
                   bidirectional=args.bidirectional, dropout=args.dropout, embed_size=args.embed,
                   unroll=args.unroll,
                   carry="reset" if args.random_iter or args.bidirectional else "keep")
    _, params, state = model.init(k_init, (args.batch_size, args.num_steps))
    print(f"char LM: cell={args.cell} layers={args.num_layers} bidirectional="
          f"{args.bidirectional} hidden={args.hidden} vocab={len(vocab)} batch="
          f"{args.batch_size} steps={args.num_steps} lr={args.lr} clip={args.clip} "
          f"epochs={args.epochs} ({datetime.date.today().isoformat()})", flush=True)
    t0 = time.perf_counter()
    res = fit(model, params, state, chain(clip_by_global_norm(args.clip), sgd(args.lr)), loader,
              epochs=args.epochs, key=k_train, loss="cross_entropy", perplexity=True,
              reset_state=None if args.random_iter else ("rnn",), progress=False,
              print_fn=print_every(args.log_every))
    wall = time.perf_counter() - t0
    ppl = res.history["train_perplexity"]
    # fit counts the loss per token: its "examples" per second are tokens per second
    speeds = [r for r in res.history["examples_per_sec"][1:] if r]
    tokens_per_s = sorted(speeds)[len(speeds) // 2] if speeds else float("nan")
    print(f"perplexity {ppl[-1]:.3f}, best {min(ppl):.3f}, {tokens_per_s:.0f} tokens/s "
          f"(median epoch), wall {wall:.1f} s")
    for target in (1.5, 1.2):
        first = next((i + 1 for i, v in enumerate(ppl) if v <= target), None)
        print(f"first epoch with perplexity <= {target}: {first}")
    for prefix in ("time traveller", "traveller"):
        print(repr(predict(model, res.params, prefix, args.num_preds, vocab)))
    os.makedirs(args.out, exist_ok=True)
    tag = f"{args.cell}{'_bi' if args.bidirectional else ''}"
    png = os.path.join(args.out, f"char_lm_{tag}.png")
    save_curve(ppl, png, f"char LM ({tag}), The Time Machine")
    print(f"saved {png}")
    return {"perplexity": ppl[-1], "history": res.history, "wall_time": wall}


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main(sys.argv[1:])
