"""Testing helpers: finite-difference gradient checks, hypothesis strategies, and the check
that a function lowers for CPU, GPU and TPU (:func:`check_lowers_on_all_platforms`).

Gradient checks need float64: run them under ``jax.config.update("jax_enable_x64", True)``
(the test session does) and feed float64 inputs. Typical use inside a hypothesis test::

    @given(x=fdl.testing.arrays(fdl.testing.shapes(2, 4)))
    def test_tanh_grads(x):
        fdl.testing.check_gradients(jnp.tanh, (x,), order=2)

    fdl.testing.check_layer_gradients(nn.dense(3), x, key=key)   # wrt params and input

``check_gradients`` compares forward- and reverse-mode derivatives (orders 1..``order``)
with central finite differences along random directions (``jax.test_util.check_grads``)
and additionally compares the full reverse-mode gradient of a scalar projection with a
per-coordinate central difference for small inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads as _jax_check_grads

__all__ = [
    "check_lowers_on_all_platforms",
    "check_gradients",
    "check_layer_gradients",
    "finite_difference_grad",
    "shapes",
    "arrays",
    "native_targets",
    "require_x64",
    "count_compilations",
]


def require_x64() -> None:
    """Raise unless 64-bit mode is on (finite differences are meaningless in float32)."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "gradient checks need float64: jax.config.update('jax_enable_x64', True) first"
        )


def _as_f64(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
        else a,
        tree,
    )


def finite_difference_grad(fn: Callable[..., Any], x, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of a scalar ``fn`` at array ``x`` (float64 numpy)."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = eps
        fp = float(fn(jnp.asarray((flat + e).reshape(x.shape))))
        fm = float(fn(jnp.asarray((flat - e).reshape(x.shape))))
        g.reshape(-1)[i] = (fp - fm) / (2 * eps)
    return g


def check_gradients(
    fn: Callable[..., Any],
    args: Sequence[Any],
    *,
    order: int = 2,
    modes: Sequence[str] = ("fwd", "rev"),
    eps: float = 1e-4,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    dense_check_max_size: int = 64,
    seed: int = 0,
) -> None:
    """Assert ``fn``'s derivatives (orders 1..``order``, ``modes``) match central finite
    differences at ``args`` (pytrees of float64 arrays). Raises ``AssertionError`` on mismatch.

    For inputs with at most ``dense_check_max_size`` scalars in total, the full gradient of
    ``sum(fn(*args) * r)`` (``r`` a fixed random cotangent) is also compared coordinate by
    coordinate with :func:`finite_difference_grad`.
    """
    require_x64()
    args = tuple(_as_f64(a) for a in args)
    _jax_check_grads(fn, args, order=order, modes=tuple(modes), eps=eps, atol=atol, rtol=rtol)

    flat, unravel = jax.flatten_util.ravel_pytree(args)
    if flat.size == 0 or flat.size > dense_check_max_size:
        return
    out = jax.eval_shape(fn, *args)
    rng = np.random.default_rng(seed)
    cot = jax.tree_util.tree_map(lambda o: jnp.asarray(rng.normal(size=o.shape)), out)

    def scalar(v):
        y = fn(*unravel(v))
        return sum(
            jnp.sum(a * b) for a, b in zip(jax.tree_util.tree_leaves(y),
                                           jax.tree_util.tree_leaves(cot), strict=True)
        )

    g_ad = np.asarray(jax.grad(scalar)(flat))
    g_fd = finite_difference_grad(scalar, np.asarray(flat), eps=1e-6)
    np.testing.assert_allclose(g_ad, g_fd, rtol=max(rtol, 1e-4), atol=max(atol, 1e-6))


def check_layer_gradients(
    layer,
    x,
    *,
    key,
    train: bool = False,
    apply_key=None,
    order: int = 1,
    wrt: Sequence[str] = ("params", "x"),
    **kwargs,
) -> None:
    """Check a layer's gradients wrt its params and/or its input in float64.

    Initialises ``layer`` for ``x.shape``, casts params to float64, and checks
    ``lambda params, x: apply(params, state, x, key=apply_key, train=train)[0]``.
    """
    require_x64()
    x = jnp.asarray(x, jnp.float64)
    _, params, state = layer.init(key, tuple(x.shape))
    params = _as_f64(params)
    state = _as_f64(state)
    if "params" in wrt and "x" in wrt:
        def f(p, xx):
            return layer.apply(p, state, xx, key=apply_key, train=train)[0]
        args = (params, x)
    elif "params" in wrt:
        def f(p):
            return layer.apply(p, state, x, key=apply_key, train=train)[0]
        args = (params,)
    else:
        def f(xx):
            return layer.apply(params, state, xx, key=apply_key, train=train)[0]
        args = (x,)
    check_gradients(f, args, order=order, **kwargs)


# ----------------------------------------------------------------------------- strategies


def shapes(min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 5):
    """Hypothesis strategy of array shapes (tuples of ints)."""
    from hypothesis.extra import numpy as hnp

    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def arrays(shape, *, min_value: float = -2.0, max_value: float = 2.0,
           kinks: Sequence[float] = (), margin: float = 0.05):
    """Hypothesis strategy of float64 numpy arrays of ``shape`` (a tuple or a strategy).

    Values lie in ``[min_value, max_value]`` and at least ``margin`` away from every point
    in ``kinks`` (e.g. ``kinks=(0.0,)`` for ReLU), so finite differences never straddle a kink.
    """
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    def away(v: float) -> float:
        for k in kinks:
            if abs(v - k) < margin:
                v = k + margin if v >= k else k - margin
        return v

    elems = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, width=64)
    strat = hnp.arrays(np.float64, shape, elements=elems)
    if kinks:
        strat = strat.map(lambda a: np.vectorize(away, otypes=[np.float64])(a) if a.size else a)
    return strat


