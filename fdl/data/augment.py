"""Image augmentation as pure functions ``aug(key, image) -> image``, usable inside ``jit``.

Images are ``(H, W, C)`` float arrays (values usually in ``[0, 1]``); every augmentation keeps
the dtype, and the shape unless its purpose is to change it (``resize``, ``random_crop``,
``random_resized_crop``, ``center_crop`` give ``(h, w, C)``). The same key gives the same
result. Apply per example over a batch with :func:`apply_batch` (``vmap`` over split keys).
Constructors validate their arguments and return the pure function::

    aug = compose(random_flip_left_right(), random_crop((28, 28), padding=2), normalize(m, s))
    x_aug = jax.jit(apply_batch, static_argnums=0)(aug, key, x)   # x: (N, H, W, C)

:func:`mixup` works on a whole batch: ``mixup(alpha)(key, images, labels_one_hot)``.

Training with augmentation: ``fit(augmented(model, from_spec("flip,crop")), ...)`` augments
every training batch on the device inside the compiled step (evaluation sees the raw images);
``fdl train --augment flip,crop`` does the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "Augmentation",
    "compose",
    "apply_batch",
    "random_flip_left_right",
    "random_flip_up_down",
    "random_crop",
    "center_crop",
    "resize",
    "random_resized_crop",
    "random_brightness",
    "random_contrast",
    "random_saturation",
    "random_hue",
    "color_jitter",
    "normalize",
    "cutout",
    "mixup",
    "from_spec",
    "augmented",
    "SPEC_NAMES",
]

Augmentation = Callable[[jax.Array, jax.Array], jax.Array]


def _size2(name: str, size) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"{name}: size must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _check_image(name: str, image) -> None:
    if image.ndim != 3:
        raise ValueError(f"{name}: expected an image (H, W, C), got shape {tuple(image.shape)}")


def _prob(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: p must be in [0, 1], got {p}")
    return float(p)


def compose(*augs: Augmentation) -> Augmentation:
    """Apply ``augs`` in order, each with its own key (``fold_in(key, i)``)."""

    def aug(key, image):
        for i, a in enumerate(augs):
            image = a(jax.random.fold_in(key, i), image)
        return image

    return aug


def apply_batch(aug: Augmentation, key, images: jax.Array) -> jax.Array:
    """Apply ``aug`` to every image of ``(N, H, W, C)`` with independent keys (``vmap``)."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(aug)(keys, images)


# ----------------------------------------------------------------------------- geometry


def random_flip_left_right(p: float = 0.5) -> Augmentation:
    """Mirror horizontally with probability ``p``."""
    p = _prob("random_flip_left_right", p)

    def aug(key, image):
        _check_image("random_flip_left_right", image)
        return jnp.where(jax.random.bernoulli(key, p), image[:, ::-1], image)

    return aug


def random_flip_up_down(p: float = 0.5) -> Augmentation:
    """Flip vertically with probability ``p``."""
    p = _prob("random_flip_up_down", p)

    def aug(key, image):
        _check_image("random_flip_up_down", image)
        return jnp.where(jax.random.bernoulli(key, p), image[::-1], image)

    return aug


def random_crop(size, padding: int = 0, fill: float = 0.0) -> Augmentation:
    """Zero-pad by ``padding`` on every side, then crop a random ``size`` window."""
    h, w = _size2("random_crop", size)
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, got {padding}")

    def aug(key, image):
        _check_image("random_crop", image)
        x = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)),
                    constant_values=fill)
        H, W = x.shape[0], x.shape[1]
        if h > H or w > W:
            raise ValueError(f"random_crop: crop {(h, w)} larger than padded image {(H, W)}")
        ky, kx = jax.random.split(key)
        oy = jax.random.randint(ky, (), 0, H - h + 1)
        ox = jax.random.randint(kx, (), 0, W - w + 1)
        return jax.lax.dynamic_slice(x, (oy, ox, 0), (h, w, x.shape[2]))

    return aug


def center_crop(size) -> Augmentation:
    """Crop the central ``size`` window (deterministic; the key is ignored)."""
    h, w = _size2("center_crop", size)

    def aug(key, image):
        _check_image("center_crop", image)
        H, W = image.shape[0], image.shape[1]
        if h > H or w > W:
            raise ValueError(f"center_crop: crop {(h, w)} larger than image {(H, W)}")
        oy, ox = (H - h) // 2, (W - w) // 2
        return image[oy : oy + h, ox : ox + w]

    return aug


def resize(size, method: str = "bilinear") -> Augmentation:
    """Resize to ``size`` with ``jax.image.resize`` (the key is ignored)."""
    h, w = _size2("resize", size)

    def aug(key, image):
        _check_image("resize", image)
        out = jax.image.resize(image, (h, w, image.shape[2]), method=method)
        return out.astype(image.dtype)

    return aug


