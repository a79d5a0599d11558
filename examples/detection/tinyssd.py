"""TinySSD on a generated banana-style detection set (d2l ch. 14.7, the book's settings).

    python examples/detection/tinyssd.py                       # 1000 + 200 images, 20 epochs

The data need no download: the first run writes ``<data-dir>/bananas_train`` (1000 images,
256x256, one banana-like object each) and ``<data-dir>/bananas_val`` (200 held-out images) in
the banana dataset's format (``label.csv`` + ``images/``) with
:func:`fdl.data.detection.generate_banana_dataset`; later runs read them back. ``--data-dir``
may also point at the book's own ``banana-detection`` folder.

Book settings (defaults): batch 32, SGD lr 0.2, weight decay 5e-4, 20 epochs, cross-entropy +
masked L1 loss. Prints the class error and bbox MAE of the last epoch next to the book's
(≈ 3.3e-3 and 3.2e-3 on its bananas), VOC mAP@0.5 (area and 11-point) and COCO mAP@[.5:.95]
on the held-out images, and saves ``<out>/detections.png`` (detections scoring >= 0.9 in
colour, ground truth in white) and ``<out>/loss.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

from fdl import optim, train
from fdl.data import detection as ddata
from fdl.models import detection as det

BOOK = {"class_err": 3.3e-3, "bbox_mae": 3.2e-3}


def ensure_data(directory: str, name: str, n: int, seed: int, args) -> str:
    path = os.path.join(directory, name)
    if not os.path.isfile(os.path.join(path, "label.csv")):
        t0 = time.perf_counter()
        ddata.generate_banana_dataset(path, n, image_size=args.image_size, seed=seed,
                                      num_classes=args.num_classes, max_objects=args.max_objects)
        print(f"generated {n} images in {path} ({time.perf_counter() - t0:.1f} s)")
    return path


def _metric_fn(out, y, mask):
    m = det.ssd_metrics(out, y)
    return {"class_err": (m["cls_count"] - m["cls_correct"], m["cls_count"]),
            "bbox_mae": (m["bbox_abs_err"], m["bbox_count"])}


def dataset_metrics(net, params, state, images, targets, batch_size: int) -> dict:
    """The book's class error and bbox MAE over a set (evaluation mode)."""

    @jax.jit
    def sums(x, y):
        return det.ssd_metrics(net.apply(params, state, x, train=False)[0], y)

    tot = None
    for i in range(0, len(images), batch_size):
        s = sums(jnp.asarray(images[i:i + batch_size]), jnp.asarray(targets[i:i + batch_size]))
        tot = s if tot is None else jax.tree.map(jnp.add, tot, s)
    tot = {k: float(v) for k, v in tot.items()}
    return {"class_err": 1 - tot["cls_correct"] / tot["cls_count"],
            "bbox_mae": tot["bbox_abs_err"] / tot["bbox_count"]}


def detect_all(net, params, state, images, batch_size: int, nms_threshold: float):
    fn = jax.jit(lambda x: det.ssd_detect(net, params, state, x, nms_threshold=nms_threshold))
    out = []
    for i in range(0, len(images), batch_size):
        out.extend(det.detections_to_list(fn(jnp.asarray(images[i:i + batch_size]))))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="runs/detection_data")
    ap.add_argument("--out", default="runs/tinyssd")
    ap.add_argument("--train-size", type=int, default=1000)
    ap.add_argument("--test-size", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--num-classes", type=int, default=1)
    ap.add_argument("--max-objects", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--nms-threshold", type=float, default=0.5)
    ap.add_argument("--display-threshold", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)

    train_dir = ensure_data(args.data_dir, "bananas_train", args.train_size, 1, args)
    test_dir = ensure_data(args.data_dir, "bananas_val", args.test_size, 2, args)
    tr = ddata.read_banana_dataset(train_dir, num_classes=args.num_classes)
    te = ddata.read_banana_dataset(test_dir, num_classes=args.num_classes)
    print(f"train {tr.images.shape} targets {tr.targets.shape}; test {te.images.shape}")

    net = det.tiny_ssd(args.num_classes)
    params, state = jax.jit(net.init_params, static_argnums=1)(
        jax.random.key(args.seed), (args.batch_size, *tr.images.shape[1:]))
    opt = optim.sgd(args.lr, weight_decay=args.wd)
    t0 = time.perf_counter()
    # the book's class error and bbox MAE: running sums over each training epoch
    res = train.fit(net, params, state, opt, (tr.images, tr.targets), loss=det.ssd_loss,
                    metrics=_metric_fn, batch_size=args.batch_size, epochs=args.epochs,
                    key=jax.random.key(args.seed + 1), progress=not args.no_progress,
                    plot=os.path.join(args.out, "loss.png"))
    train_s = time.perf_counter() - t0
    last = res.history.last
    train_m = {"class_err": last["train_class_err"], "bbox_mae": last["train_bbox_mae"]}
    print(f"class err {train_m['class_err']:.2e} (book ~{BOOK['class_err']:.1e}), "
          f"bbox mae {train_m['bbox_mae']:.2e} (book ~{BOOK['bbox_mae']:.1e}) [last epoch, "
          "running sums in training mode, as the book]")
    after = dataset_metrics(net, res.params, res.state, tr.images, tr.targets, args.batch_size)
    print(f"training set after training (evaluation mode): class err {after['class_err']:.2e},"
          f" bbox mae {after['bbox_mae']:.2e}")
    test_m = dataset_metrics(net, res.params, res.state, te.images, te.targets, args.batch_size)
    print(f"held-out: class err {test_m['class_err']:.2e}, bbox mae {test_m['bbox_mae']:.2e}")
    n_examples = args.train_size * args.epochs
    print(f"training: {train_s:.1f} s ({n_examples / train_s:.1f} examples/s)")

    t0 = time.perf_counter()
    dets = detect_all(net, res.params, res.state, te.images, args.batch_size,
                      args.nms_threshold)
    detect_s = time.perf_counter() - t0
    voc = det.voc_map(dets, te.targets, num_classes=args.num_classes)
    voc11 = det.voc_map(dets, te.targets, method="11point", num_classes=args.num_classes)
    coco = det.coco_map(dets, te.targets, num_classes=args.num_classes)
    print(f"held-out mAP@0.5 (VOC, area) {voc['map']:.4f}, (VOC, 11-point) {voc11['map']:.4f}, "
          f"COCO mAP@[.5:.95] {coco['map']:.4f} (mAP@.75 {coco['map75']:.4f}); detection "
          f"{detect_s:.1f} s for {len(te.images)} images")
    png = det.save_detection_grid(os.path.join(args.out, "detections.png"), te.images[:8],
                                  dets[:8], ground_truth=te.targets[:8],
                                  score_threshold=args.display_threshold)
    print(f"saved {png}; total {time.perf_counter() - t_start:.1f} s")
    return {"train": train_m, "train_eval": after, "test": test_m, "voc_map": voc["map"],
            "voc_map_11": voc11["map"], "coco_map": coco["map"], "train_seconds": train_s,
            "png": png, "history": res.history.rows}


if __name__ == "__main__":
    import fdl.runtime

    fdl.runtime.tune_allocator()  # glibc tuning for this script's process (fdl.runtime)
    main(sys.argv[1:])
