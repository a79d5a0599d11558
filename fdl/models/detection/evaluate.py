"""Detection metrics on the host (NumPy): VOC-style mAP@0.5 (11-point or area) and COCO-style
mAP@[.5:.95].

Inputs, for ``N`` images:

- ``detections``: a list of ``N`` arrays ``(k_i, 6)`` rows ``(class, score, x0, y0, x1, y1)``
  (what :func:`~fdl.models.detection.detections_to_list` returns; rows with class ``< 0`` are
  ignored), or one padded array ``(N, K, 6)``.
- ``ground_truth``: ``(N, max_objects, 5)`` rows ``(class, x0, y0, x1, y1)`` padded with class
  ``-1`` (the readers' ``targets``), or a list of ``(m_i, 5)`` arrays.
- ``difficult``: optional ``(N, max_objects)`` bool (VOC): such objects are neither required
  nor penalised.

Boxes are continuous coordinates (normalised or pixels, as long as both sides agree); IoU is
the continuous ``inter / union`` (no "+1" pixel convention).

**VOC** (the devkit's ``voc_eval``): per class, detections of all images sorted by score; each
is a true positive if its best IoU with a ground-truth box of its class in its image is
``> iou_threshold`` (strictly, as the devkit) and that box is not matched yet (a difficult box
makes it neither), else a false positive. AP is the 11-point interpolated precision (VOC2007)
or the area under the monotone precision envelope (VOC2010+). mAP averages the classes that
have ground truth.

**COCO** (``COCOeval`` with ``areaRng="all"``, no crowd): per image and class the
``max_detections`` best detections are matched greedily (IoU ``>= t``) for every ``t`` in
``0.50:0.05:0.95``; precision is interpolated at 101 recall points; AP averages those, mAP the
classes with ground truth and the thresholds (``map50``, ``map75`` the single thresholds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["voc_ap", "voc_map", "coco_map", "pairwise_iou"]


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n, 4)``, ``(m, 4)`` corner boxes -> ``(n, m)`` IoU (0 where the union is empty)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _as_lists(detections, ground_truth, difficult):
    if isinstance(detections, np.ndarray) or hasattr(detections, "shape"):
        d = np.asarray(detections)
        if d.ndim != 3 or d.shape[-1] != 6:
            raise ValueError(f"detections must be (N, K, 6) or a list of (k, 6), got {d.shape}")
        detections = list(d)
    dets = []
    for i, d in enumerate(detections):
        d = np.asarray(d, np.float64).reshape(-1, 6)
        if not np.all(np.isfinite(d)):
            raise ValueError(f"detections of image {i} contain NaN or infinite values")
        dets.append(d[d[:, 0] >= 0])
    if isinstance(ground_truth, np.ndarray) or hasattr(ground_truth, "shape"):
        g = np.asarray(ground_truth)
        if g.ndim != 3 or g.shape[-1] != 5:
            raise ValueError(f"ground_truth must be (N, M, 5) or a list of (m, 5), got {g.shape}")
        ground_truth = list(g)
    gts, diffs = [], []
    for i, g in enumerate(ground_truth):
        g = np.asarray(g, np.float64).reshape(-1, 5)
        keep = g[:, 0] >= 0
        gts.append(g[keep])
        if difficult is None:
            diffs.append(np.zeros(int(keep.sum()), bool))
        else:
            diffs.append(np.asarray(difficult[i], bool)[: len(keep)][keep])
    if len(dets) != len(gts):
        raise ValueError(f"{len(dets)} images of detections but {len(gts)} of ground truth")
    return dets, gts, diffs


def voc_ap(recall: np.ndarray, precision: np.ndarray, method: str = "area") -> float:
    """Average precision from a precision/recall curve: ``"11point"`` (VOC2007: mean of the
    best precision at recall >= 0, 0.1, ..., 1) or ``"area"`` (VOC2010+: area under the
    monotone envelope)."""
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if method == "11point":
        return float(np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0
                              for t in np.linspace(0, 1, 11)]))
    if method != "area":
        raise ValueError(f"voc_ap: method must be 'area' or '11point', got {method!r}")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_map(detections, ground_truth, *, iou_threshold: float = 0.5, method: str = "area",
            difficult=None, num_classes: int | None = None) -> dict:
    """VOC mAP: ``{"map": float, "ap": {class: AP}, "npos": {class: count}}`` (see the module
    docstring). ``num_classes`` (default: from the data) fixes which classes count."""
    dets, gts, diffs = _as_lists(detections, ground_truth, difficult)
    classes = _classes(dets, gts, num_classes)
    ap, npos_by = {}, {}
    for c in classes:
        scores, img_ids, boxes = [], [], []
        for i, d in enumerate(dets):
            sel = d[d[:, 0] == c]
            scores.append(sel[:, 1])
            img_ids.append(np.full(len(sel), i))
            boxes.append(sel[:, 2:])
        scores, img_ids, boxes = (np.concatenate(scores), np.concatenate(img_ids),
                                  np.concatenate(boxes).reshape(-1, 4))
        gt_c = [g[g[:, 0] == c, 1:] for g in gts]
        diff_c = [df[g[:, 0] == c] for g, df in zip(gts, diffs, strict=True)]
        npos = int(sum((~df).sum() for df in diff_c))
        npos_by[c] = npos
        if npos == 0:
            continue
        used = [np.zeros(len(g), bool) for g in gt_c]
        order = np.argsort(-scores, kind="stable")
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        for r, k in enumerate(order):
            g = gt_c[img_ids[k]]
            if len(g) == 0:
                fp[r] = 1
                continue
            ious = pairwise_iou(boxes[k], g)[0]
            j = int(np.argmax(ious))
            if ious[j] > iou_threshold:
                if diff_c[img_ids[k]][j]:
                    continue
                if not used[img_ids[k]][j]:
                    tp[r] = 1
                    used[img_ids[k]][j] = True
                else:
                    fp[r] = 1
            else:
                fp[r] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap[c] = voc_ap(rec, prec, method)
    return {"map": float(np.mean(list(ap.values()))) if ap else 0.0, "ap": ap, "npos": npos_by}


def _classes(dets, gts, num_classes):
    if num_classes is not None:
        return list(range(num_classes))
    found = set()
    for d in dets:
        found.update(d[:, 0].astype(int).tolist())
    for g in gts:
        found.update(g[:, 0].astype(int).tolist())
    return sorted(found)


def _coco_image(d: np.ndarray, g: np.ndarray, thresholds: np.ndarray, max_dets: int):
    """Per image and class: (scores, matched (T, D) bool) of its best ``max_dets`` detections."""
    order = np.argsort(-d[:, 0], kind="mergesort")[:max_dets]
    d = d[order]
    matched = np.zeros((len(thresholds), len(d)), bool)
    if len(g) and len(d):
        ious = pairwise_iou(d[:, 1:], g)
        for t, thr in enumerate(thresholds):
            taken = np.zeros(len(g), bool)
            for k in range(len(d)):
                best, m = min(thr, 1 - 1e-10), -1
                for j in range(len(g)):
                    if taken[j] or ious[k, j] < best:
                        continue
                    best, m = ious[k, j], j
                if m >= 0:
                    taken[m] = True
                    matched[t, k] = True
    return d[:, 0], matched


def coco_map(detections, ground_truth, *, iou_thresholds: Sequence[float] | None = None,
             max_detections: int = 100, num_classes: int | None = None) -> dict:
    """COCO mAP: ``{"map": mAP@[.5:.95], "map50", "map75", "ap": {class: AP over thresholds}}``
    (see the module docstring)."""
    thresholds = (np.linspace(0.5, 0.95, 10) if iou_thresholds is None
                  else np.asarray(iou_thresholds, np.float64))
    rec_points = np.linspace(0, 1, 101)
    dets, gts, _ = _as_lists(detections, ground_truth, None)
    classes = _classes(dets, gts, num_classes)
    per_class = {}  # class -> (T,) AP
    for c in classes:
        scores, matches, npos = [], [], 0
        for d, g in zip(dets, gts, strict=True):
            dc, gc = d[d[:, 0] == c][:, 1:], g[g[:, 0] == c][:, 1:]
            npos += len(gc)
            s, m = _coco_image(dc, gc, thresholds, max_detections)
            scores.append(s)
            matches.append(m)
        if npos == 0:
            continue
        scores = np.concatenate(scores)
        m = np.concatenate(matches, axis=1)
        order = np.argsort(-scores, kind="mergesort")
        tps = np.cumsum(m[:, order], axis=1)
        fps = np.cumsum(~m[:, order], axis=1)
        ap = np.zeros(len(thresholds))
        for t in range(len(thresholds)):
            rc = tps[t] / npos
            pr = tps[t] / np.maximum(tps[t] + fps[t], np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
            idx = np.searchsorted(rc, rec_points, side="left")
            q = np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)] if len(pr) else 0, 0)
            ap[t] = float(np.mean(q))
        per_class[c] = ap
    if not per_class:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, "ap": {}}
    table = np.stack(list(per_class.values()))
    out = {"map": float(table.mean()), "ap": {c: float(v.mean()) for c, v in per_class.items()}}
    for name, thr in (("map50", 0.5), ("map75", 0.75)):
        hit = np.nonzero(np.isclose(thresholds, thr))[0]
        out[name] = float(table[:, hit[0]].mean()) if len(hit) else float("nan")
    return out