def random_resized_crop(size, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Augmentation:
    """Crop a random box with area fraction in ``scale`` and aspect ratio (w/h) in ``ratio``
    (log-uniform), resized to ``size`` (bilinear) -- torchvision's ``RandomResizedCrop``. The
    box is clipped to the image, so the output is always a valid crop."""
    h, w = _size2("random_resized_crop", size)
    s0, s1 = float(scale[0]), float(scale[1])
    r0, r1 = float(ratio[0]), float(ratio[1])
    if not 0 < s0 <= s1 <= 1:
        raise ValueError(f"random_resized_crop: scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not 0 < r0 <= r1:
        raise ValueError(f"random_resized_crop: ratio must satisfy 0 < lo <= hi, got {ratio}")

    def aug(key, image):
        _check_image("random_resized_crop", image)
        H, W, C = image.shape
        k1, k2, k3, k4 = jax.random.split(key, 4)
        area = jax.random.uniform(k1, (), minval=s0, maxval=s1) * H * W
        logr = jax.random.uniform(k2, (), minval=jnp.log(r0), maxval=jnp.log(r1))
        r = jnp.exp(logr)
        bw = jnp.clip(jnp.sqrt(area * r), 1.0, W)
        bh = jnp.clip(jnp.sqrt(area / r), 1.0, H)
        y0 = jax.random.uniform(k3, ()) * (H - bh)
        x0 = jax.random.uniform(k4, ()) * (W - bw)
        sy, sx = h / bh, w / bw
        out = jax.image.scale_and_translate(
            image.astype(jnp.float32), (h, w, C), (0, 1),
            jnp.stack([sy, sx]), jnp.stack([-y0 * sy, -x0 * sx]),
            method="linear", antialias=False,
        )
        return out.astype(image.dtype)

    return aug


# ----------------------------------------------------------------------------- colour


def _gray(image):
    if image.shape[-1] == 3:
        w = jnp.asarray([0.299, 0.587, 0.114], image.dtype)
        return jnp.sum(image * w, axis=-1, keepdims=True)
    return jnp.mean(image, axis=-1, keepdims=True)


def _factor(name: str, amount: float) -> float:
    if amount < 0:
        raise ValueError(f"{name}: the jitter amount must be >= 0, got {amount}")
    return float(amount)


def random_brightness(amount: float) -> Augmentation:
    """Multiply by a factor drawn from ``U(1 - amount, 1 + amount)`` (Gluon's brightness)."""
    a = _factor("random_brightness", amount)

    def aug(key, image):
        f = jax.random.uniform(key, (), minval=1 - a, maxval=1 + a)
        return (image * f).astype(image.dtype)

    return aug


def random_contrast(amount: float) -> Augmentation:
    """Blend with the mean grey level: ``mean + f (x - mean)``, ``f ~ U(1 -/+ amount)``."""
    a = _factor("random_contrast", amount)

    def aug(key, image):
        f = jax.random.uniform(key, (), minval=1 - a, maxval=1 + a)
        m = jnp.mean(_gray(image))
        return (m + f * (image - m)).astype(image.dtype)

    return aug


def random_saturation(amount: float) -> Augmentation:
    """Blend with the per-pixel grey image: ``g + f (x - g)``, ``f ~ U(1 -/+ amount)``."""
    a = _factor("random_saturation", amount)

    def aug(key, image):
        f = jax.random.uniform(key, (), minval=1 - a, maxval=1 + a)
        g = _gray(image)
        return (g + f * (image - g)).astype(image.dtype)

    return aug


def random_hue(amount: float) -> Augmentation:
    """Rotate the hue by ``U(-amount, amount)`` of a full turn (``amount`` in ``[0, 0.5]``),
    as a rotation of the chroma plane in YIQ space; needs 3 channels."""
    if not 0 <= amount <= 0.5:
        raise ValueError(f"random_hue: amount must be in [0, 0.5], got {amount}")
    to_yiq = jnp.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                          [0.211, -0.523, 0.312]], jnp.float32)
    from_yiq = jnp.linalg.inv(to_yiq)

    def aug(key, image):
        if image.shape[-1] != 3:
            raise ValueError(f"random_hue: needs an RGB image (H, W, 3), got {image.shape}")
        t = jax.random.uniform(key, (), jnp.float32, minval=-amount, maxval=amount) * 2 * jnp.pi
        c, s = jnp.cos(t), jnp.sin(t)
        one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
        rot = jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([zero, c, -s]),
                         jnp.stack([zero, s, c])])
        m = from_yiq @ rot @ to_yiq
        return (image.astype(jnp.float32) @ m.T).astype(image.dtype)

    return aug


def color_jitter(brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0) -> Augmentation:
    """Brightness, contrast, saturation and hue jitter in that order (zeros are skipped)."""
    augs = []
    if brightness:
        augs.append(random_brightness(brightness))
    if contrast:
        augs.append(random_contrast(contrast))
    if saturation:
        augs.append(random_saturation(saturation))
    if hue:
        augs.append(random_hue(hue))
    return compose(*augs)


