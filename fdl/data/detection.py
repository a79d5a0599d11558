"""Detection data without a download: a banana-style generator, and readers for the banana
dataset's format and for Pascal VOC annotations in a local directory.

**The banana format** (d2l ch. 14.6): a directory with ``label.csv`` (header ``img_name,label,
xmin,ymin,xmax,ymax``; one row per object, pixel coordinates) and ``images/<img_name>``.
:func:`generate_banana_dataset` writes such a directory: every image is a random background
(smooth colour fields, texture, noise and distractor blobs) with 1..``max_objects`` procedurally
drawn objects pasted at random positions, scales and rotations, the box the tight bounds of the
pasted mask. Class 0 is a banana-like crescent; further classes are other shapes (disc,
triangle, ring, cross), so multi-class sets can be made too.

**Readers** return a :class:`DetectionSet`: ``images`` ``(N, H, W, 3)`` float32 in ``[0, 1]``
and ``targets`` ``(N, max_objects, 5)`` float32 rows ``(class, x0, y0, x1, y1)`` with
coordinates divided by the image width/height (the book's layout), padded with rows of ``-1``
(the layout :func:`fdl.models.detection.multibox_target` takes). Everything is checked while
reading: a missing file names the path, and NaN or inverted boxes, boxes outside the image,
unknown or out-of-range classes, images without objects and more objects than ``max_objects``
are errors naming the image, never a silently wrong target.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fdl.data.datasets import DatasetError, DatasetNotFoundError
from fdl.ops.boxes import check_boxes

__all__ = [
    "DetectionSet",
    "BANANA_HEADER",
    "VOC_CLASSES",
    "SHAPES",
    "generate_banana_dataset",
    "read_banana_dataset",
    "read_voc_detection",
    "pad_targets",
]

BANANA_HEADER = ("img_name", "label", "xmin", "ymin", "xmax", "ymax")
SHAPES = ("banana", "disc", "triangle", "ring", "cross")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


class DetectionSet(NamedTuple):
    """``images`` ``(N, H, W, 3)`` float32 in ``[0, 1]``; ``targets`` ``(N, max_objects, 5)``
    float32 (normalised corners, ``-1`` rows for padding); ``difficult`` ``(N, max_objects)``
    bool (VOC's flag; all False otherwise); ``names`` the image file names."""

    images: np.ndarray
    targets: np.ndarray
    difficult: np.ndarray
    names: list[str]


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading and writing images needs pillow: pip install 'fdl[train]'"
                          ) from None
    return Image


# ----------------------------------------------------------------------------- padding


def pad_targets(per_image: Sequence[np.ndarray], max_objects: int | None = None, *,
                num_classes: int | None = None, names: Sequence[str] | None = None,
                allow_empty: bool = False) -> np.ndarray:
    """Stack per-image ``(k_i, 5)`` rows ``(class, x0, y0, x1, y1)`` into ``(N, max_objects,
    5)`` padded with ``-1`` rows. ``max_objects`` defaults to the largest ``k_i``; an image with
    more objects is an error (as are bad boxes or classes, see :func:`fdl.ops.check_boxes`)."""
    names = list(names) if names is not None else [f"image {i}" for i in range(len(per_image))]
    counts = [len(r) for r in per_image]
    if max_objects is None:
        max_objects = max(counts, default=0)
    if not isinstance(max_objects, int) or max_objects < 1:
        raise ValueError(f"pad_targets: max_objects must be an integer >= 1, got {max_objects!r}"
                         " (is every image empty?)")
    out = np.full((len(per_image), max_objects, 5), -1, np.float32)
    for i, (rows, name) in enumerate(zip(per_image, names, strict=True)):
        rows = np.asarray(rows, np.float64).reshape(-1, 5)
        if len(rows) > max_objects:
            raise DatasetError(f"{name}: {len(rows)} objects, more than max_objects="
                               f"{max_objects}; raise max_objects")
        check_boxes(rows[:, 1:], rows[:, 0], num_classes=num_classes, name=name,
                    allow_empty=allow_empty)
        out[i, :len(rows)] = rows
    return out


def _check_inside(name: str, rows: np.ndarray, width: int, height: int, tol: float = 1.0):
    bad = ((rows[:, 1] < -tol) | (rows[:, 2] < -tol) | (rows[:, 3] > width + tol)
           | (rows[:, 4] > height + tol))
    if bad.any():
        r = rows[np.argmax(bad)]
        raise DatasetError(f"{name}: box {r[1:].tolist()} lies outside the {width}x{height} image")


# ----------------------------------------------------------------------------- generator


