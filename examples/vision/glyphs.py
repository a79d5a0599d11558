"""Generated letters in the look of scikit-learn's 8x8 digits: the pretraining data of the
fine-tuning demo (``finetune.py``).

Each image is one character of a set (``LETTERS``: the 26 capitals; ``CHARACTERS``: capitals,
small letters and printed digits, 62 classes, the demo's default) drawn with Pillow's built-in
font (no font file is needed) at a random size, stroke weight, rotation, shear and position,
optionally warped by an elastic distortion (a handwriting look), reduced to 8x8 by area
averaging (as the UCI digits were made: 32x32 bitmaps counted in 4x4 blocks) and scaled to
``[0, 1]``: white-on-black, blurry, low-resolution glyphs made of the same kind of strokes as the
handwritten digits (these glyphs play the part of ImageNet in the book's example).
"""

from __future__ import annotations

import string

import numpy as np

__all__ = ["make_letters", "make_glyphs", "LETTERS", "CHARACTERS"]

LETTERS = string.ascii_uppercase
# capital and small letters and printed digits: 62 classes (the printed digits play the part of
# ImageNet's own hot-dog class in the book's example)
CHARACTERS = string.ascii_uppercase + string.ascii_lowercase + string.digits


def _elastic(rng: np.random.Generator, img, strength: float = 2.5):
    """A smooth random displacement of every pixel (Simard et al.'s elastic distortion, the
    look of handwriting): a 4x4 grid of random offsets, bilinearly upsampled."""
    from PIL import Image

    a = np.asarray(img, np.float32)
    h, w = a.shape
    fields = []
    for _ in range(2):
        coarse = rng.normal(0.0, strength, size=(4, 4)).astype(np.float32)
        fields.append(np.asarray(Image.fromarray(coarse, mode="F").resize((w, h),
                                                                         Image.BILINEAR)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sy = np.clip(yy + fields[0], 0, h - 1.001)
    sx = np.clip(xx + fields[1], 0, w - 1.001)
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    ty, tx = sy - y0, sx - x0
    out = ((1 - ty) * (1 - tx) * a[y0, x0] + (1 - ty) * tx * a[y0, x0 + 1]
           + ty * (1 - tx) * a[y0 + 1, x0] + ty * tx * a[y0 + 1, x0 + 1])
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _glyph(rng: np.random.Generator, letter: str, font_cache: dict, elastic: bool = False
           ) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(20, 29))
    if size not in font_cache:
        font_cache[size] = ImageFont.load_default(size=size)
    canvas = Image.new("L", (48, 48), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((24, 24), letter, fill=255, font=font_cache[size], anchor="mm",
              stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
    shear = rng.uniform(-0.3, 0.3)
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.85, 1.15)
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    # inverse affine map (output -> input pixel), centred, with a random shift
    a, b = c, s + shear * c
    d, e = -s, c - shear * s
    cx, cy = 24 + rng.uniform(-3, 3), 24 + rng.uniform(-3, 3)
    coeffs = (a, b, 24 - a * cx - b * cy, d, e, 24 - d * cx - e * cy)
    img = canvas.transform((48, 48), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    if elastic:
        img = _elastic(rng, img)
    box = img.getbbox()
    if box is None:
        return np.zeros((8, 8), np.float32)
    # crop to the glyph's square bounding box (as the digits are centred and size-normalised),
    # then count ink in an 8x8 grid
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) + 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    crop = img.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2),
                     int(cy + side / 2))).resize((32, 32), Image.BILINEAR)
    a = np.asarray(crop, np.float32).reshape(8, 4, 8, 4).mean(axis=(1, 3)) / 255.0
    return np.clip(a / max(a.max(), 1e-6) * rng.uniform(0.8, 1.0), 0.0, 1.0)


def make_glyphs(n_per_class: int, charset: str = LETTERS, *, seed: int = 0,
                elastic: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(images (len(charset) * n, 8, 8, 1) float32 in [0, 1], labels int32)``, shuffled;
    label ``k`` is ``charset[k]``; ``elastic`` adds a random elastic distortion to each."""
    rng = np.random.default_rng(seed)
    cache: dict = {}
    images, labels = [], []
    for k, ch in enumerate(charset):
        for _ in range(n_per_class):
            images.append(_glyph(rng, ch, cache, elastic))
            labels.append(k)
    order = rng.permutation(len(labels))
    x = np.stack(images)[order][..., None].astype(np.float32)
    return x, np.asarray(labels, np.int32)[order]


def make_letters(n_per_class: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 26 capital letters: :func:`make_glyphs` with ``LETTERS``."""
    return make_glyphs(n_per_class, LETTERS, seed=seed)
