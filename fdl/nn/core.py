"""The layer protocol: a layer is an immutable pair of pure functions.

``init(key, in_shape) -> (out_shape, params, state)``
    Shape inference without data. ``in_shape`` is the full input shape, batch first
    (``(batch, ...)``); ``out_shape`` likewise. ``params`` and ``state`` are nested
    ``dict[str, ...]`` of arrays (empty dicts for a layer without any).

``apply(params, state, x, *, key=None, train=False) -> (y, new_state)``
    The same signature for every layer. ``train`` is a keyword-only Python bool (static
    under ``jit``); ``key`` is a typed PRNG key, needed only by layers that are random in
    training (dropout). A stateless layer returns its (empty) state unchanged.

Composite layers call their children through :func:`init_child` and :func:`apply_child`, which
derive child keys deterministically (``fold_in`` by child index), prefix errors with the
child's path, and feed :func:`summary`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Shape = tuple[int, ...]
Params = dict[str, Any]
State = dict[str, Any]
InitFn = Callable[..., tuple[Any, Params, State]]
ApplyFn = Callable[..., tuple[Any, State]]

__all__ = [
    "Layer",
    "ShapeError",
    "Shape",
    "init_child",
    "apply_child",
    "child_key",
    "serial",
    "parallel",
    "residual",
    "shared",
    "lambda_layer",
    "identity",
    "summary",
    "check_rank",
    "check_positive_int",
    "require_key",
]


class ShapeError(ValueError):
    """A shape mismatch found at ``init`` or ``apply``; names the layer path.

    ``str(err)`` reads ``layer 'features/conv1' (conv2d): expected ..., got ...``.
    """

    def __init__(self, layer: str, detail: str, path: Sequence[str] = ()):
        self.layer = layer
        self.detail = detail
        self.path = list(path)
        super().__init__(self._message())

    def _message(self) -> str:
        where = "/".join(self.path) if self.path else "<root>"
        return f"layer '{where}' ({self.layer}): {self.detail}"

    def with_prefix(self, name: str) -> ShapeError:
        return ShapeError(self.layer, self.detail, [name, *self.path])


@dataclasses.dataclass(frozen=True)
class Layer:
    """An immutable layer: ``init`` and ``apply`` pure functions plus a type name.

    ``children`` lists ``(name, layer)`` pairs for composite layers (used by ``summary``
    and for introspection); ``config`` records the constructor's hyperparameters.
    """

    init: InitFn
    apply: ApplyFn
    name: str = "layer"
    children: tuple[tuple[str, Layer], ...] = ()
    config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        # A composite (a layer with declared children) opens a scope for its children's
        # ``shared(...)`` ties: see :func:`shared`.
        if self.children and not getattr(self.init, "_fdl_scoped", False):
            object.__setattr__(self, "init", _scoped_init(self.init, self.children))
            object.__setattr__(self, "apply", _scoped_apply(self.apply, self.children))

    def __call__(self, params: Params, state: State, x: Any, *, key=None, train: bool = False,
                 **kwargs):
        return self.apply(params, state, x, key=key, train=train, **kwargs)

    def init_params(self, key, in_shape: Shape) -> tuple[Params, State]:
        """Convenience: ``init`` without the output shape."""
        _, params, state = self.init(key, tuple(in_shape))
        return params, state

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{self.name}({cfg})"


# ----------------------------------------------------------------------------- helpers

_summary_stack: list[list[tuple[str, str, Any, int]]] = []
_path_stack: list[str] = []
# the names of the children being applied (outermost first), and the hooks that may replace the
# child at the current path (``fdl.nn.at_paths``); both only change while a layer is traced
_apply_path: list[str] = []
_apply_hooks: list[Callable[[list[str], Layer], Layer]] = []


def child_key(key, index: int):
    """Deterministic child key: ``fold_in(key, index)``; ``None`` stays ``None``."""
    if key is None:
        return None
    return jax.random.fold_in(key, index)


def _num_params(tree) -> int:
    return sum(int(math.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(tree))


def init_child(name: str, layer: Layer, key, in_shape: Shape):
    """Initialise a child layer, prefixing any :class:`ShapeError` with ``name``."""
    row = None
    if _summary_stack:
        row = len(_summary_stack[-1])
        _summary_stack[-1].append(("/".join([*_path_stack, name]), layer.name, None, 0))
    _path_stack.append(name)
    try:
        out_shape, params, state = layer.init(key, tuple(in_shape))
    except ShapeError as e:
        if name:
            raise e.with_prefix(name) from None
        raise
    finally:
        _path_stack.pop()
    _record_init(name, layer, params, state)
    if row is not None:
        path, lname, _, _ = _summary_stack[-1][row]
        _summary_stack[-1][row] = (path, lname, out_shape, _num_params(params))
    return out_shape, params, state


def apply_child(name: str, layer: Layer, params, state, x, *, key=None, train=False, **kwargs):
    """Apply a child layer, prefixing any :class:`ShapeError` with ``name``. Extra keyword
    arguments (e.g. attention masks) are passed to the child's ``apply``.

    Keeps the path of the child being applied (``features/layer1/0``), so that
    :func:`fdl.nn.at_paths` can wrap the child found at a path (trace-time Python only).
    """
    _checking.depth = getattr(_checking, "depth", 0) + 1  # see _checked: nested applies
    _apply_path.append(name)
    try:
        for hook in _apply_hooks:
            layer = hook(_apply_path, layer)
        return layer.apply(params, state, x, key=key, train=train, **kwargs)
    except ShapeError as e:
        raise e.with_prefix(name) from None
    finally:
        _checking.depth -= 1
        _apply_path.pop()


def check_rank(layer: str, x_shape: Sequence[int], rank: int, layout: str) -> None:
    """Raise :class:`ShapeError` unless ``len(x_shape) == rank``."""
    if len(x_shape) != rank:
        raise ShapeError(
            layer, f"expected input of rank {rank} {layout}, got shape {tuple(x_shape)}"
        )


def check_positive_int(layer: str, name: str, value: Any, allow_zero: bool = False) -> int:
    """Validate a size hyperparameter; raise ``ValueError`` naming the valid range."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    lo = 0 if allow_zero else 1
    if not ok or value < lo:
        raise ValueError(f"{layer}: {name} must be an integer >= {lo}, got {value!r}")
    return value


