"""Optimizer update benchmarks: fdl.optim against optax on a ResNet-50-shaped parameter tree.

One step = one jitted optimizer step on ~25.6 M float32 parameters in 161 leaves (ResNet-50's
conv kernels, BatchNorm scales/offsets and the classifier), params and optimizer state donated,
gradients fixed: ``fdl.optim.apply_gradients`` for fdl (the fused step where the optimizer has
one, as ``make_train_step``), ``update`` + ``apply_updates`` for optax. The step is
memory-bound: ``bytes`` is the least memory traffic it must move (read params, grads, each state
tree once; write params and state once), so the ``GB/s`` column is comparable across rows.
The ``x + y copy`` row adds the grads into params and into each state tree with XLA: what XLA's
one-output loops cost for these trees (they read the grads once per output tree).

Run alone: ``python -m scripts.bench.workloads.optimizer`` prints fdl/optax ratios.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from scripts.bench import common
from scripts.bench.api import Workload


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of ResNet-50's parameters (HWIO kernels, BN scale/offset, fc)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(name, kh, cin, cout):
        shapes[f"{name}/conv/w"] = (kh, kh, cin, cout)
        shapes[f"{name}/bn/scale"] = (cout,)
        shapes[f"{name}/bn/offset"] = (cout,)

    conv_bn("stem", 7, 3, 64)
    cin = 64
    for s, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for b in range(blocks):
            name = f"stage{s + 1}/block{b}"
            conv_bn(f"{name}/a", 1, cin, width)
            conv_bn(f"{name}/b", 3, width, width)
            conv_bn(f"{name}/c", 1, width, 4 * width)
            if b == 0:
                conv_bn(f"{name}/shortcut", 1, cin, 4 * width)
            cin = 4 * width
    shapes["fc/w"] = (2048, 1000)
    shapes["fc/b"] = (1000,)
    return shapes


def make_tree(seed: int, scale: float = 1.0) -> dict:
    from fdl.tree import unflatten_dict

    flat = {}
    key = jax.random.key(seed)
    for i, (path, shape) in enumerate(resnet50_shapes().items()):
        flat[path] = scale * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    return unflatten_dict(flat)


N_PARAMS = sum(math.prod(s) for s in resnet50_shapes().values())
N_LEAVES = len(resnet50_shapes())


def _opt_builder(make_opt, lib: str):
    def build():
        if lib == "fdl":
            from fdl.optim import apply_gradients
        else:
            import optax

            apply_updates = optax.apply_updates
        opt = make_opt()
        params = make_tree(0)
        grads = make_tree(1, 1e-2)
        state = opt.init(params)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, state, grads):
            if lib == "fdl":  # the step make_train_step takes (fused where the optimizer is)
                return apply_gradients(opt, grads, state, params)
            updates, state = opt.update(grads, state, params)
            return apply_updates(params, updates), state

        box = [params, state]

        def run():
            box[0], box[1] = step(box[0], box[1], grads)
            jax.block_until_ready(box)

        return run

    return build


def _copy_builder(n_state: int):
    """Read params, grads and ``n_state`` state trees, write params and state, with ``+``."""

    def build():
        params = make_tree(0)
        grads = make_tree(1, 1e-2)
        states = tuple(make_tree(2 + i, 1e-3) for i in range(n_state))
        add = functools.partial(jax.tree_util.tree_map, jnp.add)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, states, grads):
            return add(params, grads), tuple(add(s, grads) for s in states)

        box = [params, states]

        def run():
            box[0], box[1] = step(box[0], box[1], grads)
            jax.block_until_ready(box)

        return run

    return build


def _workload(title: str, fdl_opt, optax_opt, n_state: int, desc: str) -> Workload:
    traffic = (2 + n_state) + (1 + n_state)  # arrays read + arrays written, once each
    return Workload(
        name=f"optimizer update: {title} (25M params)",
        description=(
            f"{desc}. One jitted optimizer step on {N_PARAMS / 1e6:.1f} M float32 "
            f"parameters in {N_LEAVES} leaves shaped like ResNet-50's; params and optimizer "
            "state donated. fdl: `fdl.optim.apply_gradients` (the step `make_train_step` "
            "takes: the optimizer's fused one-pass step); `fdl (xla)`: the same with "
            "`fdl.config.optim_backend = 'xla'` (the arithmetic of `update` + `apply_updates` "
            "in XLA); optax: `update` + `optax.apply_updates`. The least memory traffic per "
            f"step, the GB/s column's bytes: {traffic} x params x 4 bytes (read params, grads, "
            f"{n_state} state tree(s) once; write params and state once). XLA's elementwise "
            "loops do not share reads between outputs: `x + y copy` (params + grads and each "
            "state tree + grads, one loop per output) reads the grads once per output; "
            "`x fastest` of the fdl rows is against optax."),
        impls={
            "fdl": _opt_builder(fdl_opt, "fdl"),
            "fdl (xla)": common.xla_kernels(_opt_builder(fdl_opt, "fdl")),
            "optax": _opt_builder(optax_opt, "optax"),
            "bound: x + y copy": _copy_builder(n_state),
        },
        bytes=float(traffic * N_PARAMS * 4),
        quick_steps=20,
        steps=30,
    )


def _fdl(name, **kw):
    def make():
        import fdl.optim as fo

        return getattr(fo, name)(**kw)

    return make


def _optax(name, **kw):
    def make():
        import optax

        return getattr(optax, name)(**kw)

    return make


WORKLOADS = [
    _workload("Adam", _fdl("adam", lr=1e-3), _optax("adam", learning_rate=1e-3), 2,
              "Adam (lr 1e-3, b1 0.9, b2 0.999, eps 1e-8)"),
    _workload("AdamW", _fdl("adamw", lr=1e-3, weight_decay=1e-2),
              _optax("adamw", learning_rate=1e-3, weight_decay=1e-2), 2,
              "AdamW (lr 1e-3, weight decay 1e-2 on every leaf)"),
    _workload("SGD-momentum", _fdl("sgd", lr=0.1, momentum=0.9),
              _optax("sgd", learning_rate=0.1, momentum=0.9), 1,
              "SGD with momentum 0.9 (PyTorch form), lr 0.1"),
]


if __name__ == "__main__":  # a quick standalone timing: interleaved medians and ratios
    import statistics
    import sys
    import time

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    for w in WORKLOADS:
        runs = {name: b() for name, b in w.impls.items()}
        for r in runs.values():
            r()
            r()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(steps):
            for name, r in runs.items():
                t0 = time.perf_counter()
                r()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        gbs = {k: w.bytes / (v * 1e-3) / 1e9 for k, v in med.items()}
        print(f"{w.name}: " + ", ".join(f"{k} {v:.2f} ms ({gbs[k]:.1f} GB/s)"
                                        for k, v in med.items())
              + f"; fdl/optax {med['fdl'] / med['optax']:.3f}", flush=True)
        del runs