def native_targets() -> tuple[str, ...]:
    """The XLA custom-call targets of fdl's native CPU kernels."""
    from fdl._ext import build

    return tuple(t for lib in build.LIBRARIES.values() for t in lib.targets)


def check_lowers_on_all_platforms(fn: Callable[..., Any], *args,
                                  platforms: Sequence[str] = ("cpu", "cuda", "tpu")
                                  ) -> dict[str, str]:
    """Export ``jax.jit(fn)(*args)`` with :mod:`jax.export` for ``platforms`` together (one
    multi-platform module) and for each non-CPU platform alone; assert that each lowers and
    that no fdl native custom call appears in a non-CPU module (GPU/TPU get XLA's kernels).
    Returns the module texts by platform (``"all"`` for the multi-platform one). Any model
    family's training step can be checked with it (see /work/coord/api/native.md)."""
    from jax import export

    allowed = [export.DisabledSafetyCheck.custom_call(t) for t in native_targets()]
    jitted = jax.jit(fn)
    together = export.export(jitted, platforms=tuple(platforms), disabled_checks=allowed)(*args)
    texts = {"all": together.mlir_module()}
    for platform in platforms:
        if platform == "cpu":
            continue
        text = export.export(jitted, platforms=(platform,))(*args).mlir_module()
        found = [t for t in native_targets() if t in text]
        assert not found, f"fdl native custom calls in the {platform} module: {found}"
        texts[platform] = text
    return texts


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations(fn: Callable[..., Any] | str | None = None) -> Iterator[list[str]]:
    """Record the XLA compilations made inside the ``with`` block: yields a list that fills with
    the compiled programs' names (``"jit(step)"``), only those of ``fn`` (a function or its
    name) when given. ``len(...) == 1`` after many calls means no recompilation. It counts
    compilations themselves, unlike the private ``_cache_size()`` of a jitted function (the C++
    dispatch cache), which was seen to read 0 late in a long test session::

        with fdl.testing.count_compilations(step) as compiled:
            for batch in batches:
                params = step(params, batch)
        assert len(compiled) == 1
    """
    import jax.monitoring

    if fn is None or isinstance(fn, str):
        name = fn
    else:
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "__wrapped__", None),
                                                        "__name__", None)
    wanted = None if name is None else (name if name.startswith("jit(") else f"jit({name})")
    compiled: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        fun_name = kwargs.get("fun_name", "")
        if event == _COMPILE_EVENT and (wanted is None or fun_name == wanted):
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
