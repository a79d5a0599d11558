"""The book's detection code (d2l, PyTorch edition, ch. 14.4 and 14.7), restated in PyTorch:
the reference of fdl.models.detection's tests and the ``tinyssd`` / ``nms_5444`` benchmark rows.
Eager loops, the book's exact operations and order.

Differences from the book: ``multibox_target`` also accepts a list of per-image ground truth
without padding rows (fdl's padding rows take no part in the assignment), gives an image without
objects an all-background target and builds its targets in the anchors' dtype (so that float64
runs too); ``nms`` sorts stably (the book's ``argsort`` order of equal scores is unspecified).
"""

import torch
from torch import nn
from torch.nn import functional as F


def box_corner_to_center(boxes):
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), axis=-1)


def box_center_to_corner(boxes):
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), axis=-1)


def multibox_prior(h, w, sizes, ratios):
    num_sizes, num_ratios = len(sizes), len(ratios)
    per_pixel = num_sizes + num_ratios - 1
    size_t, ratio_t = torch.tensor(sizes), torch.tensor(ratios)
    center_h = (torch.arange(h) + 0.5) * (1.0 / h)
    center_w = (torch.arange(w) + 0.5) * (1.0 / w)
    shift_y, shift_x = torch.meshgrid(center_h, center_w, indexing="ij")
    shift_y, shift_x = shift_y.reshape(-1), shift_x.reshape(-1)
    aw = torch.cat((size_t * torch.sqrt(ratio_t[0]), sizes[0] * torch.sqrt(ratio_t[1:]))) * h / w
    ah = torch.cat((size_t / torch.sqrt(ratio_t[0]), sizes[0] / torch.sqrt(ratio_t[1:])))
    manip = torch.stack((-aw, -ah, aw, ah)).T.repeat(h * w, 1) / 2
    grid = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=1).repeat_interleave(per_pixel,
                                                                                     dim=0)
    return (grid + manip).unsqueeze(0)


def box_iou(boxes1, boxes2):
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    a1, a2 = area(boxes1), area(boxes2)
    ul = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    lr = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    inter = (lr - ul).clamp(min=0)
    inter_areas = inter[:, :, 0] * inter[:, :, 1]
    return inter_areas / (a1[:, None] + a2 - inter_areas)


def assign_anchor_to_bbox(ground_truth, anchors, iou_threshold=0.5):
    num_anchors, num_gt = anchors.shape[0], ground_truth.shape[0]
    jaccard = box_iou(anchors, ground_truth)
    amap = torch.full((num_anchors,), -1, dtype=torch.long)
    max_ious, indices = torch.max(jaccard, dim=1)
    anc_i = torch.nonzero(max_ious >= iou_threshold).reshape(-1)
    amap[anc_i] = indices[max_ious >= iou_threshold]
    col_discard = torch.full((num_anchors,), -1.0)
    row_discard = torch.full((num_gt,), -1.0)
    for _ in range(num_gt):
        max_idx = torch.argmax(jaccard)
        box_idx = (max_idx % num_gt).long()
        anc_idx = (max_idx / num_gt).long()
        amap[anc_idx] = box_idx
        jaccard[:, box_idx] = col_discard
        jaccard[anc_idx, :] = row_discard
    return amap


def offset_boxes(anchors, assigned_bb, eps=1e-6):
    c_anc = box_corner_to_center(anchors)
    c_bb = box_corner_to_center(assigned_bb)
    offset_xy = 10 * (c_bb[:, :2] - c_anc[:, :2]) / c_anc[:, 2:]
    offset_wh = 5 * torch.log(eps + c_bb[:, 2:] / c_anc[:, 2:])
    return torch.cat([offset_xy, offset_wh], axis=1)


def offset_inverse(anchors, offset_preds):
    anc = box_corner_to_center(anchors)
    xy = (offset_preds[:, :2] * anc[:, 2:] / 10) + anc[:, :2]
    wh = torch.exp(offset_preds[:, 2:] / 5) * anc[:, 2:]
    return box_center_to_corner(torch.cat((xy, wh), axis=1))


def multibox_target(anchors, labels_per_image):
    anchors = anchors.squeeze(0)
    num_anchors = anchors.shape[0]
    offsets, masks, classes = [], [], []
    for label in labels_per_image:
        if len(label):
            amap = assign_anchor_to_bbox(label[:, 1:], anchors)
        else:
            amap = torch.full((num_anchors,), -1, dtype=torch.long)
        mask = (amap >= 0).float().unsqueeze(-1).repeat(1, 4)
        class_labels = torch.zeros(num_anchors, dtype=torch.long)
        assigned = torch.zeros((num_anchors, 4), dtype=anchors.dtype)
        idx = torch.nonzero(amap >= 0)
        bb = amap[idx]
        if len(label):
            class_labels[idx] = label[bb, 0].long() + 1
            assigned[idx] = label[bb, 1:]
        offsets.append((offset_boxes(anchors, assigned) * mask).reshape(-1))
        masks.append(mask.reshape(-1))
        classes.append(class_labels)
    return torch.stack(offsets), torch.stack(masks), torch.stack(classes)


def all_anchors(size: int = 256):
    """TinySSD's anchors for a ``size`` x ``size`` input, ``(1, A, 4)`` (5,444 at 256)."""
    shapes, s = [], size // 8
    for _ in range(4):
        shapes.append(s)
        s //= 2
    shapes.append(1)
    return torch.cat([multibox_prior(h, h, SIZES[i], RATIOS[i]) for i, h in enumerate(shapes)],
                     dim=1)


