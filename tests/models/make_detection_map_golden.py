"""Record pycocotools' COCO mAP on fixed random detections into ``detection_map_golden.json``.

pycocotools is not a project dependency; run this once where it is installed::

    pip install pycocotools && python tests/models/make_detection_map_golden.py

The JSON holds the inputs (ground truth and detections per image, pixel corners) and
``COCOeval``'s ``stats[0:3]`` (AP@[.5:.95], AP@.5, AP@.75; area "all", 100 detections).
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pycocotools
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detection_map_golden.json")


def make_case(rng, n_images=24, num_classes=3):
    gts, dets = [], []
    for _ in range(n_images):
        k = int(rng.integers(1, 5))
        xy = rng.uniform(0, 180, (k, 2))
        wh = rng.uniform(12, 70, (k, 2))
        g = np.concatenate([rng.integers(0, num_classes, (k, 1)), xy, xy + wh], 1)
        rows = []
        for r in g:  # a jittered true detection (sometimes with the wrong class), plus clutter
            if rng.uniform() < 0.85:
                jit = rng.normal(0, 0.12, 4) * np.r_[r[3] - r[1], r[4] - r[2]].repeat(2)
                c = r[0] if rng.uniform() < 0.9 else rng.integers(0, num_classes)
                rows.append([c, rng.uniform(0.3, 1.0), *(r[1:] + jit)])
        for _ in range(int(rng.integers(0, 4))):
            p = rng.uniform(0, 180, 2)
            rows.append([rng.integers(0, num_classes), rng.uniform(0, 0.8), *p,
                         *(p + rng.uniform(10, 60, 2))])
        d = np.asarray(rows, np.float64).reshape(-1, 6)
        d[:, 2:] = np.round(d[:, 2:], 3)
        d[:, 1] = np.round(d[:, 1], 4)
        gts.append(np.round(g, 3).tolist())
        dets.append(d.tolist())
    return gts, dets


def coco_stats(gts, dets, num_classes):
    images = [{"id": i + 1, "width": 256, "height": 256} for i in range(len(gts))]
    anns, k = [], 1
    for i, g in enumerate(gts):
        for c, x0, y0, x1, y1 in g:
            anns.append({"id": k, "image_id": i + 1, "category_id": int(c) + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "iscrowd": 0})
            k += 1
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c + 1} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        res = gt.loadRes([{"image_id": i + 1, "category_id": int(c) + 1, "score": s,
                           "bbox": [x0, y0, x1 - x0, y1 - y0]}
                          for i, d in enumerate(dets) for c, s, x0, y0, x1, y1 in d])
        ev = COCOeval(gt, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:3]]


def main() -> None:
    rng = np.random.default_rng(1202)
    cases = []
    for _ in range(3):
        gts, dets = make_case(rng)
        cases.append({"ground_truth": gts, "detections": dets, "num_classes": 3,
                      "coco_stats": coco_stats(gts, dets, 3)})
    with open(OUT, "w") as fh:
        json.dump({"pycocotools": pycocotools.__version__ if hasattr(pycocotools, "__version__")
                   else "2.x", "cases": cases}, fh)
    print(f"wrote {OUT}: {[c['coco_stats'] for c in cases]}")


if __name__ == "__main__":
    main()