def _smooth_field(rng, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """A random field of ``cells x cells`` values bilinearly upsampled to ``size x size``."""
    grid = rng.uniform(0, 1, (cells + 1, cells + 1, channels))
    t = np.linspace(0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = (t - i)[:, None]
    rows = grid[i] * (1 - f[..., None]) + grid[i + 1] * f[..., None]  # (size, cells+1, C)
    cols = rows[:, i] * (1 - f.T[..., None]) + rows[:, i + 1] * f.T[..., None]
    return cols


def _background(rng, size: int) -> np.ndarray:
    img = 0.6 * _smooth_field(rng, size, int(rng.integers(1, 4)))
    img += 0.3 * _smooth_field(rng, size, int(rng.integers(6, 24)))
    img += rng.normal(0, 0.04, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(2, 9))):  # distractor blobs (rectangles and ellipses)
        c = rng.uniform(0, size, 2)
        r = rng.uniform(0.03, 0.2, 2) * size
        colour = rng.uniform(0, 1, 3)
        if rng.uniform() < 0.5:
            mask = ((xx - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 < 1
        else:
            mask = (np.abs(xx - c[0]) < r[0]) & (np.abs(yy - c[1]) < r[1])
        img[mask] = 0.5 * img[mask] + 0.5 * colour
    return np.clip(img, 0, 1)


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Mask and colour of a unit-size shape at object coordinates ``(u, v)`` in [-1, 1]."""
    r2 = u * u + v * v
    if kind == "banana":
        inner = (u - 0.55) ** 2 + (v + 0.35) ** 2
        mask = (r2 < 1.0) & (inner > 0.95) & (v > -0.55)
        colour = np.stack([0.95 + 0 * u, 0.78 + 0.12 * v, 0.12 + 0 * u], -1)
        tips = (u < -0.7) | ((u > 0.2) & (v < -0.3))
        colour = np.where(tips[..., None], [0.45, 0.32, 0.08], colour)
        return mask, colour
    base = rng.uniform(0.1, 0.9, 3)
    colour = np.broadcast_to(base, (*u.shape, 3))
    if kind == "disc":
        return r2 < 1.0, colour
    if kind == "ring":
        return (r2 < 1.0) & (r2 > 0.45), colour
    if kind == "triangle":
        return (v < 0.8) & (v > -1 + 2 * np.abs(u) * 0.9), colour
    if kind == "cross":
        return ((np.abs(u) < 0.3) | (np.abs(v) < 0.3)) & (np.abs(u) < 1) & (np.abs(v) < 1), colour
    raise ValueError(f"unknown shape {kind!r}; valid: {SHAPES}")


def _paste(rng, img: np.ndarray, kind: str, scale: tuple[float, float]):
    """Paste one object; return its tight pixel box ``(x0, y0, x1, y1)`` or None if it ended
    up too small to see."""
    size = img.shape[0]
    side = rng.uniform(*scale) * size
    aspect = rng.uniform(0.6, 1.6)
    half_w, half_h = side * np.sqrt(aspect) / 2, side / np.sqrt(aspect) / 2
    cx = rng.uniform(half_w * 0.6, size - half_w * 0.6)
    cy = rng.uniform(half_h * 0.6, size - half_h * 0.6)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - cx, yy - cy
    u = (np.cos(theta) * dx + np.sin(theta) * dy) / half_w
    v = (-np.sin(theta) * dx + np.cos(theta) * dy) / half_h
    mask, colour = _shape_mask(kind, u, v, rng)
    if mask.sum() < 16:
        return None
    shade = 0.85 + 0.15 * np.clip(1 - (u * u + v * v), 0, 1)
    img[mask] = np.clip(colour[mask] * shade[mask, None] + rng.normal(0, 0.03, (mask.sum(), 3)),
                        0, 1)
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _iou_1(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _generate_image(rng, size, num_classes, max_objects, scale):
    while True:
        img = _background(rng, size)
        k = int(rng.integers(1, max_objects + 1))
        rows = []
        for _ in range(k):
            cls = int(rng.integers(0, num_classes))
            before = img.copy()
            box = _paste(rng, img, SHAPES[cls], scale)
            # keep objects apart enough to stay separable (later ones would hide earlier ones)
            if box is None or any(_iou_1(box, r[1:]) > 0.3 for r in rows):
                img = before
                continue
            rows.append((cls, *box))
        if rows:
            return img, rows


def generate_banana_dataset(directory: str, num_images: int, *, image_size: int = 256,
                            num_classes: int = 1, max_objects: int = 1,
                            scale: tuple[float, float] = (0.15, 0.45), seed: int = 0,
                            overwrite: bool = False) -> str:
    """Write ``num_images`` synthetic images in the banana format to ``directory``.

    Each image (``image_size`` square PNG) gets 1..``max_objects`` objects of classes
    ``0..num_classes-1`` (``SHAPES[c]``; class 0 the banana-like crescent) whose size is
    ``scale`` times the image side. Deterministic in ``seed``. The directory is written
    atomically (a temporary sibling renamed into place); an existing one is refused unless
    ``overwrite``. Returns ``directory``.
    """
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"generate_banana_dataset: num_images must be >= 1, got {num_images!r}")
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"generate_banana_dataset: num_classes must be in 1..{len(SHAPES)}, "
                         f"got {num_classes!r}")
    if not isinstance(max_objects, int) or max_objects < 1:
        raise ValueError(f"generate_banana_dataset: max_objects must be >= 1, got {max_objects!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"generate_banana_dataset: image_size must be >= 16, got {image_size!r}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"generate_banana_dataset: scale must satisfy 0 < lo <= hi <= 1, got "
                         f"{scale!r}")
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"generate_banana_dataset: '{directory}' exists; pass "
                              "overwrite=True to replace it")
    image_cls = _pil()
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "images"))
        rng = np.random.default_rng(seed)
        with open(os.path.join(tmp, "label.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(BANANA_HEADER)
            for i in range(num_images):
                img, rows = _generate_image(rng, image_size, num_classes, max_objects, scale)
                name = f"{i}.png"
                image_cls.fromarray((img * 255 + 0.5).astype(np.uint8)).save(
                    os.path.join(tmp, "images", name))
                for cls, x0, y0, x1, y1 in rows:
                    w.writerow([name, cls, int(x0), int(y0), int(x1), int(y1)])
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ----------------------------------------------------------------------------- readers


def _load_image(path: str, size: tuple[int, int] | None):
    image_cls = _pil()
    try:
        with image_cls.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if size is not None and (h, w) != tuple(size):
                im = im.resize((size[1], size[0]), image_cls.BILINEAR)
            return np.asarray(im, np.float32) / 255.0, w, h
    except FileNotFoundError:
        raise DatasetNotFoundError(f"image '{path}' is missing") from None
    except OSError as e:
        raise DatasetError(f"cannot read image '{path}': {e}") from None


def _stack(name: str, images: list[np.ndarray], names: list[str]) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        first = images[0].shape
        odd = next(n for n, im in zip(names, images, strict=True) if im.shape != first)
        raise DatasetError(f"{name}: images differ in size ({names[0]} is {first[:2]}, {odd} is "
                           f"{next(im.shape for im in images if im.shape != first)[:2]}); pass "
                           "image_size= to resize them")
    return np.stack(images)


def read_banana_dataset(directory: str, *, max_objects: int | None = None,
                        num_classes: int | None = None,
                        image_size: tuple[int, int] | None = None) -> DetectionSet:
    """Read a banana-format directory (``label.csv`` + ``images/``) into a
    :class:`DetectionSet` (coordinates normalised by the image width and height; images
    resized to ``image_size = (height, width)`` if given, boxes scaled with them).

    ``max_objects`` defaults to the most objects any image has; ``num_classes``, if given,
    bounds the class ids. Raises :class:`~fdl.data.DatasetNotFoundError` for a missing
    directory, ``label.csv`` or image, and :class:`~fdl.data.DatasetError` for a malformed
    row, a bad box or class, or a box outside its image."""
    label_csv = os.path.join(directory, "label.csv")
    if not os.path.isfile(label_csv):
        raise DatasetNotFoundError(
            f"banana dataset: looked for '{label_csv}' (and images in "
            f"'{os.path.join(directory, 'images')}') and found no label.csv; generate one with "
            "fdl.data.detection.generate_banana_dataset")
    rows_by_image: dict[str, list[list[float]]] = {}
    with open(label_csv, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != BANANA_HEADER:
            raise DatasetError(f"{label_csv}: expected the header {','.join(BANANA_HEADER)}, "
                               f"got {header}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 6:
                raise DatasetError(f"{label_csv}:{line}: expected 6 fields, got {row}")
            try:
                values = [float(v) for v in row[1:]]
            except ValueError:
                raise DatasetError(f"{label_csv}:{line}: non-numeric field in {row}") from None
            rows_by_image.setdefault(row[0], []).append(values)
    if not rows_by_image:
        raise DatasetError(f"{label_csv}: no objects listed (an empty ground-truth set)")
    names = list(rows_by_image)
    images, per_image = [], []
    for name in names:
        img, w, h = _load_image(os.path.join(directory, "images", name), image_size)
        rows = np.asarray(rows_by_image[name], np.float64)
        where = f"{label_csv} ({name})"
        check_boxes(rows[:, 1:], rows[:, 0], num_classes=num_classes, name=where)
        _check_inside(where, rows, w, h)
        rows[:, [1, 3]] /= w
        rows[:, [2, 4]] /= h
        images.append(img)
        per_image.append(rows)
    targets = pad_targets(per_image, max_objects, num_classes=num_classes, names=names)
    return DetectionSet(_stack(directory, images, names), targets,
                        np.zeros(targets.shape[:2], bool), names)


def _voc_root(root: str) -> str:
    cands = [root, os.path.join(root, "VOC2012"), os.path.join(root, "VOC2007"),
             os.path.join(root, "VOCdevkit", "VOC2012"), os.path.join(root, "VOCdevkit",
                                                                      "VOC2007")]
    for c in cands:
        if os.path.isdir(os.path.join(c, "Annotations")):
            return c
    raise DatasetNotFoundError(f"Pascal VOC: no Annotations/ directory in any of {cands}")


def _voc_objects(path: str, classes: Sequence[str], keep_difficult: bool):
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"annotation '{path}' is missing") from None
    except ET.ParseError as e:
        raise DatasetError(f"{path}: not valid XML ({e})") from None
    root = tree.getroot()
    fname = root.findtext("filename")
    rows, difficult = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise DatasetError(f"{path}: unknown class {name!r}; valid classes: {list(classes)}")
        diff = (obj.findtext("difficult") or "0").strip() == "1"
        if diff and not keep_difficult:
            continue
        box = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DatasetError(f"{path}: object {name!r} has a missing or non-numeric bndbox"
                               ) from None
        # VOC's pixel indices are 1-based and inclusive: continuous corners (x0 - 1, x1)
        rows.append([classes.index(name), x0 - 1, y0 - 1, x1, y1])
        difficult.append(diff)
    return fname, rows, difficult


def read_voc_detection(root: str, split: str = "train", *,
                       image_size: tuple[int, int] | None = (256, 256),
                       classes: Sequence[str] = VOC_CLASSES, max_objects: int | None = None,
                       keep_difficult: bool = True, max_images: int | None = None,
                       allow_empty: bool = False) -> DetectionSet:
    """Read Pascal VOC detection annotations from a local directory.

    ``root`` is a ``VOC2007``/``VOC2012`` directory (with ``Annotations/``, ``JPEGImages/``,
    ``ImageSets/Main/<split>.txt``) or a directory holding one (``VOCdevkit/VOC2012``...).
    Images are resized to ``image_size = (height, width)`` (``None``: all must share a size)
    and boxes normalised to ``[0, 1]``; ``difficult`` objects are kept (and flagged in
    :attr:`DetectionSet.difficult`, which VOC's mAP ignores) unless ``keep_difficult=False``.
    An image without objects is an error unless ``allow_empty``."""
    base = _voc_root(root)
    split_file = os.path.join(base, "ImageSets", "Main", f"{split}.txt")
    if os.path.isfile(split_file):
        with open(split_file) as fh:
            ids = [ln.split()[0] for ln in fh if ln.strip()]
    else:
        ann = os.path.join(base, "Annotations")
        ids = sorted(f[:-4] for f in os.listdir(ann) if f.endswith(".xml"))
        if not ids:
            raise DatasetNotFoundError(f"Pascal VOC: no split file '{split_file}' and no .xml "
                                       f"files in '{ann}'")
    if max_images is not None:
        ids = ids[:max_images]
    images, per_image, flags, names = [], [], [], []
    for i in ids:
        xml = os.path.join(base, "Annotations", f"{i}.xml")
        fname, rows, diff = _voc_objects(xml, tuple(classes), keep_difficult)
        img, w, h = _load_image(os.path.join(base, "JPEGImages", fname or f"{i}.jpg"),
                                image_size)
        rows = np.asarray(rows, np.float64).reshape(-1, 5)
        check_boxes(rows[:, 1:], rows[:, 0], num_classes=len(classes), name=xml,
                    allow_empty=allow_empty)
        _check_inside(xml, rows, w, h)
        rows[:, [1, 3]] /= w
        rows[:, [2, 4]] /= h
        images.append(img)
        per_image.append(rows)
        flags.append(diff)
        names.append(fname or f"{i}.jpg")
    targets = pad_targets(per_image, max_objects, num_classes=len(classes), names=names,
                          allow_empty=allow_empty)
    difficult = np.zeros(targets.shape[:2], bool)
    for k, d in enumerate(flags):
        difficult[k, :len(d)] = d
    return DetectionSet(_stack(root, images, names), targets, difficult, names)