def nms(boxes, scores, iou_threshold):
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        if order.numel() == 1:
            break
        iou = box_iou(boxes[i, :].reshape(-1, 4), boxes[order[1:], :].reshape(-1, 4)).reshape(-1)
        inds = torch.nonzero(iou <= iou_threshold).reshape(-1)
        order = order[inds + 1]
    return torch.tensor(keep, dtype=torch.long)


def nms_fast(boxes, scores, iou_threshold):
    """The same greedy NMS as :func:`nms`, written for speed in PyTorch: one pass over the
    score-sorted boxes; each box still alive is kept and suppresses every box whose IoU with
    it is above the threshold (one vectorised IoU row per kept box, no per-step copies).
    Returns the kept indices by score."""
    order = torch.argsort(scores, descending=True, stable=True)
    b = boxes[order]
    x0, y0, x1, y1 = b.unbind(1)
    areas = (x1 - x0) * (y1 - y0)
    alive = torch.ones(len(b), dtype=torch.bool)
    alive_np = alive.numpy()  # shares memory with ``alive``
    keep = []
    for i in range(len(b)):
        if alive_np[i]:
            keep.append(i)
            w = (torch.minimum(x1[i], x1) - torch.maximum(x0[i], x0)).clamp_(min=0)
            h = (torch.minimum(y1[i], y1) - torch.maximum(y0[i], y0)).clamp_(min=0)
            inter = w.mul_(h)
            alive.logical_and_(inter / (areas[i] + areas - inter) <= iou_threshold)
    return order[torch.tensor(keep, dtype=torch.long)]


def multibox_detection(cls_probs, offset_preds, anchors, nms_threshold=0.5,
                       pos_threshold=0.009999999):
    batch_size = cls_probs.shape[0]
    anchors = anchors.squeeze(0)
    num_anchors = cls_probs.shape[2]
    out = []
    for i in range(batch_size):
        cls_prob, offset_pred = cls_probs[i], offset_preds[i].reshape(-1, 4)
        conf, class_id = torch.max(cls_prob[1:], 0)
        predicted_bb = offset_inverse(anchors, offset_pred)
        keep = nms(predicted_bb, conf, nms_threshold)
        all_idx = torch.arange(num_anchors, dtype=torch.long)
        combined = torch.cat((keep, all_idx))
        uniques, counts = combined.unique(return_counts=True)
        non_keep = uniques[counts == 1]
        all_id_sorted = torch.cat((keep, non_keep))
        class_id[non_keep] = -1
        class_id = class_id[all_id_sorted]
        conf, predicted_bb = conf[all_id_sorted], predicted_bb[all_id_sorted]
        below = conf < pos_threshold
        class_id[below] = -1
        conf[below] = 1 - conf[below]
        out.append(torch.cat((class_id.unsqueeze(1), conf.unsqueeze(1), predicted_bb), dim=1))
    return torch.stack(out)


# ----------------------------------------------------------------------------- TinySSD


def cls_predictor(num_inputs, num_anchors, num_classes):
    return nn.Conv2d(num_inputs, num_anchors * (num_classes + 1), kernel_size=3, padding=1)


def bbox_predictor(num_inputs, num_anchors):
    return nn.Conv2d(num_inputs, num_anchors * 4, kernel_size=3, padding=1)


def flatten_pred(pred):
    return torch.flatten(pred.permute(0, 2, 3, 1), start_dim=1)


def concat_preds(preds):
    return torch.cat([flatten_pred(p) for p in preds], dim=1)


def down_sample_blk(in_channels, out_channels):
    blk = []
    for _ in range(2):
        blk += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_channels), nn.ReLU()]
        in_channels = out_channels
    blk.append(nn.MaxPool2d(2))
    return nn.Sequential(*blk)


def base_net():
    filters = [3, 16, 32, 64]
    return nn.Sequential(*[down_sample_blk(filters[i], filters[i + 1]) for i in range(3)])


def get_blk(i):
    if i == 0:
        return base_net()
    if i == 1:
        return down_sample_blk(64, 128)
    if i == 4:
        return nn.AdaptiveMaxPool2d((1, 1))
    return down_sample_blk(128, 128)


SIZES = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
RATIOS = [[1, 2, 0.5]] * 5


class TinySSD(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        in_channels = [64, 128, 128, 128, 128]
        a = len(SIZES[0]) + len(RATIOS[0]) - 1
        for i in range(5):
            setattr(self, f"blk_{i}", get_blk(i))
            setattr(self, f"cls_{i}", cls_predictor(in_channels[i], a, num_classes))
            setattr(self, f"bbox_{i}", bbox_predictor(in_channels[i], a))

    def forward(self, x):
        anchors, cls_preds, bbox_preds = [], [], []
        for i in range(5):
            x = getattr(self, f"blk_{i}")(x)
            anchors.append(multibox_prior(x.shape[2], x.shape[3], SIZES[i], RATIOS[i]))
            cls_preds.append(getattr(self, f"cls_{i}")(x))
            bbox_preds.append(getattr(self, f"bbox_{i}")(x))
        cls_preds = concat_preds(cls_preds)
        cls_preds = cls_preds.reshape(cls_preds.shape[0], -1, self.num_classes + 1)
        return torch.cat(anchors, dim=1), cls_preds, concat_preds(bbox_preds)


def calc_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, bbox_masks):
    batch_size, num_classes = cls_preds.shape[0], cls_preds.shape[2]
    cls = F.cross_entropy(cls_preds.reshape(-1, num_classes), cls_labels.reshape(-1),
                          reduction="none").reshape(batch_size, -1).mean(dim=1)
    bbox = F.l1_loss(bbox_preds * bbox_masks, bbox_labels * bbox_masks,
                     reduction="none").mean(dim=1)
    return cls + bbox