def require_key(layer: str, key) -> None:
    """Raise ``ValueError`` if a layer that is random in training got no key."""
    if key is None:
        raise ValueError(
            f"{layer}: train=True needs a PRNG key; call apply(..., key=jax.random.key(seed), "
            "train=True) or use train=False for evaluation"
        )


def _normalise_children(layers: Sequence[Any]) -> tuple[tuple[str, Layer], ...]:
    out: list[tuple[str, Layer]] = []
    for i, item in enumerate(layers):
        if isinstance(item, Layer):
            out.append((str(i), item))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], Layer)
        ):
            out.append(item)
        else:
            raise TypeError(
                f"expected a Layer or a (name, Layer) pair at position {i}, got {item!r}"
            )
    names = [n for n, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate child names {sorted(dup)}; names must be unique")
    for n in names:
        if "/" in n or not n:
            raise ValueError(f"child name {n!r} must be non-empty and contain no '/'")
    return tuple(out)


# ----------------------------------------------------------------------------- sharing


@dataclasses.dataclass(frozen=True)
class _SharedRef:
    target: str
    via: Layer | None = None


@dataclasses.dataclass
class _Scope:
    """The children of a composite and their params/state while it runs ``init``/``apply``."""

    children: dict[str, Layer]
    params: dict
    state: dict
    done: set[str]  # children initialised so far (init) / all of them (apply)


_scope_stack: list[_Scope] = []


def _scoped_init(init: InitFn, children) -> InitFn:
    kids = dict(children)

    def scoped(key, in_shape):
        _scope_stack.append(_Scope(kids, {}, {}, set()))
        try:
            return init(key, in_shape)
        finally:
            _scope_stack.pop()

    scoped._fdl_scoped = True  # type: ignore[attr-defined]
    return scoped


def _scoped_apply(apply: ApplyFn, children) -> ApplyFn:
    kids = dict(children)

    def scoped(params, state, x, **kwargs):
        _scope_stack.append(_Scope(kids, params or {}, state or {}, set(kids)))
        try:
            return apply(params, state, x, **kwargs)
        finally:
            _scope_stack.pop()

    scoped._fdl_scoped = True  # type: ignore[attr-defined]
    return scoped


def _record_init(name: str, layer: Layer, params, state) -> None:
    """Make a just-initialised child visible to later ``shared`` siblings (and their children)."""
    if _scope_stack:
        scope = _scope_stack[-1]
        if scope.children.get(name) is layer:
            scope.done.add(name)
            if params:
                scope.params[name] = params
            if state:
                scope.state[name] = state


def _resolve_shared(target: str) -> tuple[Layer, Any, Any]:
    """The layer at ``target`` (``"a"`` or ``"a/b/c"``) and its params and state, looked up in
    the innermost enclosing composite that has a child named ``a``."""
    first, *rest = target.split("/")
    for scope in reversed(_scope_stack):
        layer = scope.children.get(first)
        if layer is None or _shared_target(layer) is not None:
            continue
        if first not in scope.done:
            raise ValueError(f"shared({target!r}): {first!r} is initialised after the tie; put "
                             "the owner first (in init order)")
        params, state = scope.params.get(first, {}), scope.state.get(first, {})
        for i, part in enumerate(rest):
            kids = dict(layer.children)
            if part not in kids:
                where = "/".join([first, *rest[:i]])
                raise ValueError(f"shared({target!r}): {layer.name} {where!r} has no child "
                                 f"{part!r}; its children are {sorted(kids)}")
            layer, params, state = kids[part], params.get(part, {}), state.get(part, {})
        return layer, params, state
    raise ValueError(f"shared({target!r}): no earlier sibling or child of an enclosing "
                     f"combinator named {first!r}")


def shared(target: str, layer: Layer | None = None) -> Layer:
    """A tie: a child that reuses the params (and state) of the layer at ``target``.

    ``target`` names an earlier sibling (``"fc"``) or a path below a child of any enclosing
    composite (``"embeddings/token"``), found in the innermost composite that has a child of
    that first name. Works in every composite that declares its ``children`` (``serial``,
    ``parallel``, ``residual``, the models). ``serial(("fc", dense(8)), ("act", relu()),
    ("fc_again", shared("fc")))`` applies the same ``fc`` weights twice (Gluon's ``params=``
    sharing). With ``layer``, that layer's ``apply`` runs on the target's params instead of the
    target's own: ``shared("embeddings/token", attend_embedding())`` is an output projection
    tied to an embedding table (BERT's MLM decoder).

    The tie owns no params; gradients from every use add up in the owner's params. The owner
    must be initialised before the tie. A stateful owner can be shared only with a sibling in
    ``serial`` (which threads the state back to the owner); elsewhere its state is refused.
    """
    if not isinstance(target, str) or not target or any(not p for p in target.split("/")):
        raise ValueError(f"shared: target must be a child name or path 'a/b', got {target!r}")
    if layer is not None and not isinstance(layer, Layer):
        raise TypeError(f"shared: layer must be a Layer or None, got {layer!r}")

    def resolve():
        owner, p, st = _resolve_shared(target)
        if st:
            raise ValueError(f"shared({target!r}): the owner has state; a stateful layer can "
                             "only be shared with an earlier sibling inside serial(...)")
        return (layer or owner), p, st

    def init(key, in_shape):
        real, p, st = resolve()
        if layer is None:
            box = {}

            def shape_only(k):
                box["out"], pp, ss = real.init(k, tuple(in_shape))
                return pp, ss

            jax.eval_shape(shape_only, key)
            return box["out"], {}, {}
        x = jax.ShapeDtypeStruct(tuple(in_shape), jnp.float32)
        out = jax.eval_shape(lambda pp, xx: real.apply(pp, st, xx)[0], p, x)
        return jax.tree_util.tree_map(lambda a: tuple(a.shape), out), {}, {}

    def apply(params, state, x, *, key=None, train=False, **kwargs):
        real, p, st = resolve()
        y, _ = real.apply(p, st, x, key=key, train=train, **kwargs)
        return y, state

    return Layer(init, apply, name="shared",
                 config={"target": target, "_ref": _SharedRef(target, layer)})


@dataclasses.dataclass(frozen=True)
class _SharedView:
    """For ``summary``: the owner's layer, shown as ``shared(owner)`` with no own params."""

    real: Layer
    owner: str

    def layer(self) -> Layer:
        real = self.real

        def init(key, in_shape):
            out, _, _ = real.init(key, in_shape)
            return out, {}, {}

        return Layer(init, real.apply, name=f"shared({self.owner})")


def _shared_target(layer: Layer) -> str | None:
    ref = layer.config.get("_ref") if layer.name == "shared" else None
    return ref.target if isinstance(ref, _SharedRef) else None


def _sibling_owner(layer: Layer, earlier: dict[str, Layer]) -> str | None:
    """``serial``'s own handling: a plain tie (no ``layer``) to an earlier sibling."""
    target = _shared_target(layer)
    if target is None or layer.config["_ref"].via is not None or target not in earlier:
        return None
    return target if _shared_target(earlier[target]) is None else None


# ----------------------------------------------------------------------------- param checks

# Set while a combinator that checked its params applies its children (they need no check).
_checking = threading.local()


def _flat_params(tree, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """``[(path, leaf)]`` in the tree's own order (dicts in insertion order: layer order)."""
    if isinstance(tree, dict):
        if not tree and prefix:
            return [(prefix, tree)]
        return [item for k, v in tree.items() for item in _flat_params(v, (*prefix, str(k)))]
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        fields = getattr(tree, "_fields", None) or [str(i) for i in range(len(tree))]
        return [item for k, v in zip(fields, tree, strict=True)
                for item in _flat_params(v, (*prefix, str(k)))]
    return [(prefix, tree)]


def _layer_at(children: Sequence[tuple[str, Layer]], path: tuple[str, ...], top: str
              ) -> tuple[str, list[str], str]:
    """``(layer type, layer path, param name)`` for a param path, following child names."""
    name, where, i = top, [], 0
    while i < len(path):
        match = dict(children).get(path[i])
        if match is None:
            break
        name, children = match.name, match.children
        where.append(path[i])
        i += 1
    return name, where, "/".join(path[i:])


def _describe(leaf) -> str:
    if isinstance(leaf, dict):
        return "an empty dict" if not leaf else f"a dict with keys {sorted(leaf)}"
    shape = getattr(leaf, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else f"a {type(leaf).__name__}"


def _params_problem(expected, given, extras: bool = True) -> tuple[tuple[str, ...], str] | None:
    """The first path (in layer order) at which ``given`` differs from ``expected``
    (structure or shape) and what differs, or ``None``. ``extras=False`` accepts params
    beyond the expected ones (a parent composite may hand its child a superset)."""
    exp = _flat_params(expected)
    got = dict(_flat_params(given))
    exp_paths = {p for p, _ in exp}

    def under(paths, prefix):
        return [p for p in paths if p[: len(prefix)] == prefix]

    for path, e in exp:
        g = got.get(path)
        if g is None:
            blocker = next((path[:j] for j in range(1, len(path)) if path[:j] in got), None)
            if blocker is not None:
                return blocker, f"expected a dict of params, given {_describe(got[blocker])}"
            if under(got, path):
                return path, f"expected {_describe(e)}, given a nested dict"
            top = next(path[:j] for j in range(1, len(path) + 1) if not under(got, path[:j]))
            parent = top[:-1]
            extra = sorted({p[len(parent)] for p in under(got, parent) if len(p) > len(parent)}
                           - {p[len(parent)] for p in under(exp_paths, parent)
                              if len(p) > len(parent)})
            hint = f"; the params have unexpected {extra} instead" if extra else ""
            want = (_describe(e) if top == path
                    else f"params {sorted({p[len(top)] for p in under(exp_paths, top)})}")
            return top, f"missing (expected {want}){hint}"
        es, gs = getattr(e, "shape", None), getattr(g, "shape", None)
        if es is not None and (gs is None or tuple(es) != tuple(gs)):
            return path, f"expected shape {tuple(es)}, given {_describe(g)}"
    for path in got if extras else ():
        if path not in exp_paths and not any(path[: len(p)] == p for p in exp_paths):
            return path, f"unexpected ({_describe(got[path])}): this layer makes no such param"
    return None


def _abstract_tree(tree):
    """Shapes and dtypes of a tree of (traced) arrays, keeping dict insertion order."""
    if isinstance(tree, dict):
        return {k: _abstract_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        return [_abstract_tree(v) for v in tree]
    shape = getattr(tree, "shape", None)
    return tree if shape is None else jax.ShapeDtypeStruct(shape, tree.dtype)


def _checked(layer_name: str, init: InitFn, children, apply: ApplyFn) -> ApplyFn:
    """``apply`` preceded by a check of ``params`` against the tree ``init`` makes for the
    input's shape (structure and shapes, computed abstractly once per input shape): a
    mismatch raises :class:`ShapeError` naming the first differing path and the expected and
    given shapes. Only the outermost checked combinator checks (it covers the whole tree);
    inputs that are not a single array, or shapes ``init`` rejects, are not checked here."""
    cache: dict[tuple[int, ...], Any] = {}
    init = _scoped_init(init, children)  # its own scope: never records into apply's

    def checked_apply(params, state, x, **kwargs):
        if getattr(_checking, "active", False):
            return apply(params, state, x, **kwargs)
        shape = getattr(x, "shape", None)
        if shape is None or getattr(x, "dtype", None) is None or not _check_params(
                layer_name, init, children, cache, tuple(shape), params):
            return apply(params, state, x, **kwargs)
        _checking.active = True
        try:
            return apply(params, state, x, **kwargs)
        finally:
            _checking.active = False

    return checked_apply


def _check_params(layer_name, init, children, cache, shape, params) -> bool:
    """Raise :class:`ShapeError` if ``params`` do not fit; ``False`` if they could not be
    checked (``init`` rejects this input shape)."""
    if shape not in cache:
        found = []

        def params_of(k):  # records the tree in layer order (eval_shape sorts dict keys)
            params = init(k, shape)[1]
            found.append(_abstract_tree(params))
            return params

        try:
            jax.eval_shape(params_of, jax.random.key(0))
            cache[shape] = found[-1]
        except Exception:  # noqa: BLE001 - the layer's own apply reports a bad input
            cache[shape] = None
    expected = cache[shape]
    if expected is None:
        return False
    # applied by the user (not inside another layer's apply): unexpected params are refused
    top = getattr(_checking, "depth", 0) == 0 and len(_scope_stack) <= 1
    problem = _params_problem(expected, params, extras=top)
    if problem is not None:
        path, what = problem
        lname, where, param = _layer_at(children, path, layer_name)
        at = f"param '{param}'" if param else "params"
        if not param and what.startswith("missing"):
            at = "params of this layer are"
        elif not param:
            at = "params:"
        raise ShapeError(lname, f"{at} {what} (expected for input shape {shape}: params of "
                                "another model or configuration, or an input of the wrong "
                                "shape?)", where)
    return True


# ----------------------------------------------------------------------------- combinators


def serial(*layers: Any) -> Layer:
    """Compose layers in sequence. Children are ``Layer``s (named ``"0"``, ``"1"``, ...)
    or ``(name, Layer)`` pairs. Params/state: ``{child_name: child_params}`` (children
    without params are omitted from ``params`` and ``state``)."""
    if len(layers) == 1 and isinstance(layers[0], (list, tuple)) and not (
        len(layers[0]) == 2 and isinstance(layers[0][0], str)
    ):
        layers = tuple(layers[0])
    children = _normalise_children(layers)
    owners: dict[str, str | None] = {}
    for i, (name, layer) in enumerate(children):
        earlier = dict(children[:i])
        owners[name] = _sibling_owner(layer, earlier)
        target = _shared_target(layer)
        if target is not None and owners[name] is None and "/" not in target and any(
                n == target for n, _ in children[i:]):
            raise ValueError(f"shared({target!r}) in serial: no earlier sibling named "
                             f"{target!r} (it comes later)")
    by_name = dict(children)

    def resolve(name: str, layer: Layer) -> tuple[str, Layer]:
        owner = owners[name]
        return (name, layer) if owner is None else (owner, by_name[owner])

    def init(key, in_shape):
        params, state = {}, {}
        shape = tuple(in_shape)
        for i, (name, layer) in enumerate(children):
            owner, real = resolve(name, layer)
            k = child_key(key, i)
            if owner != name:
                # shape inference only; params come from the owner
                shape, _, _ = init_child(name, _SharedView(real, owner).layer(), k, shape)
                continue
            shape, p, s = init_child(name, real, k, shape)
            if p:
                params[name] = p
            if s:
                state[name] = s
        return shape, params, state

    def apply(params, state, x, *, key=None, train=False):
        new_state = dict(state)
        for i, (name, layer) in enumerate(children):
            owner, real = resolve(name, layer)
            x, s = apply_child(
                name,
                real,
                params.get(owner, {}),
                new_state.get(owner, {}),
                x,
                key=child_key(key, i),
                train=train,
            )
            if s:
                new_state[owner] = s
        return x, new_state

    return Layer(init, _checked("serial", init, children, apply), name="serial",
                 children=children)


def parallel(*layers: Any, combine: str = "concat", axis: int = -1) -> Layer:
    """Fan-out: every child sees the same input; outputs are concatenated along ``axis``
    (``combine="concat"``), summed (``"sum"``), or returned as a tuple (``"tuple"``)."""
    if combine not in ("concat", "sum", "tuple"):
        raise ValueError(f"parallel: combine must be 'concat', 'sum' or 'tuple', got {combine!r}")
    children = _normalise_children(layers)

    def combine_shapes(shapes):
        if combine == "tuple":
            return tuple(shapes)
        first = shapes[0]
        if combine == "sum":
            for s in shapes[1:]:
                if tuple(s) != tuple(first):
                    got = [tuple(s) for s in shapes]
                    raise ShapeError("parallel", f"sum needs equal branch shapes, got {got}")
            return tuple(first)
        ax = axis % len(first)
        for s in shapes[1:]:
            if len(s) != len(first) or any(
                a != b for j, (a, b) in enumerate(zip(s, first, strict=True)) if j != ax
            ):
                raise ShapeError(
                    "parallel",
                    f"concat along axis {axis} needs equal other dims, got "
                    f"{[tuple(s) for s in shapes]}",
                )
        out = list(first)
        out[ax] = sum(s[ax] for s in shapes)
        return tuple(out)

    def init(key, in_shape):
        params, state, shapes = {}, {}, []
        for i, (name, layer) in enumerate(children):
            s_out, p, s = init_child(name, layer, child_key(key, i), in_shape)
            shapes.append(s_out)
            if p:
                params[name] = p
            if s:
                state[name] = s
        return combine_shapes(shapes), params, state

    def apply(params, state, x, *, key=None, train=False):
        outs, new_state = [], dict(state)
        for i, (name, layer) in enumerate(children):
            y, s = apply_child(
                name, layer, params.get(name, {}), state.get(name, {}), x,
                key=child_key(key, i), train=train,
            )
            outs.append(y)
            if s:
                new_state[name] = s
        if combine == "tuple":
            return tuple(outs), new_state
        if combine == "sum":
            return sum(outs[1:], outs[0]), new_state
        return jnp.concatenate(outs, axis=axis), new_state

    return Layer(init, _checked(f"parallel[{combine}]", init, children, apply),
                 name=f"parallel[{combine}]", children=children,
                 config={"combine": combine, "axis": axis})


def residual(body: Layer, shortcut: Layer | None = None, post: Layer | None = None) -> Layer:
    """``post(body(x) + shortcut(x))``; ``shortcut`` defaults to identity, ``post`` to none.

    Params/state: ``{"body": ..., "shortcut": ..., "post": ...}`` (empty ones omitted).
    """
    children = [("body", body)]
    if shortcut is not None:
        children.append(("shortcut", shortcut))
    if post is not None:
        children.append(("post", post))
    children_t = tuple(children)

    def init(key, in_shape):
        params, state = {}, {}
        out_body, p, s = init_child("body", body, child_key(key, 0), in_shape)
        if p:
            params["body"] = p
        if s:
            state["body"] = s
        out_short = tuple(in_shape)
        if shortcut is not None:
            out_short, p, s = init_child("shortcut", shortcut, child_key(key, 1), in_shape)
            if p:
                params["shortcut"] = p
            if s:
                state["shortcut"] = s
        if tuple(out_body) != tuple(out_short):
            raise ShapeError(
                "residual",
                f"body output {tuple(out_body)} and shortcut output {tuple(out_short)} differ; "
                "give residual(...) a projection shortcut",
            )
        out = tuple(out_body)
        if post is not None:
            out, p, s = init_child("post", post, child_key(key, 2), out)
            if p:
                params["post"] = p
            if s:
                state["post"] = s
        return out, params, state

    def apply(params, state, x, *, key=None, train=False):
        new_state = dict(state)
        y, s = apply_child("body", body, params.get("body", {}), state.get("body", {}), x,
                           key=child_key(key, 0), train=train)
        if s:
            new_state["body"] = s
        sc = x
        if shortcut is not None:
            sc, s = apply_child("shortcut", shortcut, params.get("shortcut", {}),
                                state.get("shortcut", {}), x, key=child_key(key, 1), train=train)
            if s:
                new_state["shortcut"] = s
        y = y + sc
        if post is not None:
            y, s = apply_child("post", post, params.get("post", {}), state.get("post", {}), y,
                               key=child_key(key, 2), train=train)
            if s:
                new_state["post"] = s
        return y, new_state

    return Layer(init, _checked("residual", init, children_t, apply), name="residual",
                 children=children_t)


def lambda_layer(fn: Callable[[Any], Any], name: str = "lambda",
                 shape_fn: Callable[[Shape], Shape] | None = None) -> Layer:
    """A parameter-free layer computing ``fn(x)``. The output shape is ``shape_fn(in_shape)``
    if given, else inferred with ``jax.eval_shape``."""

    def init(key, in_shape):
        if shape_fn is not None:
            return tuple(shape_fn(tuple(in_shape))), {}, {}
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(tuple(in_shape), jnp.float32))
        return tuple(out.shape), {}, {}

    def apply(params, state, x, *, key=None, train=False):
        return fn(x), state

    return Layer(init, apply, name=name)


def identity() -> Layer:
    """The identity layer."""
    return lambda_layer(lambda x: x, name="identity", shape_fn=lambda s: s)


# ----------------------------------------------------------------------------- summary


@contextlib.contextmanager
def _recording():
    _summary_stack.append([])
    try:
        yield _summary_stack[-1]
    finally:
        _summary_stack.pop()


def summary(layer: Layer, in_shape: Shape, *, key=None, print_fn: Callable[[str], None] = print
            ) -> str:
    """Print (and return) a table of every layer's path, type, output shape and parameter
    count, like Gluon's ``print(net)`` / Keras ``summary``. Runs ``init`` abstractly (no
    arrays are allocated)."""
    key = jax.random.key(0) if key is None else key
    rows: list[tuple[str, str, Any, int]] = []
    holder: dict[str, Any] = {}

    def run(k):
        with _recording() as rec:
            out, p, s = init_child("", layer, k, tuple(in_shape))
            rows.extend(rec)
        holder["out"] = out
        return p, s

    params, state = jax.eval_shape(run, key)
    total = _num_params(params)
    lines = [f"{'layer':<40} {'type':<18} {'output shape':<24} {'params':>10}", "-" * 95]
    for path, name, out, n in rows:
        path = path.lstrip("/") or "<root>"
        depth = path.count("/") if path != "<root>" else 0
        label = ("  " * depth + path.split("/")[-1]) if path != "<root>" else path
        lines.append(f"{label:<40} {name:<18} {str(out):<24} {n:>10,}")
    lines.append("-" * 95)
    lines.append(f"total params: {total:,}   state arrays: {len(jax.tree_util.tree_leaves(state))}")
    text = "\n".join(lines)
    print_fn(text)
    return text
