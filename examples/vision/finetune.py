"""Fine-tuning (d2l chapter 14.2, "hot dog"): a backbone pretrained on a large related task,
a new head for a small target task, trained three ways and compared.

The book fine-tunes ImageNet weights on 2,000 hot-dog photos. Offline, the same story: the
backbone (a small ResNet-18) is pretrained on 62 classes of *generated characters* (``glyphs.py``:
letters and printed digits, 18,600 elastically distorted 8x8 glyphs in the look of
scikit-learn's digits; ``--source letters`` for the 26 capitals), and the target task is the
*handwritten digits* with only a few labelled images per class. Three ways to train it:

- ``finetune``: all layers train, the new head at 10x the backbone's learning rate;
- ``freeze``: the backbone is frozen (``nn.at_paths(model, {"features": nn.frozen})`` keeps its
  BatchNorm layers in inference mode with the checkpoint's statistics, and
  ``optim.freeze("features")`` keeps the optimizer off it): only the head trains;
- ``scratch``: the same network from random initialisation.

    # the whole comparison (pretrain, then the three modes over 3 seeds):
    python examples/vision/finetune.py --table
    # or step by step, with image folders as a user's own data would come:
    python examples/vision/finetune.py --make-demo /tmp/ft_demo
    python examples/vision/finetune.py --weights /tmp/ft_demo/backbone.safetensors \\
        --train-dir /tmp/ft_demo/train --test-dir /tmp/ft_demo/test --mode finetune

Any ResNet-18-layout checkpoint works (``--base-channels 64 --size 224 --no-small-input`` for
torchvision's own ImageNet weights converted to safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import resize  # noqa: E402
from glyphs import CHARACTERS, LETTERS, make_glyphs  # noqa: E402

from fdl import nn, optim  # noqa: E402
from fdl.data import load_digits, load_image_folder  # noqa: E402
from fdl.interop import (  # noqa: E402
    from_torchvision,
    load_state_dict,
    save_safetensors,
    to_torchvision,
)
from fdl.models import vision as V  # noqa: E402
from fdl.nn.core import Layer  # noqa: E402
from fdl.train import fit  # noqa: E402

MODES = ("finetune", "freeze", "scratch")


def build(num_classes: int, base_channels: int, small_input: bool) -> Layer:
    return V.resnet18(num_classes, 3, base_channels=base_channels, small_input=small_input)


def finetune_model(base: Layer, num_classes: int, *, frozen: bool) -> Layer:
    """``base`` with a new ``dense(num_classes)`` head; ``frozen``: the ``features`` subtree
    runs in inference mode (BatchNorm with the checkpoint's running statistics, no gradient
    to its params). Param/state paths are those of ``base``."""
    model = V.replace_head(base, nn.dense(num_classes))
    return nn.at_paths(model, {"features": nn.frozen}) if frozen else model


def _rgb(x: np.ndarray, size: int) -> np.ndarray:
    return np.repeat(resize(x, size), 3, axis=-1)


SOURCES = {"letters": LETTERS, "characters": CHARACTERS}


def pretrain(path: str, *, source: str = "characters", per_class: int = 300, epochs: int = 10,
             size: int = 8, base_channels: int = 16, seed: int = 0, print_fn=print) -> float:
    """Pretrain on generated glyphs of ``source`` (``"characters"``: 62 classes, capital and
    small letters and printed digits; ``"letters"``: the 26 capitals), ``per_class`` each, with
    Adam 1e-3 cosine-decayed over ``epochs``; save the network in torchvision layout to
    ``path`` (.safetensors). Returns the accuracy on held-out generated glyphs."""
    charset = SOURCES[source]
    x, y = make_glyphs(per_class + 20, charset, seed=seed + 100)
    n_val = len(charset) * 20
    xtr, ytr, xva, yva = _rgb(x[n_val:], size), y[n_val:], _rgb(x[:n_val], size), y[:n_val]
    model = build(len(charset), base_channels, True)
    key = jax.random.key(seed)
    params, state = jax.jit(model.init_params, static_argnums=1)(key, (1, size, size, 3))
    bs = 64
    lr = optim.cosine_decay_schedule(1e-3, epochs * -(-len(xtr) // bs))
    res = fit(model, params, state, optim.adam(lr), (xtr, ytr), eval_data=(xva, yva),
              epochs=epochs, key=key, batch_size=bs, progress=False, print_fn=print_fn)
    save_safetensors(path, to_torchvision("resnet18", res.params, res.state))
    return float(res.history.last["test_acc"])


def write_folder(root: str, images: np.ndarray, labels: np.ndarray, names) -> None:
    """Write ``images`` (N, H, W, C in [0, 1]) as PNGs under ``root/<class name>/``."""
    from PIL import Image

    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = os.path.join(root, names[int(lab)])
        os.makedirs(d, exist_ok=True)
        a = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB").save(
            os.path.join(d, f"{i:05d}.png"))


def make_demo(root: str, *, per_class: int = 10, split_seed: int = 0, pretrain_kw=None,
              print_fn=print) -> None:
    """``root/backbone.safetensors`` (pretrained on generated glyphs) and image folders of the
    digits: ``train`` with ``per_class`` images per class from the digits' training split,
    ``test`` with the whole test split (359 images). The folders hold the 8x8 images as they
    are."""
    os.makedirs(root, exist_ok=True)
    acc = pretrain(os.path.join(root, "backbone.safetensors"), print_fn=print_fn,
                   **(pretrain_kw or {}))
    print_fn(f"backbone (generated glyphs) held-out acc {acc:.4f}")
    (xtr, ytr), (xte, yte) = load_digits()
    rng = np.random.default_rng(split_seed)
    sel = np.concatenate([rng.choice(np.flatnonzero(ytr == c), per_class, replace=False)
                          for c in range(10)])
    names = [f"digit{d}" for d in range(10)]
    write_folder(os.path.join(root, "train"), xtr[sel], ytr[sel], names)
    write_folder(os.path.join(root, "test"), xte, yte, names)


def _optimizer(mode: str, lr: float, steps: int, weight_decay: float, cosine: bool = True):
    def rate(base, steps):  # cosine-decayed to 0 over the run, or constant
        return optim.cosine_decay_schedule(base, steps) if cosine else base

    if mode == "finetune":  # the backbone at lr, the new head at 10 lr
        return optim.chain(optim.sgd(rate(lr, steps), momentum=0.9, weight_decay=weight_decay),
                           optim.scale_by_path({"head": 10.0}))
    if mode == "freeze":
        return optim.chain(optim.sgd(rate(10 * lr, steps), momentum=0.9,
                                     weight_decay=weight_decay),
                           optim.freeze("features"))
    if mode == "scratch":
        return optim.sgd(rate(10 * lr, steps), momentum=0.9, weight_decay=weight_decay)
    raise SystemExit(f"--mode must be one of {MODES}, got {mode!r}")


def finetune(weights: str, train_dir: str, test_dir: str, *, mode: str = "finetune",
             epochs: int = 40, lr: float = 3e-3, size: int = 8, base_channels: int = 16,
             small_input: bool = True, batch_size: int = 20, seed: int = 0,
             weight_decay: float = 1e-3, cosine: bool = True, print_fn=None) -> dict:
    """Train on the ``train_dir`` image folder in ``mode`` (see the module docstring) and
    report the accuracy on ``test_dir``. SGD momentum 0.9 with ``weight_decay``, cosine-decayed
    to 0 over the run (constant with ``cosine=False``); learning rates ``lr`` (backbone in
    ``finetune``) and ``10 * lr`` (the head; every layer in ``scratch``)."""
    xtr, ytr, classes = load_image_folder(train_dir, size)
    xte, yte, classes_te = load_image_folder(test_dir, size)
    if classes != classes_te:
        raise SystemExit(f"train classes {classes} != test classes {classes_te}")
    key = jax.random.key(seed)
    sd = load_state_dict(weights)
    base = build(int(sd["fc.weight"].shape[0]), base_channels, small_input)
    model = finetune_model(base, len(classes), frozen=mode == "freeze")
    params, state = jax.jit(model.init_params, static_argnums=1)(key, (1, size, size, 3))
    if mode != "scratch":
        _, loaded_p, loaded_s = from_torchvision("resnet18", sd, model=base)
        params = {**params, "features": loaded_p["features"]}
        state = {**state, "features": loaded_s["features"]}
    steps = epochs * -(-len(xtr) // batch_size)
    opt = _optimizer(mode, lr, steps, weight_decay, cosine)
    t0 = time.time()
    res = fit(model, params, state, opt, (xtr, ytr), eval_data=(xte, yte), epochs=epochs,
              key=key, batch_size=batch_size, progress=False, print_fn=print_fn)
    last = res.history.last
    moved = float(np.max(np.abs(np.asarray(res.state["features"]["bn1"]["mean"])
                                - np.asarray(state["features"]["bn1"]["mean"]))))
    return {"mode": mode, "classes": classes, "n_train": len(xtr), "n_test": len(xte),
            "train_loss": float(last["train_loss"]), "train_acc": float(last["train_acc"]),
            "test_acc": float(last["test_acc"]), "seconds": time.time() - t0,
            "bn_stats_moved": moved, "params": res.params, "state": res.state}


def table(root: str | None = None, *, seeds=(0, 1, 2), per_class: int = 10, print_fn=print,
          pretrain_kw=None, **kw) -> dict[str, list[float]]:
    """Pretrain once, then for each split seed (a different ``per_class`` sample of training
    digits) train the three modes; print test accuracy per mode (mean, min, max)."""
    root = root or tempfile.mkdtemp(prefix="fdl_finetune_")
    acc: dict[str, list[float]] = {m: [] for m in MODES}
    weights = os.path.join(root, "backbone.safetensors")
    for s in seeds:
        demo = os.path.join(root, f"split{s}")
        if s == seeds[0]:
            pkw = {"size": kw.get("size", 8), "base_channels": kw.get("base_channels", 16),
                   **(pretrain_kw or {})}
            make_demo(demo, per_class=per_class, split_seed=s, pretrain_kw=pkw,
                      print_fn=print_fn)
            os.replace(os.path.join(demo, "backbone.safetensors"), weights)
        else:
            _digit_folders(demo, per_class, s)
        for m in MODES:
            r = finetune(weights, os.path.join(demo, "train"), os.path.join(demo, "test"),
                         mode=m, seed=s, **kw)
            acc[m].append(r["test_acc"])
            print_fn(f"split {s} {m:9s} test acc {r['test_acc']:.4f}  train acc "
                     f"{r['train_acc']:.4f}  ({r['seconds']:.0f} s; backbone BatchNorm "
                     f"mean moved {r['bn_stats_moved']:.2g})")
    print_fn(f"\n| mode | test acc, mean over {len(seeds)} splits | min | max |")
    print_fn("| --- | --- | --- | --- |")
    for m in MODES:
        a = np.asarray(acc[m])
        print_fn(f"| {m} | {a.mean():.4f} | {a.min():.4f} | {a.max():.4f} |")
    return acc


def _digit_folders(root: str, per_class: int, split_seed: int) -> None:
    (xtr, ytr), (xte, yte) = load_digits()
    rng = np.random.default_rng(split_seed)
    sel = np.concatenate([rng.choice(np.flatnonzero(ytr == c), per_class, replace=False)
                          for c in range(10)])
    names = [f"digit{d}" for d in range(10)]
    write_folder(os.path.join(root, "train"), xtr[sel], ytr[sel], names)
    write_folder(os.path.join(root, "test"), xte, yte, names)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true", help="pretrain + all modes over 3 splits")
    ap.add_argument("--make-demo", metavar="DIR", help="write the demo backbone + folders")
    ap.add_argument("--weights", help="backbone checkpoint (.safetensors/.pt/.npz)")
    ap.add_argument("--train-dir")
    ap.add_argument("--test-dir")
    ap.add_argument("--mode", default="finetune", choices=MODES)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3,
                    help="backbone learning rate (head: 10x; scratch: 10x for all)")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=10, help="training digits per class")
    ap.add_argument("--source", default="characters", choices=sorted(SOURCES),
                    help="pretraining glyphs: 62 characters or the 26 capital letters")
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--no-small-input", dest="small_input", action="store_false")
    args = ap.parse_args(argv)
    kw = dict(epochs=args.epochs, lr=args.lr, size=args.size,
              base_channels=args.base_channels, small_input=args.small_input)
    pkw = {"source": args.source}
    if args.table:
        return table(per_class=args.per_class, pretrain_kw=pkw, **kw)
    if args.make_demo:
        make_demo(args.make_demo, per_class=args.per_class,
                  pretrain_kw={"size": args.size, "base_channels": args.base_channels, **pkw})
        return None
    if not (args.weights and args.train_dir and args.test_dir):
        ap.error("--weights, --train-dir and --test-dir are required (or --make-demo DIR, "
                 "or --table)")
    r = finetune(args.weights, args.train_dir, args.test_dir, mode=args.mode, print_fn=print,
                 **kw)
    print(f"{r['mode']} ({len(r['classes'])} classes, {r['n_train']} train / {r['n_test']} "
          f"test images): train loss {r['train_loss']:.4f}, train acc {r['train_acc']:.4f}, "
          f"test acc {r['test_acc']:.4f}, {r['seconds']:.1f} s")
    return r


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main()
