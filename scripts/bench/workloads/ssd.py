"""TinySSD training step and NMS over its 5,444 anchors (d2l ch. 14.7).

``tinyssd``: the book's TinySSD (base net 16/32/64, three 128-channel down-sampling blocks, a
global max-pool; 3x3 class and box predictors at five scales, 4 anchors per pixel), one class,
input 3x256x256, batch 32, float32, SGD lr 0.2 weight decay 5e-4, BatchNorm in training mode;
loss = per-image mean cross-entropy over anchors + mean masked L1 over offsets, the targets
(multibox_target: the book's greedy assignment) computed from one ground-truth box per image.
fdl computes the targets inside its compiled step. PyTorch eager runs the book's code as
written (targets by the book's per-image Python loop inside the step); the "targets
precomputed" rows compute them once outside the timed step (the network and loss only: a lower
bound for any PyTorch implementation), eager and under ``torch.compile``.

``nms_5444``: non-maximum suppression (IoU 0.5) of the 5,444 TinySSD anchors moved by random
offsets, random scores (733 kept); fdl's jitted fixed-size NMS keeping every box (the book's
``multibox_detection`` needs all of them) and with ``max_outputs=100`` (the cost of the
fixed-size choice is the difference), against a PyTorch greedy NMS (one pass, a vectorised
IoU row per kept box; the book's NMS loop, which re-indexes the remaining boxes at every step,
took 1.7-20 s a call here: too slow to time). torchvision cannot be imported beside torch
2.13.0+cpu; ``scripts/bench/nms_torchvision.py`` measures torchvision's ``nms`` against fdl
in one process where it can.
"""

from __future__ import annotations

import numpy as np

from scripts.bench.api import Workload

_PENDING = None
try:
    from fdl.models import detection as _det

    _det.tiny_ssd, _det.ssd_loss  # noqa: B018
except Exception as e:  # noqa: BLE001
    _PENDING = f"`fdl.models.detection` is missing ({type(e).__name__}: {e})"

H = dict(batch=32, size=256, lr=0.2, wd=5e-4, classes=1)


def batch(seed: int = 0):
    """``(images (N, 256, 256, 3) float32, targets (N, 1, 5) float32)``: random images, one
    random box per image (class 0, normalised corners)."""
    rng = np.random.default_rng(seed)
    n, s = H["batch"], H["size"]
    x = rng.uniform(0, 1, (n, s, s, 3)).astype(np.float32)
    xy = rng.uniform(0.05, 0.6, (n, 2))
    wh = rng.uniform(0.1, 0.35, (n, 2))
    y = np.concatenate([np.zeros((n, 1)), xy, xy + wh], 1)[:, None].astype(np.float32)
    return x, y


def tinyssd_flops() -> float:
    """Analytic dense FLOPs of one training step (3x the forward's convolutions, every 3x3
    tap counted, also the zero-padding ones)."""
    a, c = 4, H["classes"] + 1
    convs = []  # (out_hw, cin, cout)
    hw, cin = H["size"], 3
    for cout in (16, 32, 64, 128, 128, 128):
        convs += [(hw, cin, cout), (hw, cout, cout)]
        hw //= 2
        cin = cout
        if cout in (64, 128):  # predictors after blocks 0..3 (the base net ends at 64)
            convs += [(hw, cout, a * c), (hw, cout, a * 4)]
    convs += [(1, 128, a * c), (1, 128, a * 4)]  # after the global max-pool
    return 3.0 * H["batch"] * sum(2 * o * o * 9 * i * k for o, i, k in convs)


def _fdl():
    import jax
    import jax.numpy as jnp

    from fdl import optim, train

    x, y = batch()
    net = _det.tiny_ssd(H["classes"])
    params, state = jax.jit(net.init_params, static_argnums=1)(jax.random.key(0), x.shape)
    opt = optim.sgd(H["lr"], weight_decay=H["wd"])
    step_fn = train.make_train_step(net, opt, _det.ssd_loss)
    data = (jnp.asarray(x), jnp.asarray(y))
    carry = [params, state, opt.init(params)]
    key = jax.random.key(1)

    def step():
        p, s, o, m = step_fn(*carry, data, key)
        carry[:] = [p, s, o]
        return jax.block_until_ready(m["loss"])

    return step


def _torch_ref(precompute: bool, compile_model: bool = False):
    import torch

    from scripts.bench.references import tinyssd_torch as ref

    torch.manual_seed(0)
    x, y = batch()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    labels = [torch.from_numpy(r) for r in y]
    model = ref.TinySSD(H["classes"])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=H["lr"], weight_decay=H["wd"])
    fwd = torch.compile(model) if compile_model else model
    targets = None
    if precompute:
        with torch.no_grad():
            anchors = ref.all_anchors(H["size"])
            targets = ref.multibox_target(anchors, labels)

    def step():
        opt.zero_grad(set_to_none=True)
        anchors, cls_preds, bbox_preds = fwd(xt)
        t = targets if precompute else ref.multibox_target(anchors, labels)
        bbox_labels, bbox_masks, cls_labels = t
        loss = ref.calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _nms_inputs(seed: int = 0):
    from fdl.models.detection import RATIOS, SIZES, multibox_prior

    shapes = [(32, 32), (16, 16), (8, 8), (4, 4), (1, 1)]
    anchors = np.concatenate([np.asarray(multibox_prior(s, SIZES[i], RATIOS[i]))
                              for i, s in enumerate(shapes)])
    rng = np.random.default_rng(seed)
    boxes = anchors + rng.normal(0, 0.02, anchors.shape).astype(np.float32)
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                            np.maximum(boxes[:, :2], boxes[:, 2:])], 1).astype(np.float32)
    scores = rng.uniform(0, 1, len(boxes)).astype(np.float32)
    return boxes, scores


def _fdl_nms(max_outputs=None):
    def build():
        import jax

        from fdl import ops

        boxes, scores = map(jax.numpy.asarray, _nms_inputs())
        fn = jax.jit(lambda b, s: ops.nms(b, s, 0.5, max_outputs=max_outputs))

        def step():
            return jax.block_until_ready(fn(boxes, scores))

        return step

    return build


def _torch_nms():
    import torch

    from scripts.bench.references import tinyssd_torch as ref

    boxes, scores = (torch.from_numpy(a) for a in _nms_inputs())

    def step():
        return ref.nms_fast(boxes, scores, 0.5)

    return step


_ssd_impls = {} if _PENDING else {"fdl": _fdl}
_ssd_impls.update({
    "PyTorch eager (the book's step)": lambda: _torch_ref(False),
    "PyTorch eager (targets precomputed)": lambda: _torch_ref(True),
    "torch.compile (targets precomputed)": lambda: _torch_ref(True, True),
})
_nms_impls = {} if _PENDING else {"fdl": _fdl_nms(None), "fdl (max_outputs=100)": _fdl_nms(100)}
_nms_impls["PyTorch (greedy pass, vectorised IoU rows)"] = _torch_nms

WORKLOADS = [
    Workload(
        name="tinyssd",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        impls=_ssd_impls,
        flops=tinyssd_flops(),
        pending=_PENDING,
        quick_steps=20,
        steps=20,
        flops_note="analytic dense count of the convolutions (every 3x3 tap, zero padding "
                   "included) x3 for the backward",
    ),
    Workload(
        name="nms_5444",
        description=__doc__.split("\n\n")[2].replace("\n", " "),
        impls=_nms_impls,
        pending=_PENDING,
        quick_steps=20,
        steps=30,
    ),
]
