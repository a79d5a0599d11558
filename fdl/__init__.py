"""fdl: a functional deep-learning library on JAX.

Models are pure functions over parameter pytrees; see ``fdl.nn`` (layers), ``fdl.optim``
(optimizers), ``fdl.train`` (training loops, checkpoints), ``fdl.data`` (datasets).
"""

__version__ = "0.1.0"
