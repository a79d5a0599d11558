"""Train a chapter model (d2l chapters 7-8) on the offline digits set or Fashion-MNIST.

    python examples/vision/train.py --model resnet18 [--epochs N] [--data digits|DIR]

Digits (8x8, sklearn) are resized to the model's input size (28x28 LeNet, 32x32 others).
Prints the final train loss, train accuracy and test accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RECIPES, train  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(RECIPES))
    ap.add_argument("--epochs", type=int, default=None, help="default: the model's budget")
    ap.add_argument("--data", default="digits",
                    help="'digits' (offline) or a directory with Fashion-MNIST IDX files")
    ap.add_argument("--size", type=int, default=None, help="input size (default per model)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-train", type=int, default=None, help="use only the first N images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    r = train(args.model, epochs=args.epochs, data=args.data, seed=args.seed, size=args.size,
              lr=args.lr, batch_size=args.batch_size, max_train=args.max_train)
    print(f"{args.model}: {r['epochs']} epochs at {r['size']}x{r['size']}, "
          f"train loss {r['train_loss']:.4f}, train acc {r['train_acc']:.4f}, "
          f"test acc {r['test_acc']:.4f}, {r['seconds']:.1f} s")
    return r


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
