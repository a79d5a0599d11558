"""fdl's one configuration surface: a few named values, read where they take effect.

::

    import fdl
    fdl.config.conv_backend                        # 'auto'
    fdl.config.update("conv_backend", "xla")       # for the whole process
    with fdl.config.override(rnn_backend="xla"):   # inside this block (this thread/context)
        step = jax.jit(train_step)                 # ... read when the step is *traced*
    fdl.config.values()                            # {'conv_backend': 'auto', ...}

Precedence: :func:`override` (innermost first) > :func:`update` > the environment variable
> the default. Environment variables are read here and nowhere else, only as defaults (each
time a value is looked up, so a variable set before the first use counts). Unknown names and
values are refused with the valid ones. The kernel switches are read when a function is traced:
change them before ``jax.jit`` traces (a cached trace keeps the kernels it was traced with).

Options (``OPTIONS`` has the same as data):

- ``conv_backend`` (``FDL_CONV_BACKEND``): ``auto`` -- oneDNN's convolution on CPU when the
  native library loads, XLA otherwise (and on GPU/TPU); ``native`` -- the same, but an
  unavailable native library is an error instead of a warning; ``xla`` -- always XLA.
- ``dense_backend`` (``FDL_DENSE_BACKEND``): the float32 matrix products of dense layers
  (``fdl.nn.matmul``: forward and both gradients), oneDNN's sgemm on CPU; same values.
- ``rnn_backend`` (``FDL_RNN_BACKEND``): the LSTM/GRU time loops, same values.
- ``optim_backend`` (``FDL_OPTIM_BACKEND``): the fused optimizer steps
  (``fdl.optim.apply_gradients`` of ``adam``, ``adamw``, ``sgd`` with momentum), one native
  pass over all float32 leaves on CPU; same values.
- ``norm_backend`` (``FDL_NORM_BACKEND``): training-mode ``batch_norm`` on float32 (and the
  ReLU after it, ``batch_norm(relu=True)``), two native passes forward and two backward on
  CPU; same values.
- ``native_build`` (``FDL_NATIVE_BUILD``): ``auto`` -- when the installed native libraries are
  missing or stale, build them on first use into ``native_cache`` (once, under a file lock);
  ``never`` -- only load valid libraries that exist (else XLA).
- ``native_cache`` (``FDL_NATIVE_CACHE``): that cache directory (default
  ``$XDG_CACHE_HOME/fdl/native`` or ``~/.cache/fdl/native``).
- ``data_dir`` (``FDL_DATA``): where the dataset readers look by default, one sub-folder per
  dataset (default ``~/.cache/fdl/data``).

``fdl.kernels()`` reports what these choose on this machine.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["OPTIONS", "Option", "get", "override", "update", "values"]


@dataclasses.dataclass(frozen=True)
class Option:
    """A configuration value: its environment variable, default and valid values (``None``:
    any string)."""

    name: str
    env: str
    default: str | Callable[[], str]
    choices: tuple[str, ...] | None
    help: str

    def default_value(self) -> str:
        return self.default() if callable(self.default) else self.default

    def check(self, value: Any, source: str) -> str:
        if not isinstance(value, str):
            raise TypeError(f"fdl.config.{self.name} must be a string, got {value!r} ({source})")
        v = value.strip()
        if self.choices is not None:
            v = v.lower()
            if v not in self.choices:
                raise ValueError(f"fdl.config.{self.name} must be one of {list(self.choices)}, "
                                 f"got {value!r} ({source})")
        elif not v:
            raise ValueError(f"fdl.config.{self.name} must not be empty ({source})")
        return v


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fdl", "native")


def _default_data() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "fdl", "data")


_BACKENDS = ("auto", "native", "xla")
OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("conv_backend", "FDL_CONV_BACKEND", "auto", _BACKENDS,
           "2-D convolutions: oneDNN on CPU when available (auto), required (native), or XLA"),
    Option("dense_backend", "FDL_DENSE_BACKEND", "auto", _BACKENDS,
           "dense layers' float32 matrix products: oneDNN's sgemm on CPU when available "
           "(auto), required (native), or XLA's dot"),
    Option("rnn_backend", "FDL_RNN_BACKEND", "auto", _BACKENDS,
           "LSTM/GRU time loops: native C++ loop on CPU when available (auto), required "
           "(native), or XLA's lax.scan"),
    Option("optim_backend", "FDL_OPTIM_BACKEND", "auto", _BACKENDS,
           "fused optimizer steps (adam, adamw, sgd with momentum): a native one-pass loop on "
           "CPU when available (auto), required (native), or XLA"),
    Option("norm_backend", "FDL_NORM_BACKEND", "auto", _BACKENDS,
           "training-mode batch norm (with a ReLU after it when fused): a native two-pass "
           "loop on CPU when available (auto), required (native), or XLA"),
    Option("native_build", "FDL_NATIVE_BUILD", "auto", ("auto", "never"),
           "build missing/stale native libraries on first use (auto) or never"),
    Option("native_cache", "FDL_NATIVE_CACHE", _default_cache, None,
           "where first-use builds of the native libraries go"),
    Option("data_dir", "FDL_DATA", _default_data, None,
           "where the dataset readers look by default (one sub-folder per dataset)"),
)}

_set: dict[str, str] = {}
_override: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "fdl_config_override", default=())


def _option(name: str) -> Option:
    try:
        return OPTIONS[name]
    except KeyError:
        raise AttributeError(f"fdl.config has no option {name!r}; options: "
                             f"{sorted(OPTIONS)}") from None


def get(name: str) -> str:
    """The current value of option ``name``."""
    opt = _option(name)
    for key, value in reversed(_override.get()):
        if key == name:
            return value
    if name in _set:
        return _set[name]
    env = os.environ.get(opt.env)
    if env is not None and env.strip():
        return opt.check(env, f"from the environment variable {opt.env}")
    return opt.default_value()


def update(name: str, value: str) -> None:
    """Set option ``name`` for the whole process (validated)."""
    _set[name] = _option(name).check(value, "fdl.config.update")


@contextlib.contextmanager
def override(**settings: str) -> Iterator[None]:
    """Set options inside a ``with`` block (this thread / async context only)."""
    checked = tuple((k, _option(k).check(v, "fdl.config.override")) for k, v in settings.items())
    token = _override.set(_override.get() + checked)
    try:
        yield
    finally:
        _override.reset(token)


def values() -> dict[str, str]:
    """Every option's current value."""
    return {name: get(name) for name in OPTIONS}


class _ConfigModule(types.ModuleType):
    """``fdl.config.<option>`` reads a value; assigning one is :func:`update`."""

    def __getattr__(self, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in OPTIONS:
            update(name, value)
        else:
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *OPTIONS})


sys.modules[__name__].__class__ = _ConfigModule
