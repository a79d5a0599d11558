"""fdl: a functional deep-learning library on JAX.

Models are pure functions over parameter pytrees; see ``fdl.nn`` (layers), ``fdl.optim``
(optimizers), ``fdl.train`` (training loops, checkpoints), ``fdl.data`` (datasets).
``fdl.config`` holds the few settings (see its docstring); ``fdl.kernels()`` says which
kernels (oneDNN's or XLA's) compute convolutions and recurrent layers here. Importing fdl
changes nothing in the process (process tuning is the explicit ``fdl.runtime.tune_allocator()``).
"""

__version__ = "0.1.0"

from fdl import config


def kernels():
    """Which kernels compute conv / LSTM / GRU here and why (see :func:`fdl.runtime.kernels`)."""
    from fdl.runtime import kernels as _kernels

    return _kernels()


__all__ = ["config", "kernels"]
