"""Pretrain the book's small BERT (MLM + NSP) on any text with ``fdl.train.fit`` and print the
two losses (d2l "Pretraining BERT": 2 layers, 128 hidden, 2 heads, FFN 256, max_len 64, batch
512, Adam lr 0.01, 50 steps; the book reports MLM 5.885 / NSP 0.760 on WikiText-2).

    python examples/sequence/bert_pretrain.py [--data ../shared/data/timemachine.txt]
        [--steps 50] [--save runs/bert_small.safetensors]

``--data``: WikiText-2's ``wiki.train.tokens`` if you have it, a plain-text book (default: The
Time Machine) or ``fra-eng.zip`` (its English side). The losses depend on the text (vocabulary
size above all), so compare with the book only on WikiText-2. As the book, the printed losses
are the means over all steps of each step's loss. By default the MLM decoder is tied to the
token embedding (initialised N(0, 0.02) as BERT); ``--untied`` is the book's exact
architecture (its own decoder, N(0, 1) embeddings). ``--save`` writes the params to a
safetensors file under fdl's flat param names (``fdl.tree.flatten_dict``; load them with
:func:`load_params`).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def step_batches(arrays: dict[str, np.ndarray], steps: int, batch_size: int, seed: int
                 ) -> dict[str, np.ndarray]:
    """The rows of ``steps`` full batches in training order, as the book's loop draws them:
    passes over the data in a new random order each, a partial batch at the end of a pass
    skipped. Returns ``arrays`` gathered to ``steps * batch_size`` rows."""
    n = len(next(iter(arrays.values())))
    rng = np.random.default_rng(seed)
    per_pass = n // batch_size
    passes = -(-steps // per_pass)
    order = np.concatenate([rng.permutation(n)[: per_pass * batch_size] for _ in range(passes)])
    idx = order[: steps * batch_size]
    return {k: v[idx] for k, v in arrays.items()}


def pretraining_loader(arrays: dict[str, np.ndarray], steps: int, batch_size: int, seed: int):
    """An ``ArrayLoader`` of ``steps`` batches of dict ``(x, y)``: the model's inputs and the
    pretraining targets (one epoch of ``fit`` = the whole run)."""
    from fdl.data import ArrayLoader
    from fdl.models.sequence.bert import PRETRAINING_INPUTS, PRETRAINING_TARGETS

    rows = step_batches(arrays, steps, batch_size, seed)
    x = {k: rows[k] for k in PRETRAINING_INPUTS}
    y = {k: rows[k] for k in PRETRAINING_TARGETS}
    return ArrayLoader((x, y), batch_size, last_batch="drop")


def pretrain(model, params, arrays, *, steps: int, batch_size: int, lr: float, seed: int,
             print_fn=print):
    """``steps`` Adam steps of MLM + NSP with ``fit``; returns ``fit``'s result."""
    from fdl import optim
    from fdl.models.sequence.bert import pretraining_objective
    from fdl.train import fit

    loader = pretraining_loader(arrays, steps, batch_size, seed)
    return fit(model, params, {}, optim.adam(lr), loader, epochs=1,
               key=jax.random.key(seed + 1), loss=pretraining_objective(), print_fn=print_fn)


def save_params(path: str, params) -> None:
    """Write ``params`` to a safetensors file under fdl's flat names."""
    from fdl.interop.state_dict import save_safetensors
    from fdl.tree import flatten_dict

    save_safetensors(path, {k: np.asarray(v) for k, v in flatten_dict(params).items()})


def load_params(path: str, like) -> dict:
    """Params saved by :func:`save_params`, checked against the tree ``like`` (every name
    present with its shape; else a ``ValueError`` listing the differences)."""
    import jax.numpy as jnp

    from fdl.interop.state_dict import load_state_dict
    from fdl.tree import flatten_dict, unflatten_dict

    got, want = load_state_dict(path), flatten_dict(like)
    bad = [f"{k}: expected {tuple(v.shape)}, file has "
           f"{tuple(got[k].shape) if k in got else 'nothing'}"
           for k, v in want.items() if k not in got or tuple(got[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{path}: the saved params do not fit this model (same --data, "
                         f"--max-len and sizes?): " + "; ".join(bad[:6]))
    return unflatten_dict({k: jnp.asarray(got[k]) for k in want})


def main(argv=None) -> dict:
    from fdl.data.bert import bert_pretraining_data, read_paragraphs
    from fdl.models.sequence.bert import BertConfig, bert_pretraining

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
    _, params, _ = model.init(jax.random.key(args.seed),
                              ((b, args.max_len), (b, args.max_len), (b,), (b, p)))
    t_train = time.perf_counter()
    res = pretrain(model, params, arrays, steps=args.steps, batch_size=b, lr=args.lr,
                   seed=args.seed)
    dt = time.perf_counter() - t_train
    row = res.history.last
    print(f"MLM loss {row['train_mlm']:.3f}, NSP loss {row['train_nsp']:.3f} (means over "
          f"{args.steps} steps of batch {b}); book on WikiText-2: 5.885 / 0.760")
    print(f"{args.steps * b / dt:.1f} sentence pairs/s, {dt:.1f} s training (with compile), "
          f"{time.perf_counter() - t0:.1f} s total")
    if args.save:
        save_params(args.save, res.params)
        print(f"params saved to {args.save}")
    return {"mlm": row["train_mlm"], "nsp": row["train_nsp"], "vocab": len(vocab), "pairs": n,
            "params": res.params}


if __name__ == "__main__":
    main()
