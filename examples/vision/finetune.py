"""Fine-tuning (d2l chapter 14.2, "hot dog"): load a backbone checkpoint from a local
``.safetensors`` file (torchvision ResNet-18 layout), replace the head for a new number of
classes, train with the backbone frozen or at 1/10 of the head's learning rate, report
accuracy on an image-folder dataset.

    # the documented demo: pretrain a small ResNet-18 on digits 0-4, fine-tune on an image
    # folder of digits 5-9 (20 images per class) and test on the rest
    python examples/vision/finetune.py --make-demo /tmp/ft_demo
    python examples/vision/finetune.py --weights /tmp/ft_demo/backbone.safetensors \\
        --train-dir /tmp/ft_demo/train --test-dir /tmp/ft_demo/test --mode lr10

Any ResNet-18-layout checkpoint works (``--base-channels 64 --size 224`` without
``--small-input`` for torchvision's own ImageNet weights converted to safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import resize  # noqa: E402

from fdl import nn, optim  # noqa: E402
from fdl.data import load_digits, load_image_folder  # noqa: E402
from fdl.interop import (  # noqa: E402
    from_torchvision,
    load_state_dict,
    save_safetensors,
    to_torchvision,  # noqa: E402
)
from fdl.models import vision as V  # noqa: E402
from fdl.nn.core import Layer  # noqa: E402
from fdl.train import fit  # noqa: E402


def build(num_classes: int, base_channels: int, small_input: bool):
    return V.resnet18(num_classes, 3, base_channels=base_channels, small_input=small_input)


def eval_mode(layer: Layer) -> Layer:
    """``layer`` always applied with ``train=False``: its BatchNorm layers normalise with, and
    keep, the running statistics in ``state`` (the checkpoint's), whatever mode ``fit`` asks
    for. Gradients still flow through it (a frozen BatchNorm is a fixed per-channel affine
    map)."""

    def apply(params, state, x, *, key=None, train=False):
        return layer.apply(params, state, x, key=key, train=False)

    return Layer(layer.init, apply, name=layer.name, children=layer.children,
                 config=layer.config)


def finetune_model(base: Layer, num_classes: int, *, bn_frozen: bool = True) -> Layer:
    """``base`` with a new ``dense(num_classes)`` head; ``bn_frozen``: the ``features`` part
    runs in evaluation mode (BatchNorm statistics from the checkpoint, not re-estimated from
    the small fine-tuning batches). Param/state paths are those of ``base``."""
    model = V.replace_head(base, nn.dense(num_classes))
    if not bn_frozen:
        return model
    kids = dict(model.children)
    return V.classifier(model.name, eval_mode(kids["features"]), kids["head"],
                        **dict(model.config, bn_frozen=True))


def make_backbone(path: str, *, classes=range(5), epochs: int = 8, size: int = 32,
                  base_channels: int = 16, seed: int = 0, print_fn=print) -> float:
    """Pretrain a small ResNet-18 on digits ``classes`` (RGB, ``size``; Adam 1e-3
    cosine-decayed to 0 over ``epochs``) and save it in torchvision layout to ``path``
    (.safetensors). Returns its test accuracy (eval mode, running statistics).

    The decay matters: with a constant rate the BatchNorm running statistics lag the
    fast-changing weights (4 epochs at 1e-3: train acc 0.99, test acc 0.70 with the running
    statistics, while the same weights with re-estimated statistics classify the test set)."""
    (xtr, ytr), (xte, yte) = load_digits()
    keep_tr, keep_te = np.isin(ytr, list(classes)), np.isin(yte, list(classes))
    xtr = np.repeat(resize(xtr[keep_tr], size), 3, axis=-1)
    xte = np.repeat(resize(xte[keep_te], size), 3, axis=-1)
    ytr, yte = ytr[keep_tr], yte[keep_te]
    model = build(10, base_channels, True)
    key = jax.random.key(seed)
    params, state = jax.jit(model.init_params, static_argnums=1)(key, (1, size, size, 3))
    bs = 64
    lr = optim.cosine_decay_schedule(1e-3, epochs * -(-len(xtr) // bs))
    res = fit(model, params, state, optim.adam(lr), (xtr, ytr), eval_data=(xte, yte),
              epochs=epochs, key=key, batch_size=bs, progress=False, print_fn=print_fn)
    save_safetensors(path, to_torchvision("resnet18", res.params, res.state))
    return float(res.history.last["test_acc"])


def write_folder(root: str, images: np.ndarray, labels: np.ndarray, names) -> None:
    """Write ``images`` (N, H, W, C in [0, 1]) as PNGs under ``root/<class name>/``."""
    from PIL import Image

    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = os.path.join(root, names[int(lab)])
        os.makedirs(d, exist_ok=True)
        a = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB").save(
            os.path.join(d, f"{i:05d}.png"))


def make_demo(root: str, *, per_class: int = 20, size: int = 32, print_fn=print) -> None:
    """Backbone pretrained on digits 0-4 plus train/test image folders of digits 5-9."""
    os.makedirs(root, exist_ok=True)
    acc = make_backbone(os.path.join(root, "backbone.safetensors"), size=size,
                        print_fn=print_fn)
    print_fn(f"backbone (digits 0-4) test acc {acc:.4f}")
    (xtr, ytr), (xte, yte) = load_digits()
    names = [f"digit{d}" for d in range(10)]
    sel = np.concatenate([np.flatnonzero(ytr == c)[:per_class] for c in range(5, 10)])
    write_folder(os.path.join(root, "train"), resize(xtr[sel], size), ytr[sel], names)
    te = np.flatnonzero(yte >= 5)
    write_folder(os.path.join(root, "test"), resize(xte[te], size), yte[te], names)


def finetune(weights: str, train_dir: str, test_dir: str, *, mode: str = "lr10",
             epochs: int = 30, lr: float = 3e-3, size: int = 32, base_channels: int = 16,
             small_input: bool = True, batch_size: int = 32, seed: int = 0,
             bn_frozen: bool | None = None, cosine: bool = True, weight_decay: float = 1e-3,
             print_fn=print) -> dict:
    """Fine-tune; ``mode`` ``"lr10"`` (head at 10x the backbone's rate), ``"freeze"``
    (backbone frozen) or ``"scratch"`` (no checkpoint, all from random init).
    Learning rates: ``lr`` for the backbone (``"lr10"``), ``10 * lr`` for the head (and for
    everything in ``"scratch"``); SGD momentum 0.9, ``weight_decay``, cosine-decayed to 0 over
    the run when ``cosine``.

    ``bn_frozen``: the backbone's BatchNorm layers stay in evaluation mode with the
    checkpoint's running statistics (see :func:`finetune_model`). Default (None): on for
    ``"freeze"`` (so the frozen backbone is exactly the checkpoint, statistics included), off
    for ``"lr10"`` (measured on the demo: without batch normalisation in training the whole
    network only trained at small rates and ended below the re-estimating run), never for
    ``"scratch"`` (there are no statistics to keep)."""
    xtr, ytr, classes = load_image_folder(train_dir, size)
    xte, yte, classes_te = load_image_folder(test_dir, size)
    if classes != classes_te:
        raise SystemExit(f"train classes {classes} != test classes {classes_te}")
    key = jax.random.key(seed)
    sd = load_state_dict(weights)
    base = build(int(sd["fc.weight"].shape[0]), base_channels, small_input)
    # from scratch there are no running statistics to keep: BatchNorm trains as usual
    if bn_frozen is None:
        bn_frozen = mode == "freeze"
    bn_frozen = bn_frozen and mode != "scratch"
    model = finetune_model(base, len(classes), bn_frozen=bn_frozen)
    params, state = jax.jit(model.init_params, static_argnums=1)(key, (1, size, size, 3))
    if mode != "scratch":
        _, loaded_p, loaded_s = from_torchvision("resnet18", sd, model=base)
        params = {**params, "features": loaded_p["features"]}
        state = {**state, "features": loaded_s["features"]}
    steps = epochs * -(-len(xtr) // batch_size)

    def rate(base):  # ``base``, cosine-decayed to 0 over the run when ``cosine``
        return optim.cosine_decay_schedule(base, steps) if cosine else base

    if mode == "lr10":
        opt = optim.chain(optim.sgd(rate(lr), momentum=0.9, weight_decay=weight_decay),
                          optim.scale_by_path({"head": 10.0}))
    elif mode == "freeze":
        opt = optim.chain(optim.sgd(rate(10 * lr), momentum=0.9, weight_decay=weight_decay),
                          optim.freeze("features"))
    elif mode == "scratch":
        opt = optim.sgd(rate(10 * lr), momentum=0.9, weight_decay=weight_decay)
    else:
        raise SystemExit(f"--mode must be lr10, freeze or scratch, got {mode!r}")
    t0 = time.time()
    res = fit(model, params, state, opt, (xtr, ytr), eval_data=(xte, yte), epochs=epochs,
              key=key, batch_size=batch_size, progress=False, print_fn=print_fn)
    last = res.history.last
    return {"mode": mode, "bn_frozen": bn_frozen, "classes": classes, "n_train": len(xtr),
            "n_test": len(xte),
            "train_loss": float(last["train_loss"]), "train_acc": float(last["train_acc"]),
            "test_acc": float(last["test_acc"]), "seconds": time.time() - t0,
            "params": res.params, "state": res.state}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-demo", metavar="DIR", help="write the demo backbone + folders")
    ap.add_argument("--weights", help="backbone checkpoint (.safetensors/.pt/.npz)")
    ap.add_argument("--train-dir")
    ap.add_argument("--test-dir")
    ap.add_argument("--mode", default="lr10", choices=["lr10", "freeze", "scratch"])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3,
                    help="backbone learning rate (head: 10x; scratch: 10x for all)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--no-small-input", dest="small_input", action="store_false")
    ap.add_argument("--bn-frozen", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the backbone's BatchNorm in eval mode with the checkpoint's "
                         "running statistics (default: on for --mode freeze, off for lr10)")
    args = ap.parse_args(argv)
    if args.make_demo:
        make_demo(args.make_demo, size=args.size)
        return None
    if not (args.weights and args.train_dir and args.test_dir):
        ap.error("--weights, --train-dir and --test-dir are required (or --make-demo DIR)")
    r = finetune(args.weights, args.train_dir, args.test_dir, mode=args.mode,
                 epochs=args.epochs, lr=args.lr, size=args.size,
                 base_channels=args.base_channels, small_input=args.small_input,
                 bn_frozen=args.bn_frozen)
    bn = ", BatchNorm frozen" if r["bn_frozen"] else ""
    print(f"fine-tune ({r['mode']}{bn}, {len(r['classes'])} classes, {r['n_train']} train / "
          f"{r['n_test']} test images): train loss {r['train_loss']:.4f}, train acc "
          f"{r['train_acc']:.4f}, test acc {r['test_acc']:.4f}, {r['seconds']:.1f} s")
    return r


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
