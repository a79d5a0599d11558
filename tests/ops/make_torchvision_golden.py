"""Record ``torchvision.ops`` outputs on fixed random inputs into ``torchvision_golden.npz``.

torchvision does not import beside the project's torch 2.13.0+cpu (its PyPI wheels are CUDA
builds: "operator torchvision::nms does not exist"), so the tests compare against outputs
recorded once in a separate environment where it works, e.g.::

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvenv/bin/python tests/ops/make_torchvision_golden.py

The file stores the inputs next to the outputs, and the torch/torchvision versions.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torchvision
from torchvision import ops

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_golden.npz")


def random_boxes(rng, n, scale=100.0, min_size=1.0, max_size=40.0):
    xy = rng.uniform(0, scale, (n, 2))
    wh = rng.uniform(min_size, max_size, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(20261202)
    g: dict[str, np.ndarray] = {}
    t = torch.from_numpy

    a, b = random_boxes(rng, 40), random_boxes(rng, 30)
    g["iou_a"], g["iou_b"] = a, b
    g["iou_out"] = ops.box_iou(t(a), t(b)).numpy()
    g["giou_out"] = ops.generalized_box_iou(t(a), t(b)).numpy()

    nms_cases = [(200, 0.5, False), (200, 0.3, True), (200, 0.7, False), (500, 0.45, True),
                 (1500, 0.5, False)]
    for i, (n, thr, ties) in enumerate(nms_cases):
        boxes = random_boxes(rng, n)
        scores = rng.uniform(0, 1, n).astype(np.float32)
        if ties:
            scores = (np.round(scores * 8) / 8).astype(np.float32)
        g[f"nms{i}_boxes"], g[f"nms{i}_scores"] = boxes, scores
        g[f"nms{i}_thr"] = np.float64(thr)
        g[f"nms{i}_keep"] = ops.nms(t(boxes), t(scores), thr).numpy()
        classes = rng.integers(0, 5, n)
        g[f"nms{i}_classes"] = classes
        g[f"nms{i}_batched_keep"] = ops.batched_nms(t(boxes), t(scores), t(classes), thr).numpy()

    feats = rng.normal(size=(2, 3, 13, 17)).astype(np.float32)  # NCHW as torchvision wants
    k = 48
    xy = rng.uniform(-4, 32, (k, 2))
    wh = rng.uniform(0.3, 22, (k, 2))
    rois = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    bidx = rng.integers(0, 2, k)
    r5 = t(np.concatenate([bidx[:, None], rois], 1).astype(np.float32))
    g["roi_features"] = feats.transpose(0, 2, 3, 1).copy()  # stored NHWC
    g["roi_boxes"], g["roi_indices"] = rois, bidx
    for aligned in (False, True):
        for sr in (-1, 2):
            for size in ((7, 7), (3, 5)):
                key = f"align_{int(aligned)}_{sr}_{size[0]}x{size[1]}"
                out = ops.roi_align(t(feats), r5, size, spatial_scale=0.5, sampling_ratio=sr,
                                    aligned=aligned)
                g[key] = out.numpy().transpose(0, 2, 3, 1)
    for size in ((7, 7), (3, 5), (2, 2)):
        out = ops.roi_pool(t(feats), r5, size, spatial_scale=0.5)
        g[f"pool_{size[0]}x{size[1]}"] = out.numpy().transpose(0, 2, 3, 1)
    # Faster R-CNN pieces: BoxCoder, Matcher, AnchorGenerator
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    props, gts = random_boxes(rng, 60), random_boxes(rng, 60)
    g["coder_proposals"], g["coder_gt"] = props, gts
    coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    g["coder_encoded"] = coder.encode_single(t(gts), t(props)).numpy()
    deltas = rng.normal(0, 1.5, (60, 4)).astype(np.float32)
    deltas[:3, 2:] = 9.0  # beyond the log(1000/16) clamp
    g["coder_deltas"] = deltas
    g["coder_decoded"] = coder.decode_single(t(deltas), t(props)).numpy()
    iou = ops.box_iou(t(random_boxes(rng, 7)), t(random_boxes(rng, 90)))
    g["matcher_iou"] = iou.numpy()
    for low_q in (False, True):
        m = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=low_q)
        g[f"matcher_{int(low_q)}"] = m(iou).numpy()
    ag = AnchorGenerator(sizes=((32, 64, 128),), aspect_ratios=((0.5, 1.0, 2.0),))
    images = ImageList(torch.zeros(1, 3, 96, 128), [(96, 128)])
    g["anchors_6x8_stride16"] = ag(images, [torch.zeros(1, 4, 6, 8)])[0].numpy()
    # RPN proposal filtering and the RoI head's postprocessing (eval mode) on random outputs
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    anchors = ag(images, [torch.zeros(1, 4, 6, 8)])[0]
    n_a = anchors.shape[0]
    logits = rng.normal(0, 2, (2, n_a)).astype(np.float32)
    rdeltas = rng.normal(0, 0.3, (2, n_a, 4)).astype(np.float32)
    g["rpn_logits"], g["rpn_deltas"] = logits, rdeltas
    rpn = RegionProposalNetwork(ag, None, 0.7, 0.3, 256, 0.5, {"training": 100, "testing": 100},
                                {"training": 40, "testing": 40}, 0.7).eval()
    decoded = rpn.box_coder.decode(t(rdeltas).reshape(-1, 4), [anchors, anchors]).view(2, -1, 4)
    boxes, _ = rpn.filter_proposals(decoded, t(logits).reshape(-1, 1), [(96, 128)] * 2, [n_a])
    g["rpn_count"] = np.array([len(b) for b in boxes])
    g["rpn_boxes"] = np.stack([np.pad(b.numpy(), ((0, 40 - len(b)), (0, 0))) for b in boxes])
    rois = np.stack([random_boxes(rng, 30, scale=90.0) for _ in range(2)])
    cls_logits = rng.normal(0, 2, (2, 30, 4)).astype(np.float32)
    box_deltas = rng.normal(0, 1, (2, 30, 16)).astype(np.float32)
    g["post_rois"], g["post_logits"], g["post_deltas"] = rois, cls_logits, box_deltas
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 20).eval()
    b, sc, lb = heads.postprocess_detections(t(cls_logits).reshape(60, 4),
                                             t(box_deltas).reshape(60, 16),
                                             [t(rois[0]), t(rois[1])], [(96, 128)] * 2)
    rows = [np.concatenate([(lab.numpy()[:, None] - 1).astype(np.float32), s.numpy()[:, None],
                            bb.numpy()], 1) for bb, s, lab in zip(b, sc, lb, strict=True)]
    g["post_count"] = np.array([len(r) for r in rows])
    g["post_rows"] = np.stack([np.pad(r, ((0, 20 - len(r)), (0, 0)), constant_values=-1)
                               for r in rows])
    g["versions"] = np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    np.savez_compressed(OUT, **g)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes) with {g['versions']}")


if __name__ == "__main__":
    main()
