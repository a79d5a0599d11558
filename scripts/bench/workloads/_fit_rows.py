"""Row builders shared by the ``fit_*`` workloads: ``fdl.train.fit`` against a bare Python loop
over the same compiled ``make_train_step``.

A workload passes ``setup() -> (model, params, state, optimizer, x, y, batch)`` (NumPy data,
``len(x)`` a multiple of ``batch``) and optionally ``kernels``, a zero-argument context manager
every timed call runs under (e.g. forcing XLA's kernels: the kernel choice is made when a
function is traced, which happens inside the first call).
"""

from __future__ import annotations

from collections.abc import Callable


def _under(kernels: Callable | None, step: Callable) -> Callable:
    if kernels is None:
        return step

    def run():
        with kernels():
            return step()

    return run


def fit_row(setup: Callable, epochs: int = 1, kernels: Callable | None = None):
    """``fdl.train.fit(..., epochs=epochs)`` on an ``ArrayLoader`` built once and rewound to
    epoch 0 before every call (its device copy of the data is made once, as the bare loop's
    batches are); progress bar, printing and checkpoints off."""
    import jax

    from fdl.data import ArrayLoader
    from fdl.train import fit, make_train_step

    net, params, state, opt, x, y, batch = setup()
    train_step = make_train_step(net, opt)
    key = jax.random.key(1)
    loader = ArrayLoader((x, y), batch, key=key, last_batch="drop")
    expected = epochs * (len(x) // batch)

    def step():
        loader.set_state({"epoch": 0, "batch": 0})
        res = fit(net, params, state, opt, loader, epochs=epochs, key=key,
                  train_step=train_step, progress=False, print_fn=None, checkpoint_dir=None)
        if res.steps != expected:
            raise RuntimeError(f"fit ran {res.steps} steps, expected {expected}")
        return jax.block_until_ready(res.params)

    return _under(kernels, step)


def bare_row(setup: Callable, epochs: int = 1, kernels: Callable | None = None):
    """A Python loop over the compiled step on batches put on the device once (no shuffling, one
    key): the lower bound a hand-written loop reaches."""
    import jax
    import jax.numpy as jnp

    from fdl.train import make_train_step

    net, params, state, opt, x, y, batch = setup()
    train_step = make_train_step(net, opt)
    key = jax.random.key(1)
    batches = [(jnp.asarray(x[i:i + batch]), jnp.asarray(y[i:i + batch]))
               for i in range(0, len(x) - batch + 1, batch)]
    carry = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state), opt.init(params)]

    def step():
        p, s, o = carry
        for _ in range(epochs):
            for b in batches:
                p, s, o, _ = train_step(p, s, o, b, key)
        carry[:] = [p, s, o]
        return jax.block_until_ready(p)

    return _under(kernels, step)