def normalize(mean, std) -> Augmentation:
    """``(x - mean) / std`` per channel (the key is ignored)."""
    mean_a = jnp.asarray(mean, jnp.float32)
    std_a = jnp.asarray(std, jnp.float32)
    if jnp.any(std_a <= 0):
        raise ValueError(f"normalize: std must be > 0, got {std}")

    def aug(key, image):
        return ((image - mean_a) / std_a).astype(image.dtype)

    return aug


def cutout(size: int, fill: float = 0.0) -> Augmentation:
    """Set a ``size x size`` square at a random centre to ``fill`` (clipped at the border)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"cutout: size must be an integer >= 1, got {size!r}")

    def aug(key, image):
        _check_image("cutout", image)
        H, W = image.shape[0], image.shape[1]
        ky, kx = jax.random.split(key)
        cy = jax.random.randint(ky, (), 0, H)
        cx = jax.random.randint(kx, (), 0, W)
        ys = jnp.arange(H)[:, None]
        xs = jnp.arange(W)[None, :]
        half = size // 2
        inside = (ys >= cy - half) & (ys < cy - half + size) & (xs >= cx - half) & (
            xs < cx - half + size)
        return jnp.where(inside[..., None], jnp.asarray(fill, image.dtype), image)

    return aug


def mixup(alpha: float = 0.2):
    """Batch-level mixup: ``mixup(alpha)(key, images, targets) -> (images, targets)``.

    ``lam ~ Beta(alpha, alpha)`` and a random permutation ``p``: ``lam x + (1 - lam) x[p]`` and
    the same for ``targets`` (one-hot or soft labels, ``(N, classes)``)."""
    if alpha <= 0:
        raise ValueError(f"mixup: alpha must be > 0, got {alpha}")

    def aug(key, images, targets):
        if images.shape[0] != targets.shape[0]:
            raise ValueError(
                f"mixup: images {images.shape} and targets {targets.shape} disagree on batch"
            )
        kl, kp = jax.random.split(key)
        lam = jax.random.beta(kl, alpha, alpha, dtype=jnp.float32)
        perm = jax.random.permutation(kp, images.shape[0])
        xi = (lam * images + (1 - lam) * images[perm]).astype(images.dtype)
        yi = (lam * targets + (1 - lam) * targets[perm]).astype(targets.dtype)
        return xi, yi

    return aug


# ----------------------------------------------------------------------------- wiring

SPEC_NAMES = ("flip", "vflip", "crop", "cutout", "jitter")


def from_spec(spec: str) -> Augmentation:
    """An augmentation from a comma-separated spec, as the CLI's ``--augment flip,crop``.

    ``flip``: :func:`random_flip_left_right`; ``vflip``: :func:`random_flip_up_down`;
    ``crop``: :func:`random_crop` back to the image's size after zero-padding by an eighth of
    its height (4 pixels for 32x32, the CIFAR recipe; 3 for 28x28); ``cutout``: :func:`cutout`
    of half the image's height; ``jitter``: :func:`color_jitter` (0.2 brightness, contrast
    and saturation; saturation leaves a 1-channel image unchanged). Sizes come from the image,
    so one spec fits any data.
    """
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"augment spec is empty; use a comma-separated list of {SPEC_NAMES}")
    bad = [n for n in names if n not in SPEC_NAMES]
    if bad:
        raise ValueError(f"unknown augmentation(s) {bad} in {spec!r}; choose from {SPEC_NAMES}")

    def one(name: str) -> Augmentation:
        if name == "flip":
            return random_flip_left_right()
        if name == "vflip":
            return random_flip_up_down()
        if name == "jitter":
            return color_jitter(0.2, 0.2, 0.2)

        def sized(key, image):
            _check_image(name, image)
            h, w = image.shape[0], image.shape[1]
            if name == "crop":
                return random_crop((h, w), padding=max(1, round(h / 8)))(key, image)
            return cutout(max(1, h // 2))(key, image)

        return sized

    return compose(*(one(n) for n in names))


def augmented(model, aug: Augmentation):
    """``model`` (an :class:`fdl.nn.Layer`) whose *training* inputs are augmented on the device.

    With ``train=True`` every example of ``x`` (``(N, H, W, C)``) goes through ``aug`` with its
    own key (derived from the step's key by ``fold_in``, so the model's own randomness, e.g.
    dropout, is unchanged), then through ``model``; with ``train=False`` the input is passed
    unchanged. Params, state and paths are ``model``'s, so checkpoints, evaluation and
    prediction are unaffected. ``fdl.train.fit`` trains it as any model (it gives every step a
    key); this is how ``--augment`` is wired into the command line.
    """
    from fdl.nn.core import Layer, require_key

    if not isinstance(model, Layer):
        raise TypeError(f"augmented: expected an fdl.nn.Layer, got {type(model).__name__}")

    def apply(params, state, x, *, key=None, train=False, **kwargs):
        if train:
            require_key("augmented", key)
            x = apply_batch(aug, jax.random.fold_in(key, 0x417567), x)
        return model.apply(params, state, x, key=key, train=train, **kwargs)

    return Layer(model.init, apply, name=model.name, children=model.children,
                 config={**model.config, "augmented": True})
