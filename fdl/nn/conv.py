"""Convolutions: ``conv1d``, ``conv2d``, ``conv3d`` and ``conv_transpose2d`` (channels-last).

Layouts (DESIGN.md): inputs ``(N, L, C)`` / NHWC, kernels ``(k, in/groups, out)`` (conv1d) and
HWIO ``(kh, kw, in/groups, out)`` (conv2d). From PyTorch: ``w = torch_w.permute(2, 3, 1, 0)``
(OIHW -> HWIO) for ``Conv2d`` and ``torch_w.permute(2, 1, 0)`` for ``Conv1d``.

Output size (per spatial axis): ``floor((size + pad_lo + pad_hi - dilation*(k-1) - 1) / stride)
+ 1``, as in PyTorch. A configuration whose output would be empty is refused at ``init``.

Padding forms:
- ``int`` ``p``: ``p`` on every side; ``(ph, pw)``: ``ph`` top and bottom, ``pw`` left and right;
  ``((top, bottom), (left, right))``: explicit (conv1d: ``int`` or ``(left, right)``).
- ``"valid"``: no padding.
- ``"same"``: with stride 1 the output has the input's size (PyTorch's ``padding="same"``: total
  padding ``dilation*(k-1)``, the odd unit on the bottom/right). With stride > 1 it is
  TensorFlow's ``SAME``: output ``ceil(size / stride)``, total padding
  ``max((out-1)*stride + dilation*(k-1) + 1 - size, 0)``, the odd unit on the bottom/right.
  PyTorch refuses ``"same"`` with stride > 1.

Default ``w_init`` is PyTorch's default (``kaiming_uniform`` with ``a=sqrt(5)``), i.e.
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = (in/groups) * kh * kw``; the bias
defaults to zeros (PyTorch draws it from the same uniform; pass ``b_init`` to match).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fdl.nn import initializers as inits
from fdl.nn.conv_lowering import conv2d_nhwc
from fdl.nn.conv_xla import conv_general
from fdl.nn.core import Layer, ShapeError, check_positive_int

__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose2d", "conv_output_size",
           "resolve_padding"]

Padding = int | str | Sequence[Any]


def _default_w_init() -> inits.Initializer:
    # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return inits.kaiming_uniform("fan_in", gain=1.0 / math.sqrt(3.0))


def _tuple(layer: str, name: str, value: Any, n: int, allow_zero: bool = False) -> tuple[int, ...]:
    """An int or a length-``n`` sequence of ints, each validated."""
    if isinstance(value, int) and not isinstance(value, bool):
        vals = (value,) * n
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == n:
        vals = tuple(value)
    else:
        raise ValueError(f"{layer}: {name} must be an int or a sequence of {n} ints, got {value!r}")
    for v in vals:
        check_positive_int(layer, name, v, allow_zero=allow_zero)
    return tuple(vals)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _explicit_padding(layer: str, padding: Padding, n: int) -> tuple[tuple[int, int], ...] | str:
    """Normalise a padding spec to ``n`` ``(lo, hi)`` pairs, or ``"same"``."""
    if isinstance(padding, str):
        p = padding.lower()
        if p == "valid":
            return ((0, 0),) * n
        if p == "same":
            return "same"
        raise ValueError(f"{layer}: padding string must be 'same' or 'valid', got {padding!r}")
    bad = ValueError(
        f"{layer}: padding must be an int >= 0, "
        + {1: "(left, right)", 2: "(ph, pw), ((top, bottom), (left, right))",
           3: "(pd, ph, pw), ((front, back), (top, bottom), (left, right))"}.get(n, f"{n} ints")
        + f", 'same' or 'valid'; got {padding!r}"
    )
    if _is_int(padding):
        pairs = ((padding, padding),) * n
    elif isinstance(padding, Sequence):
        items = tuple(padding)
        if n == 1 and len(items) == 2 and all(_is_int(v) for v in items):
            pairs = (items,)
        elif n == 1 and len(items) == 1 and _is_int(items[0]):
            pairs = ((items[0], items[0]),)
        elif len(items) == n and all(_is_int(v) for v in items):
            pairs = tuple((v, v) for v in items)
        elif len(items) == n and all(
            isinstance(v, Sequence) and len(v) == 2 and all(_is_int(u) for u in v) for v in items
        ):
            pairs = tuple((int(v[0]), int(v[1])) for v in items)
        else:
            raise bad
    else:
        raise bad
    for lo, hi in pairs:
        if lo < 0 or hi < 0:
            raise ValueError(f"{layer}: padding must be >= 0, got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def conv_output_size(size: int, k: int, stride: int, pad: tuple[int, int], dilation: int) -> int:
    """PyTorch's output length: ``floor((size + lo + hi - dilation*(k-1) - 1)/stride) + 1``
    (``<= 0`` when the dilated kernel does not fit in the padded input)."""
    span = size + pad[0] + pad[1] - dilation * (k - 1) - 1
    if span < 0:
        return 0
    return span // stride + 1


def resolve_padding(
    padding: tuple[tuple[int, int], ...] | str,
    spatial: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """Explicit ``(lo, hi)`` pairs; ``"same"`` is resolved TF-style for the given sizes."""
    if padding != "same":
        return tuple(padding)
    out = []
    for size, k, s, d in zip(spatial, kernel, stride, dilation, strict=True):
        n_out = -(-size // s)
        total = max((n_out - 1) * s + d * (k - 1) + 1 - size, 0)
        out.append((total // 2, total - total // 2))
    return tuple(out)


def _spatial_out(layer, spatial, kernel, stride, pads, dilation, axes_names):
    outs = []
    items = zip(spatial, kernel, stride, pads, dilation, axes_names, strict=True)
    for size, k, s, p, d, nm in items:
        o = conv_output_size(size, k, s, p, d)
        if o <= 0:
            raise ShapeError(
                layer,
                f"output {nm} size would be <= 0: input {nm} {size} with padding {p} is smaller "
                f"than the dilated kernel {d * (k - 1) + 1} (kernel {k}, dilation {d}); "
                "the input is too small for this layer",
            )
        outs.append(o)
    return tuple(outs)


def _conv_nd(
    layer: str,
    nsp: int,
    out_channels: int,
    kernel_size,
    stride,
    padding,
    dilation,
    groups: int,
    use_bias: bool,
    w_init,
    b_init,
    dtype,
) -> Layer:
    """Shared body of conv1d (``nsp == 1``, computed as a 2-D conv with H=1), conv2d (both
    through :func:`conv2d_nhwc`) and conv3d (XLA's ``conv_general_dilated``, NDHWC/DHWIO)."""
    check_positive_int(layer, "out_channels", out_channels)
    check_positive_int(layer, "groups", groups)
    ks = _tuple(layer, "kernel_size", kernel_size, nsp)
    st = _tuple(layer, "stride", stride, nsp)
    dl = _tuple(layer, "dilation", dilation, nsp)
    pad = _explicit_padding(layer, padding, nsp)
    if out_channels % groups:
        raise ValueError(
            f"{layer}: groups={groups} must divide out_channels={out_channels}"
        )
    w_init = w_init or _default_w_init()
    rank = nsp + 2
    layout = {1: "(N, L, C)", 2: "(N, H, W, C) (NHWC)", 3: "(N, D, H, W, C) (NDHWC)"}[nsp]
    axes_names = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}[nsp]

    def check_input(shape, in_ch=None):
        shape = tuple(shape)
        if len(shape) != rank:
            raise ShapeError(layer, f"expected input of rank {rank} {layout}, got shape {shape}")
        c = shape[-1]
        if in_ch is not None and c != in_ch:
            raise ShapeError(
                layer, f"expected {in_ch} input channels (last axis), got shape {shape}"
            )
        if c % groups:
            raise ShapeError(
                layer, f"groups={groups} must divide in_channels={c} (input shape {shape})"
            )
        pads = resolve_padding(pad, shape[1:-1], ks, st, dl)
        return pads, _spatial_out(layer, shape[1:-1], ks, st, pads, dl, axes_names)

    def init(key, in_shape):
        pads, out_sp = check_input(in_shape)
        c = in_shape[-1]
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, (*ks, c // groups, out_channels), dtype)}
        if use_bias:
            params["b"] = b_init(kb, (out_channels,), dtype)
        return (in_shape[0], *out_sp, out_channels), params, {}

    def apply(params, state, x, *, key=None, train=False):
        w = params["w"]
        pads, _ = check_input(jnp.shape(x), w.shape[-2] * groups)
        dt = jnp.result_type(x, w)
        x = x.astype(dt)
        w = w.astype(dt)
        if nsp == 1:
            y = conv2d_nhwc(
                x[:, None], w[None], (1, st[0]), ((0, 0), pads[0]), (1, dl[0]), groups
            )[:, 0]
        elif nsp == 2:
            y = conv2d_nhwc(x, w, st, pads, dl, groups)
        else:
            y = lax.conv_general_dilated(
                x, w, window_strides=st, padding=pads, rhs_dilation=dl,
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=groups)
        if use_bias:
            y = y + params["b"].astype(dt)
        return y, state

    config = {
        "out_channels": out_channels,
        "kernel_size": ks,
        "stride": st,
        "padding": padding,
        "dilation": dl,
        "groups": groups,
        "use_bias": use_bias,
    }
    return Layer(init, apply, name=layer, config=config)


def conv2d(
    out_channels: int,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: Padding = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    use_bias: bool = True,
    w_init: inits.Initializer | None = None,
    b_init: inits.Initializer = inits.zeros,
    dtype=jnp.float32,
) -> Layer:
    """2-D convolution over NHWC input ``(N, H, W, C_in)`` -> ``(N, H_out, W_out, out)``.

    Params: ``{"w": (kh, kw, C_in/groups, out), "b": (out,)}``. ``groups`` must divide both
    channel counts (``groups == C_in`` is a depthwise convolution). Padding forms, output size
    and the default initializer (PyTorch's) are described in the module docstring. Computed by
    :func:`fdl.nn.conv_lowering.conv2d_nhwc`.
    """
    return _conv_nd("conv2d", 2, out_channels, kernel_size, stride, padding, dilation, groups,
                    use_bias, w_init, b_init, dtype)


def conv1d(
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: Padding = 0,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = True,
    w_init: inits.Initializer | None = None,
    b_init: inits.Initializer = inits.zeros,
    dtype=jnp.float32,
) -> Layer:
    """1-D convolution over ``(N, L, C_in)`` -> ``(N, L_out, out)``.

    Params: ``{"w": (k, C_in/groups, out), "b": (out,)}``; padding ``int``, ``(left, right)``,
    ``"same"`` or ``"valid"``. Computed as a 2-D convolution with height 1.
    """
    return _conv_nd("conv1d", 1, out_channels, kernel_size, stride, padding, dilation, groups,
                    use_bias, w_init, b_init, dtype)


def conv3d(
    out_channels: int,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: Padding = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    use_bias: bool = True,
    w_init: inits.Initializer | None = None,
    b_init: inits.Initializer = inits.zeros,
    dtype=jnp.float32,
) -> Layer:
    """3-D convolution over NDHWC input ``(N, D, H, W, C_in)`` -> ``(N, D', H', W', out)``
    (video, volumes).

    Params: ``{"w": (kd, kh, kw, C_in/groups, out), "b": (out,)}``; from PyTorch's ``Conv3d``
    ``w = torch_w.permute(2, 3, 4, 1, 0)``. Padding ``int``, ``(pd, ph, pw)``, three
    ``(lo, hi)`` pairs, ``"same"`` or ``"valid"``; output sizes and the default initializer as
    :func:`conv2d`. Computed by XLA's convolution (``lax.conv_general_dilated``).
    """
    return _conv_nd("conv3d", 3, out_channels, kernel_size, stride, padding, dilation, groups,
                    use_bias, w_init, b_init, dtype)


def _transpose_default_init(groups: int) -> inits.Initializer:
    """PyTorch's ConvTranspose2d default: U(-b, b), b = 1/sqrt((out/groups) * kh * kw) (PyTorch
    computes fan_in from dim 1 of its ``(in, out/groups, kh, kw)`` weight)."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out_g = shape
        b = 1.0 / math.sqrt(out_g * kh * kw)
        return jax.random.uniform(key, shape, dtype, -b, b)

    return init


def conv_transpose2d(
    out_channels: int,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    use_bias: bool = True,
    w_init: inits.Initializer | None = None,
    b_init: inits.Initializer = inits.zeros,
    dtype=jnp.float32,
) -> Layer:
    """Transposed 2-D convolution with PyTorch's ``ConvTranspose2d`` semantics, NHWC.

    Input ``(N, H, W, C_in)``, output ``(N, H_out, W_out, out)`` with
    ``H_out = (H-1)*stride - 2*padding + dilation*(kh-1) + output_padding + 1`` (likewise W).
    ``padding`` is ``int`` or ``(ph, pw)`` (removed from both sides of the full output);
    ``output_padding`` (added at the bottom/right) must be smaller than ``stride`` or
    ``dilation``, as in PyTorch.

    Params: ``{"w": (kh, kw, C_in, out/groups), "b": (out,)}`` -- the kernel in PyTorch's
    orientation (not flipped), so a PyTorch weight ``(in, out/groups, kh, kw)`` maps as
    ``w = torch_w.permute(2, 3, 0, 1)``. Default ``w_init`` is PyTorch's:
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with PyTorch's ``fan_in = (out/groups) * kh * kw``.
    """
    layer = "conv_transpose2d"
    check_positive_int(layer, "out_channels", out_channels)
    check_positive_int(layer, "groups", groups)
    ks = _tuple(layer, "kernel_size", kernel_size, 2)
    st = _tuple(layer, "stride", stride, 2)
    dl = _tuple(layer, "dilation", dilation, 2)
    pd = _tuple(layer, "padding", padding, 2, allow_zero=True)
    op = _tuple(layer, "output_padding", output_padding, 2, allow_zero=True)
    for o, s, d in zip(op, st, dl, strict=True):
        if o >= s and o >= d:
            raise ValueError(
                f"{layer}: output_padding must be smaller than stride or dilation, got "
                f"output_padding={op}, stride={st}, dilation={dl}"
            )
    if out_channels % groups:
        raise ValueError(f"{layer}: groups={groups} must divide out_channels={out_channels}")
    w_init = w_init or _transpose_default_init(groups)

    def out_size(shape):
        outs = []
        items = zip(shape[1:3], ks, st, pd, op, dl, ("height", "width"), strict=True)
        for size, k, s, p, o, d, nm in items:
            n = (size - 1) * s - 2 * p + d * (k - 1) + o + 1
            if n <= 0:
                raise ShapeError(
                    layer,
                    f"output {nm} size would be <= 0 ({n}): input {nm} {size}, kernel {k}, "
                    f"stride {s}, padding {p}, output_padding {o}, dilation {d}",
                )
            outs.append(n)
        return tuple(outs)

    def check_input(shape, in_ch=None):
        shape = tuple(shape)
        if len(shape) != 4:
            raise ShapeError(layer, f"expected input of rank 4 (N, H, W, C) (NHWC), got {shape}")
        c = shape[-1]
        if in_ch is not None and c != in_ch:
            raise ShapeError(layer, f"expected {in_ch} input channels (last axis), got {shape}")
        if c % groups:
            raise ShapeError(layer, f"groups={groups} must divide in_channels={c} (shape {shape})")
        return out_size(shape)

    def init(key, in_shape):
        out_sp = check_input(in_shape)
        c = in_shape[-1]
        kw, kb = jax.random.split(key)
        params = {"w": w_init(kw, (*ks, c, out_channels // groups), dtype)}
        if use_bias:
            params["b"] = b_init(kb, (out_channels,), dtype)
        return (in_shape[0], *out_sp, out_channels), params, {}

    def apply(params, state, x, *, key=None, train=False):
        w = params["w"]
        check_input(jnp.shape(x), w.shape[2])
        dt = jnp.result_type(x, w)
        x = x.astype(dt)
        w = w.astype(dt)
        kh, kw, cin, og = w.shape
        # direct-conv kernel: spatially flipped, regrouped to (kh, kw, C_in/groups, out)
        wd = jnp.flip(w, (0, 1))
        wd = wd.reshape(kh, kw, groups, cin // groups, og).transpose(0, 1, 3, 2, 4)
        wd = wd.reshape(kh, kw, cin // groups, groups * og)
        pads = [
            (d * (k - 1) - p, d * (k - 1) - p + o)
            for k, p, o, d in zip(ks, pd, op, dl, strict=True)
        ]
        # canonical gradients inside loop bodies (fit's device loop): see fdl.nn.conv_xla
        y = conv_general(x, wd, (1, 1), pads, lhs_dilation=st, rhs_dilation=dl, groups=groups)
        if use_bias:
            y = y + params["b"].astype(dt)
        return y, state

    config = {
        "out_channels": out_channels,
        "kernel_size": ks,
        "stride": st,
        "padding": pd,
        "output_padding": op,
        "dilation": dl,
        "groups": groups,
        "use_bias": use_bias,
    }
    return Layer(init, apply, name=layer, config=config)
