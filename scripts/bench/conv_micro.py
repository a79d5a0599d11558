"""Per-layer convolution microbenchmark: XLA vs fdl's oneDNN lowering vs PyTorch, same run.

    python -m scripts.bench.conv_micro [--rounds 5] [--iters 10] [--only resnet|lenet]

For every ResNet-18-CIFAR (batch 32) and LeNet (batch 256) convolution, times the forward pass
and forward+backward (gradients w.r.t. input and kernel) of: ``lax.conv_general_dilated``
(``xla``), ``fdl.nn.conv_lowering.conv2d_nhwc`` with ``conv_backend="native"`` (``onednn``)
and ``torch.nn.functional.conv2d`` on channels_last tensors with 2 threads (``torch``).
Implementations are interleaved within each round (the machine is shared); the table reports the
median over rounds and the ratios ``onednn/xla`` and ``onednn/torch`` (< 1: oneDNN faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# name, batch, H, W, Cin, Cout, k, stride, pad
LAYERS = [
    ("resnet stem 3->64 3x3 32x32", 32, 32, 32, 3, 64, 3, 1, 1),
    ("resnet s1 64->64 3x3 32x32", 32, 32, 32, 64, 64, 3, 1, 1),
    ("resnet s2 64->128 3x3/2 32x32", 32, 32, 32, 64, 128, 3, 2, 1),
    ("resnet s2 128->128 3x3 16x16", 32, 16, 16, 128, 128, 3, 1, 1),
    ("resnet s2 short 64->128 1x1/2", 32, 32, 32, 64, 128, 1, 2, 0),
    ("resnet s3 128->256 3x3/2 16x16", 32, 16, 16, 128, 256, 3, 2, 1),
    ("resnet s3 256->256 3x3 8x8", 32, 8, 8, 256, 256, 3, 1, 1),
    ("resnet s3 short 128->256 1x1/2", 32, 16, 16, 128, 256, 1, 2, 0),
    ("resnet s4 256->512 3x3/2 8x8", 32, 8, 8, 256, 512, 3, 2, 1),
    ("resnet s4 512->512 3x3 4x4", 32, 4, 4, 512, 512, 3, 1, 1),
    ("resnet s4 short 256->512 1x1/2", 32, 8, 8, 256, 512, 1, 2, 0),
    ("lenet conv1 1->6 5x5 28x28", 256, 28, 28, 1, 6, 5, 1, 0),
    ("lenet conv2 6->16 5x5 12x12", 256, 12, 12, 6, 16, 5, 1, 0),
]


def _time(fn, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out) if not hasattr(out, "numel") else None
    return (time.perf_counter() - t) / iters


def _jax_fns(x, w, ct, stride, pad, backend):
    from fdl import config
    from fdl.nn.conv_lowering import conv2d_nhwc

    def conv(x, w):
        if backend == "xla":
            return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return conv2d_nhwc(x, w, (stride, stride), ((pad, pad), (pad, pad)))

    fwd = jax.jit(conv)
    fb = jax.jit(jax.grad(lambda x, w: jnp.vdot(conv(x, w), ct), (0, 1)))
    with config.override(conv_backend="native" if backend == "onednn" else backend):
        jax.block_until_ready(fwd(x, w))  # (traced here)
        jax.block_until_ready(fb(x, w))
    return (lambda: fwd(x, w)), (lambda: fb(x, w))


def _torch_fns(x, w, ct, stride, pad):
    import torch

    tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    tw = torch.tensor(np.asarray(w)).permute(3, 2, 0, 1).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    tct = torch.tensor(np.asarray(ct)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    F = torch.nn.functional

    def fwd():
        with torch.no_grad():
            return F.conv2d(tx, tw, stride=stride, padding=pad)

    def fb():
        tx.grad = tw.grad = None
        (F.conv2d(tx, tw, stride=stride, padding=pad) * tct).sum().backward()
        return tw.grad

    fwd()
    fb()
    return fwd, fb


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", default="")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    print("| layer | flop (fwd) | fwd xla | fwd onednn | fwd torch | fwd onednn/xla | "
          "fwd onednn/torch | f+b onednn/xla | f+b onednn/torch | f+b xla/torch |")
    print("|" + " --- |" * 10)
    for name, n, h, wd, cin, cout, k, s, pad in LAYERS:
        if args.only and args.only not in name:
            continue
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (n, h, wd, cin), jnp.float32)
        w = jax.random.normal(keys[1], (k, k, cin, cout), jnp.float32) * 0.1
        oh = (h + 2 * pad - k) // s + 1
        ct = jax.random.normal(keys[2], (n, oh, oh, cout), jnp.float32)
        impls = {
            "xla": _jax_fns(x, w, ct, s, pad, "xla"),
            "onednn": _jax_fns(x, w, ct, s, pad, "onednn"),
            "torch": _torch_fns(x, w, ct, s, pad),
        }
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for impl, fns in impls.items():
                for mode, fn in enumerate(fns):
                    times.setdefault((impl, mode), []).append(_time(fn, args.iters))
        med = {key: statistics.median(v) for key, v in times.items()}
        flop = 2 * n * oh * oh * cout * cin * k * k
        r = lambda a, b, m, med=med: med[(a, m)] / med[(b, m)]  # noqa: E731
        print(f"| {name} | {flop / 1e9:.2f} G | {med[('xla', 0)] * 1e3:.2f} ms | "
              f"{med[('onednn', 0)] * 1e3:.2f} ms | {med[('torch', 0)] * 1e3:.2f} ms | "
              f"{r('onednn', 'xla', 0):.2f} | {r('onednn', 'torch', 0):.2f} | "
              f"{r('onednn', 'xla', 1):.2f} | {r('onednn', 'torch', 1):.2f} | "
              f"{r('xla', 'torch', 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
