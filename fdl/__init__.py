"""fdl: a functional deep-learning library on JAX.

Models are pure functions over parameter pytrees; see ``fdl.nn`` (layers), ``fdl.optim``
(optimizers), ``fdl.train`` (training loops, checkpoints), ``fdl.data`` (datasets).
"""

__version__ = "0.1.0"

from fdl import _malloc

_malloc.configure()  # keep XLA's per-step temporaries resident (see fdl/_malloc.py)
