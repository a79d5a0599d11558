"""Boxes drawn on images and saved as PNG (the book's ``show_bboxes`` / ``display``), with
Pillow; files are written atomically (a temporary file renamed into place)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np

__all__ = ["draw_boxes", "save_detection_grid"]

_COLOURS = [(255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (220, 64, 255),
            (0, 230, 230), (255, 128, 0), (160, 160, 160)]


def _pil():
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise ImportError("drawing boxes needs pillow: pip install 'fdl[train]'") from None
    return Image, ImageDraw


def _to_uint8(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"draw_boxes: expected an image (H, W, 3) or (H, W, 1), got {img.shape}")
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img


def draw_boxes(image, detections=None, *, ground_truth=None, score_threshold: float = 0.0,
               class_names: Sequence[str] | None = None, normalized: bool = True) -> np.ndarray:
    """Draw boxes on ``image`` ``(H, W, 3)`` (float in ``[0, 1]`` or uint8); return uint8.

    ``detections``: ``(k, 6)`` rows ``(class, score, x0, y0, x1, y1)`` (rows with class ``< 0``
    or score below ``score_threshold`` are skipped), labelled ``name=score``;
    ``ground_truth``: ``(m, 5)`` rows ``(class, x0, y0, x1, y1)`` drawn in white (class ``-1``
    rows skipped). ``normalized``: coordinates are fractions of the width/height."""
    image_cls, draw_mod = _pil()
    img = image_cls.fromarray(_to_uint8(image))
    h, w = img.height, img.width
    sx, sy = (w, h) if normalized else (1, 1)
    d = draw_mod.Draw(img)

    def name(c):
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)

    if ground_truth is not None:
        for r in np.asarray(ground_truth, np.float64).reshape(-1, 5):
            if r[0] >= 0:
                d.rectangle([r[1] * sx, r[2] * sy, r[3] * sx, r[4] * sy], outline=(255, 255, 255),
                            width=1)
    if detections is not None:
        for r in np.asarray(detections, np.float64).reshape(-1, 6):
            c = int(r[0])
            if c < 0 or r[1] < score_threshold:
                continue
            colour = _COLOURS[c % len(_COLOURS)]
            box = [r[2] * sx, r[3] * sy, r[4] * sx, r[5] * sy]
            d.rectangle(box, outline=colour, width=2)
            label = f"{name(c)}={r[1]:.2f}"
            tx, ty = max(box[0], 0) + 2, max(box[1], 0) + 1
            d.rectangle([tx - 2, ty - 1, tx + 6 * len(label) + 2, ty + 11], fill=colour)
            d.text((tx, ty), label, fill=(0, 0, 0))
    return np.asarray(img)


def save_detection_grid(path: str, images: Sequence, detections: Sequence | None = None, *,
                        ground_truth: Sequence | None = None, columns: int = 4, **kw) -> str:
    """Draw every image's boxes (:func:`draw_boxes`) and save the tiles as one PNG at
    ``path`` (atomically; parent directories are created). Returns ``path``."""
    image_cls, _ = _pil()
    if not len(images):
        raise ValueError("save_detection_grid: no images")
    tiles = [draw_boxes(im, None if detections is None else detections[i],
                        ground_truth=None if ground_truth is None else ground_truth[i], **kw)
             for i, im in enumerate(images)]
    h, w = tiles[0].shape[:2]
    if any(t.shape[:2] != (h, w) for t in tiles):
        raise ValueError("save_detection_grid: images must share one size")
    rows = -(-len(tiles) // columns)
    grid = np.zeros((rows * h, min(columns, len(tiles)) * w, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=out_dir)
    os.close(fd)
    try:
        image_cls.fromarray(grid).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
