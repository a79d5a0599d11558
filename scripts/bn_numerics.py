"""BatchNorm gradient accuracy in float32 train mode: fdl and PyTorch against a float64 truth.

ResNet-50 (torchvision layout, random weights, BatchNorm affine params and running statistics
randomised), a batch of images, cross-entropy with random labels. For every BatchNorm
param, the relative error ``||g32 - g64|| / ||g64||`` of its float32 gradient against fdl's
float64 gradient (which equals PyTorch's float64 gradient to ~1e-12); summary over all
BatchNorm params and the one the issue quotes (``layer1.2.bn3.bias``).

    python -m scripts.bn_numerics [--batch 4] [--size 112] [--input uniform|normal] [--no-torch]

``--single`` instead measures one BatchNorm layer whose channels have mean/std 0 ... 100 (the
library's formula, the one-pass ``E[x^2] - E[x]^2`` and PyTorch). ``--ab resnet18|lenet`` times
a training step with the library's formula against the one-pass formula, interleaved in one
process (paired rounds; the ratio is what to read on a shared machine).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)


def fdl_grads(params, state, x, y, dtype):
    from fdl.models import vision
    from fdl.nn.losses import softmax_cross_entropy

    model = vision.resnet50(1000)
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)  # noqa: E731

    @jax.jit
    def grad(p, s, x):
        def loss(p):
            logits, _ = model.apply(p, s, x, train=True)
            return jnp.mean(softmax_cross_entropy(logits, y))
        return jax.grad(loss)(p)

    return jax.tree.map(np.asarray, grad(cast(params), cast(state), jnp.asarray(x, dtype)))


def torch_grads(sd, x, y):
    import torch

    sys.path.insert(0, ".")
    from tests.interop.torchvision_reference import build

    m = build("resnet50")
    m.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in sd.items()})
    m.train()
    xt = torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2)
    loss = torch.nn.functional.cross_entropy(m(xt), torch.tensor(np.asarray(y)))
    loss.backward()
    return {k: p.grad.numpy() for k, p in m.named_parameters()}


def _one_pass(x, axes, axis_name):
    """The formula fdl used before (kept here only as the baseline of the measurements)."""
    from jax import lax

    mean, msq = jnp.mean(x, axis=axes), jnp.mean(lax.square(x), axis=axes)
    if axis_name is not None:
        mean, msq = lax.pmean((mean, msq), axis_name)
    return mean, jnp.maximum(msq - lax.square(mean), 0.0)


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _single_ratio(ratio: float, rng) -> str:
    import fdl.nn.norm as norm

    x = rng.normal(ratio, 1.0, size=(32, 16, 16, 8))
    cot = rng.normal(size=x.shape)
    p = {"scale": rng.uniform(0.5, 1.5, 8), "offset": rng.normal(size=8)}
    layer = norm.batch_norm()
    st = {"mean": jnp.zeros(8), "var": jnp.ones(8)}
    library = norm._moments

    def grads(dtype, moments):
        def f(pp, xx):
            return jnp.sum(layer.apply(pp, st, xx, train=True)[0] * jnp.asarray(cot, dtype))

        norm._moments = moments
        try:
            pp = jax.tree.map(lambda a: jnp.asarray(a, dtype), p)
            return jax.jit(jax.grad(f, argnums=(0, 1)))(pp, jnp.asarray(x, dtype))
        finally:
            norm._moments = library

    ref_p, ref_x = grads(jnp.float64, library)
    line = f"mean/std {ratio:5.0f}:"
    for name, mom in (("fdl", library), ("one-pass", _one_pass)):
        gp, gx = grads(jnp.float32, mom)
        line += f"  {name} dx {_rel(gx, ref_x):.1e} dscale {_rel(gp['scale'], ref_p['scale']):.1e}"
    try:
        import torch
    except ImportError:
        return line
    xt = torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2).requires_grad_()
    sc = torch.tensor(p["scale"], dtype=torch.float32, requires_grad=True)
    of = torch.tensor(p["offset"], dtype=torch.float32, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, None, None, sc, of, training=True, eps=1e-5)
    (y * torch.tensor(cot, dtype=torch.float32).permute(0, 3, 1, 2)).sum().backward()
    return line + (f"  torch dx {_rel(xt.grad.permute(0, 2, 3, 1).numpy(), ref_x):.1e} "
                   f"dscale {_rel(sc.grad.numpy(), ref_p['scale']):.1e}")


def single_layer() -> None:
    rng = np.random.default_rng(0)
    for ratio in (0.0, 3.0, 10.0, 30.0, 100.0):
        print(_single_ratio(ratio, rng))


def ab_timing(which: str, steps: int, rounds: int) -> None:
    import time

    import fdl.nn.norm as norm
    from fdl import optim
    from fdl.models import vision
    from fdl.nn.losses import softmax_cross_entropy

    jax.config.update("jax_enable_x64", False)
    if which == "resnet18":
        model, shape = vision.resnet18(10, small_input=True), (32, 32, 32, 3)
    else:
        model = vision.lenet5(batch_norm=True, activation="relu", pool="max")
        shape = (256, 28, 28, 1)
    opt = optim.sgd(0.05, momentum=0.9)
    params, state = model.init_params(jax.random.key(0), shape)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, shape[0]))
    library = norm._moments
    steps_by = {}
    for name, moments in (("fdl", library), ("one-pass", _one_pass)):
        norm._moments = moments

        @jax.jit
        def step(p, s, o):
            def loss(p):
                out, ns = model.apply(p, s, x, train=True)
                return jnp.mean(softmax_cross_entropy(out, y)), ns
            (_, ns), g = jax.value_and_grad(loss, has_aux=True)(p)
            u, o = opt.update(g, o, p)
            return optim.apply_updates(p, u), ns, o

        o = opt.init(params)
        jax.block_until_ready(step(params, state, o))  # compiled with this formula
        steps_by[name] = (step, o)
    norm._moments = library
    times = {k: [] for k in steps_by}
    for r in range(rounds):
        for name in (list(steps_by) if r % 2 == 0 else list(steps_by)[::-1]):
            step, o = steps_by[name]
            t = time.perf_counter()
            out = None
            for _ in range(steps):
                out = step(params, state, o)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t) / steps)
    a, b = np.array(times["fdl"]), np.array(times["one-pass"])
    print(f"{which}: fdl (two-pass) median {np.median(a) * 1e3:.1f} ms, one-pass "
          f"{np.median(b) * 1e3:.1f} ms per step; paired ratio fdl/one-pass: median "
          f"{np.median(a / b):.3f} (rounds {rounds} x {steps} steps; per-round "
          f"{', '.join(f'{v:.3f}' for v in a / b)})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--input", choices=("normal", "uniform"), default="uniform",
                    help="images N(0, 1) (normalised) or U(0, 1) (raw pixel values)")
    ap.add_argument("--single", action="store_true", help="one BatchNorm layer, mean/std sweep")
    ap.add_argument("--ab", choices=("resnet18", "lenet"), help="time a training step A/B")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    if args.single:
        return single_layer()
    if args.ab:
        return ab_timing(args.ab, args.steps, args.rounds)

    from fdl.interop.torchvision import from_torchvision, to_torchvision, torchvision_key_map
    from fdl.models import vision

    model = vision.resnet50(1000)
    params, state = model.init_params(jax.random.key(args.seed), (1, args.size, args.size, 3))
    rng = np.random.default_rng(args.seed)
    sd = to_torchvision("resnet50", params, state)
    for k in sd:  # randomise BatchNorm as the interop tests do
        if k.endswith("running_var") or (k.endswith(".weight") and sd[k].ndim == 1
                                         and not k.startswith("fc")):
            sd[k] = rng.uniform(0.5, 1.5, sd[k].shape).astype(np.float32)
        elif k.endswith("running_mean") or (k.endswith(".bias") and not k.startswith("fc")):
            sd[k] = (rng.normal(size=sd[k].shape) * 0.1).astype(np.float32)
    _, params, state = from_torchvision("resnet50", sd)
    shape = (args.batch, args.size, args.size, 3)
    x = (rng.normal(size=shape) if args.input == "normal" else rng.uniform(size=shape))
    x = x.astype(np.float32)
    y = rng.integers(0, 1000, size=args.batch)

    g64 = fdl_grads(params, state, x, y, jnp.float64)
    g32 = fdl_grads(params, state, x, y, jnp.float32)
    keymap = {p[len("params/"):]: k for p, k in torchvision_key_map("resnet50", model).items()
              if p.startswith("params/")}
    from fdl.tree import flatten_dict

    f64, f32 = flatten_dict(g64), flatten_dict(g32)
    gt = None if args.no_torch else torch_grads(sd, x, y)
    rows = []
    for path, tkey in keymap.items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf not in ("scale", "offset"):
            continue
        ref = f64[path]
        norm = np.linalg.norm(ref)
        e_fdl = np.linalg.norm(f32[path] - ref) / norm
        e_t = None if gt is None else np.linalg.norm(gt[tkey] - ref) / norm
        rows.append((tkey, e_fdl, e_t))
    fdl_err = np.array([r[1] for r in rows])
    print(f"BatchNorm params: {len(rows)}  batch {args.batch}  size {args.size}  "
          f"input {args.input}")
    print(f"fdl float32 rel. error: median {np.median(fdl_err):.3g}  mean {fdl_err.mean():.3g}  "
          f"max {fdl_err.max():.3g}")
    if gt is not None:
        t_err = np.array([r[2] for r in rows])
        print(f"torch float32 rel. error: median {np.median(t_err):.3g}  mean {t_err.mean():.3g}  "
              f"max {t_err.max():.3g}")
        print(f"fdl / torch (median of per-param ratios): {np.median(fdl_err / t_err):.3g}")
    for tkey, e_fdl, e_t in rows:
        if tkey in ("layer1.2.bn3.bias", "bn1.bias", "layer1.0.bn1.weight"):
            print(f"  {tkey}: fdl {e_fdl:.3g}" + ("" if e_t is None else f"  torch {e_t:.3g}"))


if __name__ == "__main__":
    main()
