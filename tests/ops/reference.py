"""Independent NumPy references for the box ops, written from torchvision's documented semantics
and its CPU kernels' loops (plain Python loops, float32 arithmetic, no vectorised tricks).

They serve twice: the tests compare fdl with them on hypothesis-drawn inputs, and
``test_torchvision_golden.py`` checks them (and fdl) against outputs recorded from
``torchvision.ops`` itself (``torchvision_golden.npz``, made by ``make_torchvision_golden.py``
in an environment where torchvision imports; it does not beside torch 2.13.0+cpu).
"""

from __future__ import annotations

import math

import numpy as np

f32 = np.float32


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """torchvision's ``box_iou``: ``inter / (area_a + area_b - inter)`` in float32."""
    a = a.astype(f32)
    b = b.astype(f32)
    out = np.zeros((len(a), len(b)), f32)
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = _iou(a[i], b[j])
    return out


def _iou(p, q):
    w = max(f32(0), min(p[2], q[2]) - max(p[0], q[0]))
    h = max(f32(0), min(p[3], q[3]) - max(p[1], q[1]))
    inter = f32(w * h)
    area_p = f32((p[2] - p[0]) * (p[3] - p[1]))
    area_q = f32((q[2] - q[0]) * (q[3] - q[1]))
    union = f32(area_p + area_q - inter)
    with np.errstate(invalid="ignore", divide="ignore"):
        return f32(inter / union)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision's CPU ``nms``: stable descending sort, suppress ``iou > threshold`` (the
    float32 IoU compared with the double threshold)."""
    boxes = boxes.astype(f32)
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for a, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(int(i))
        for j in order[a + 1:]:
            if not suppressed[j] and float(_iou(boxes[i], boxes[j])) > iou_threshold:
                suppressed[j] = True
    return np.asarray(keep, np.int64)


def batched_nms(boxes, scores, idxs, iou_threshold):
    """torchvision's coordinate-offset ``batched_nms`` (its path for up to 1000 boxes on CPU)."""
    boxes = boxes.astype(f32)
    if len(boxes) == 0:
        return np.zeros((0,), np.int64)
    offsets = idxs.astype(f32) * (boxes.max() + f32(1))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def batched_nms_per_class(boxes, scores, idxs, iou_threshold):
    """torchvision's other ``batched_nms`` path (over 1000 boxes on CPU): ``nms`` per class,
    the union sorted by decreasing score."""
    keep = []
    for c in np.unique(idxs):
        where = np.nonzero(idxs == c)[0]
        keep.extend(where[nms(boxes[where], scores[where], iou_threshold)])
    keep = np.asarray(keep, np.int64)
    return keep[np.argsort(-scores[keep].astype(np.float64), kind="stable")]


def _bilinear(fmap, y, x):
    """torchvision's ``bilinear_interpolate`` on one ``(H, W, C)`` map."""
    h, w = fmap.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(fmap.shape[2], f32)
    y, x = max(y, f32(0)), max(x, f32(0))
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = f32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = f32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = f32(y - y_low), f32(x - x_low)
    hy, hx = f32(1) - ly, f32(1) - lx
    return (hy * hx * fmap[y_low, x_low] + hy * lx * fmap[y_low, x_high]
            + ly * hx * fmap[y_high, x_low] + ly * lx * fmap[y_high, x_high])


def roi_align(features, boxes, box_indices, output_size, spatial_scale, sampling_ratio,
              aligned):
    """torchvision's CPU ``roi_align`` loops, channels last: ``(N, H, W, C)`` -> ``(K, oh,
    ow, C)``."""
    features = features.astype(f32)
    oh, ow = output_size
    out = np.zeros((len(boxes), oh, ow, features.shape[-1]), f32)
    off = f32(0.5) if aligned else f32(0)
    s = f32(spatial_scale)
    for k, (b, bi) in enumerate(zip(boxes.astype(f32), box_indices, strict=True)):
        x0, y0, x1, y1 = (f32(v * s - off) for v in b)
        rw, rh = f32(x1 - x0), f32(y1 - y0)
        if not aligned:
            rw, rh = max(rw, f32(1)), max(rh, f32(1))
        bh, bw = f32(rh / f32(oh)), f32(rw / f32(ow))
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / f32(oh))
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / f32(ow))
        count = max(gh * gw, 1)
        for p in range(oh):
            for q in range(ow):
                acc = np.zeros(features.shape[-1], np.float64)
                for iy in range(gh):
                    y = f32(y0 + f32(p) * bh + f32(iy + 0.5) * bh / f32(gh))
                    for ix in range(gw):
                        x = f32(x0 + f32(q) * bw + f32(ix + 0.5) * bw / f32(gw))
                        acc += _bilinear(features[bi], y, x)
                out[k, p, q] = acc / count
    return out


def _round_half_away(v):
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def roi_pool(features, boxes, box_indices, output_size, spatial_scale):
    """torchvision's CPU ``roi_pool`` loops, channels last."""
    features = features.astype(f32)
    n, h, w, c = features.shape
    oh, ow = output_size
    out = np.zeros((len(boxes), oh, ow, c), f32)
    s = f32(spatial_scale)
    for k, (b, bi) in enumerate(zip(boxes.astype(f32), box_indices, strict=True)):
        x0, y0, x1, y1 = (_round_half_away(float(f32(v * s))) for v in b)
        rw, rh = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        bh, bw = f32(f32(rh) / f32(oh)), f32(f32(rw) / f32(ow))
        for p in range(oh):
            hs = min(max(math.floor(f32(p) * bh) + y0, 0), h)
            he = min(max(math.ceil(f32(p + 1) * bh) + y0, 0), h)
            for q in range(ow):
                ws = min(max(math.floor(f32(q) * bw) + x0, 0), w)
                we = min(max(math.ceil(f32(q + 1) * bw) + x0, 0), w)
                if he <= hs or we <= ws:
                    continue
                out[k, p, q] = features[bi, hs:he, ws:we].max(axis=(0, 1))
    return out
