"""Layers that change *how* another layer runs: ``frozen``, ``remat`` and ``at_paths``.

Each wrapper keeps the wrapped layer's ``init`` (same params, state and paths), so it can be
put around a subtree of a model whose params already exist (loaded or trained):

- :func:`frozen` runs its layer in inference mode whatever ``train`` says (BatchNorm uses and
  keeps its running statistics, dropout is off) and stops the gradient to its params;
- :func:`remat` recomputes its layer's activations in the backward pass instead of storing
  them (``jax.checkpoint``): less memory for more compute;
- :func:`at_paths` applies such wrappers to the children found at given paths of an existing
  model, e.g. ``at_paths(resnet, {"features": frozen})`` for fine-tuning a zoo model's head.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping

import jax

from fdl.nn import core
from fdl.nn.core import Layer

__all__ = ["frozen", "remat", "at_paths", "REMAT_POLICIES"]

REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)


def frozen(layer: Layer, *, stop_gradient: bool = True) -> Layer:
    """``layer`` always applied with ``train=False``, its params cut from the gradient.

    In a training step the frozen layer behaves as at evaluation: BatchNorm normalises with
    its running statistics and returns them unchanged (PyTorch's ``module.eval()`` on a
    backbone, Keras' ``trainable=False``), dropout is the identity, and (with
    ``stop_gradient``) the params get a zero gradient while the gradient still flows to the
    layer's *input*. State that evolves in inference too (a recurrent carry) is still returned.
    Zero gradients leave params unchanged under SGD/Adam, but coupled weight decay or momentum
    built up earlier would still move them: combine with ``fdl.optim.freeze(path)`` (or
    ``masked``) to keep the optimizer off them.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"frozen: expected a Layer, got {type(layer).__name__}")

    def apply(params, state, x, *, key=None, train=False, **kwargs):
        if stop_gradient:
            params = jax.lax.stop_gradient(params)
        return layer.apply(params, state, x, key=key, train=False, **kwargs)

    return Layer(layer.init, apply, name=f"frozen[{layer.name}]", children=layer.children,
                 config={**layer.config, "frozen": True, "stop_gradient": stop_gradient})


def _remat_policy(policy):
    if policy is None or callable(policy):
        return policy
    if isinstance(policy, str) and policy in REMAT_POLICIES:
        return getattr(jax.checkpoint_policies, policy)
    raise ValueError(f"remat: policy must be None, a jax.checkpoint_policies function or one of "
                     f"{REMAT_POLICIES}, got {policy!r}")


def remat(layer: Layer, *, policy: str | Callable | None = None, prevent_cse: bool = True
          ) -> Layer:
    """``layer`` under ``jax.checkpoint``: its intermediate activations are recomputed in the
    backward pass instead of kept from the forward pass.

    Same params, state, outputs and gradients as ``layer`` (up to float reassociation); peak
    memory of a training step drops by the activations inside ``layer``, at the cost of a
    second forward pass through it. ``policy`` chooses what may still be saved: None (save
    nothing but the inputs), ``"dots_saveable"`` (keep matmul/conv outputs, recompute the
    elementwise work), ``"dots_with_no_batch_dims_saveable"``, ``"everything_saveable"``, or
    any ``jax.checkpoint_policies`` function. ``prevent_cse`` as ``jax.checkpoint`` (leave
    True unless the remat sits inside a ``scan``).
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"remat: expected a Layer, got {type(layer).__name__}")
    pol = _remat_policy(policy)

    def apply(params, state, x, *, key=None, train=False, **kwargs):
        def run(p, s, inp, k):  # keyword inputs (masks) are closed over, static ones stay so
            return layer.apply(p, s, inp, key=k, train=train, **kwargs)

        return jax.checkpoint(run, policy=pol, prevent_cse=prevent_cse)(params, state, x, key)

    return Layer(layer.init, apply, name=f"remat[{layer.name}]", children=layer.children,
                 config={**layer.config, "remat_policy": policy})


def _segments_match(path: list[str], pattern: list[str]) -> bool:
    return len(path) == len(pattern) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(path, pattern, strict=True))


def at_paths(model: Layer, wrappers: Mapping[str, Callable[[Layer], Layer]]) -> Layer:
    """``model`` with the children at the given paths wrapped when applied.

    ``wrappers`` maps a path pattern to a function ``Layer -> Layer`` (:func:`frozen`,
    :func:`remat`, ``functools.partial(remat, policy="dots_saveable")``, ...). A pattern is a
    ``/``-joined path of child names, relative to ``model`` (the paths of ``params``:
    ``"features"``, ``"features/layer1/0"``), whose segments may use glob wildcards
    (``"features/layer*"`` matches ``features/layer1`` ... ``features/layer4`` but nothing
    below them). Where several patterns match one child, the wrappers nest in the given order.

    Params, state and ``init`` are ``model``'s. A pattern that matches no child when the model
    is applied raises ``ValueError`` (a misspelt path would otherwise silently freeze
    nothing). Children are found through :func:`fdl.nn.core.apply_child`, which every
    combinator and zoo model uses.
    """
    if not isinstance(model, Layer):
        raise TypeError(f"at_paths: expected a Layer, got {type(model).__name__}")
    items = []
    for pattern, fn in dict(wrappers).items():
        if not isinstance(pattern, str) or not pattern.strip("/"):
            raise ValueError(f"at_paths: a path pattern must be a non-empty string, got "
                             f"{pattern!r}")
        if not callable(fn):
            raise TypeError(f"at_paths: the wrapper for {pattern!r} must be callable "
                            f"(Layer -> Layer), got {fn!r}")
        items.append((pattern, pattern.strip("/").split("/"), fn))

    def apply(params, state, x, *, key=None, train=False, **kwargs):
        base = len(core._apply_path)
        hits = dict.fromkeys((p for p, _, _ in items), 0)

        def hook(path: list[str], layer: Layer) -> Layer:
            rel = path[base:]
            for pattern, segments, fn in items:
                if _segments_match(rel, segments):
                    hits[pattern] += 1
                    layer = fn(layer)
                    if not isinstance(layer, Layer):
                        raise TypeError(f"at_paths: the wrapper for {pattern!r} returned "
                                        f"{type(layer).__name__}, expected a Layer")
            return layer

        core._apply_hooks.append(hook)
        try:
            out = model.apply(params, state, x, key=key, train=train, **kwargs)
        finally:
            core._apply_hooks.remove(hook)
        missing = [p for p, n in hits.items() if n == 0]
        if missing:
            raise ValueError(
                f"at_paths: no child of {model.name!r} at {missing}; child paths are the "
                f"param/state paths without the leaf name, e.g. "
                f"{sorted(params)[:6] if isinstance(params, dict) else '...'}")
        return out

    return Layer(model.init, apply, name=model.name, children=model.children,
                 config={**model.config, "at_paths": tuple(p for p, _, _ in items)})
