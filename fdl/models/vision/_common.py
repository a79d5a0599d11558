"""Shared pieces of the vision models: the ``features`` / ``head`` classifier wrapper,
head replacement, conv + BatchNorm helpers and a parameter-flat block builder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from fdl import nn
from fdl.nn.core import Layer, ShapeError, apply_child, child_key, init_child

__all__ = [
    "classifier",
    "replace_head",
    "conv_bn_act",
    "relu6",
    "scaled",
    "flat_block",
]


def relu6() -> Layer:
    """``min(max(x, 0), 6)`` (MobileNet's activation)."""
    return nn.relu6()


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1 (width multipliers)."""
    return max(1, int(round(channels * width)))


def classifier(
    name: str,
    features: Layer,
    head: Layer,
    *,
    in_channels: int | None,
    input_size: tuple[int, int] | None,
    **config: Any,
) -> Layer:
    """``serial(("features", features), ("head", head))`` with a model name and config.

    ``init`` additionally checks that the input is NHWC with ``in_channels`` channels (when
    given). ``config`` records ``input_size`` (the documented ``(H, W)``), ``in_channels`` and the
    constructor's hyperparameters; ``replace_head`` keeps them.
    """
    body = nn.serial(("features", features), ("head", head))

    def init(key, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 4:
            raise ShapeError(name, f"expected NHWC input (N, H, W, C), got shape {in_shape}")
        if in_channels is not None and in_shape[-1] != in_channels:
            raise ShapeError(
                name,
                f"expected {in_channels} input channels (NHWC, last axis), got shape {in_shape}; "
                f"build the model with in_channels={in_shape[-1]}",
            )
        return body.init(key, in_shape)

    cfg = {"in_channels": in_channels, "input_size": input_size, **config}
    return Layer(init, body.apply, name=name, children=body.children, config=cfg)


def replace_head(model: Layer, new_head: Layer) -> Layer:
    """The same model with its ``head`` child replaced (fine-tuning: a new classifier).

    The backbone's params keep their paths (``features/...``), so params loaded for the old
    model can be reused: ``new_params = {**fresh, "features": old_params["features"]}``.
    """
    wrapped = [k for k in ("at_paths", "frozen", "remat_policy", "compute_dtype", "augmented")
               if k in model.config]
    if wrapped:
        raise ValueError(
            f"replace_head: model {model.name!r} is wrapped ({', '.join(wrapped)}); the wrapper "
            "would be lost: replace the head first, then wrap the new model")
    children = dict(model.children)
    if "features" not in children or "head" not in children:
        raise ValueError(
            f"replace_head: model {model.name!r} has no features/head split "
            f"(children {list(children)})"
        )
    cfg = dict(model.config)
    cfg["head_replaced"] = True
    return classifier(
        model.name,
        children["features"],
        new_head,
        in_channels=cfg.pop("in_channels", None),
        input_size=cfg.pop("input_size", None),
        **cfg,
    )


def conv_bn_act(
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: Any = 0,
    groups: int = 1,
    act: Layer | None = None,
    names: Sequence[str] = ("conv", "bn", "act"),
    w_init=None,
) -> Layer:
    """``conv2d`` (no bias) -> ``batch_norm`` -> activation (omitted when ``act`` is None)."""
    layers = [
        (names[0], nn.conv2d(out_channels, kernel_size, stride=stride, padding=padding,
                             groups=groups, use_bias=False, w_init=w_init)),
        (names[1], nn.batch_norm()),
    ]
    if act is not None:
        layers.append((names[2], act))
    return nn.serial(*layers)


def flat_block(
    name: str,
    body: Layer,
    extra: Sequence[tuple[str, Layer]],
    combine,
) -> Layer:
    """A block whose params are ``body``'s params (no extra nesting level) plus those of the
    named ``extra`` children (e.g. ``downsample``).

    ``combine(x, body_out, extra_outs) -> y`` merges the results; ``extra`` children see the
    block's input ``x``. The output shape is found with ``combine`` on abstract values at init.
    Used for residual blocks with torchvision-like names
    (``layer1/0/conv1``, ``layer1/0/downsample/conv``).
    """
    import jax

    extra = tuple(extra)

    def init(key, in_shape):
        out, params, state = body.init(child_key(key, 0), in_shape)
        params, state = dict(params), dict(state)
        shapes = []
        for i, (nm, layer) in enumerate(extra):
            o, p, s = init_child(nm, layer, child_key(key, i + 1), in_shape)
            shapes.append(o)
            if p:
                params[nm] = p
            if s:
                state[nm] = s
        try:
            res = jax.eval_shape(
                lambda x, b, es: combine(x, b, es),
                jax.ShapeDtypeStruct(tuple(in_shape), jnp.float32),
                jax.ShapeDtypeStruct(tuple(out), jnp.float32),
                [jax.ShapeDtypeStruct(tuple(s), jnp.float32) for s in shapes],
            )
        except (TypeError, ValueError) as e:
            raise ShapeError(
                name,
                f"cannot merge body output {tuple(out)} with input {tuple(in_shape)} / "
                f"{[tuple(s) for s in shapes]}: {e}",
            ) from None
        return tuple(res.shape), params, state

    def apply(params, state, x, *, key=None, train=False):
        y, new_state = body.apply(params, state, x, key=child_key(key, 0), train=train)
        new_state = dict(new_state)
        outs = []
        for i, (nm, layer) in enumerate(extra):
            o, s = apply_child(nm, layer, params.get(nm, {}), state.get(nm, {}), x,
                               key=child_key(key, i + 1), train=train)
            outs.append(o)
            if s:
                new_state[nm] = s
        return combine(x, y, outs), new_state

    children = (*body.children, *extra)
    return Layer(init, apply, name=name, children=children)
