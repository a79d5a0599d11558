"""Object detection (d2l ch. 14): anchors and targets, TinySSD, R-CNN heads, YOLO, mAP.

Box operations (IoU, NMS, RoI pooling) live in :mod:`fdl.ops`; data readers and the synthetic
banana-style generator in :mod:`fdl.data.detection`.
"""

from fdl.models.detection.anchors import (
    assign_anchor_to_bbox,
    check_targets,
    multibox_detection,
    multibox_prior,
    multibox_target,
    num_anchors_per_pixel,
    offset_boxes,
    offset_inverse,
)
from fdl.models.detection.draw import draw_boxes, save_detection_grid
from fdl.models.detection.evaluate import coco_map, pairwise_iou, voc_ap, voc_map
from fdl.models.detection.ssd import (
    RATIOS,
    SIZES,
    base_net,
    detections_to_list,
    down_sample_blk,
    focal_loss,
    make_ssd_loss,
    ssd_detect,
    ssd_loss,
    ssd_metrics,
    tiny_ssd,
)

__all__ = [
    "RATIOS", "SIZES", "assign_anchor_to_bbox", "base_net", "check_targets", "coco_map",
    "draw_boxes", "pairwise_iou", "save_detection_grid", "voc_ap", "voc_map",
    "detections_to_list", "down_sample_blk", "focal_loss", "make_ssd_loss",
    "multibox_detection", "multibox_prior", "multibox_target", "num_anchors_per_pixel",
    "offset_boxes", "offset_inverse", "ssd_detect", "ssd_loss", "ssd_metrics", "tiny_ssd",
]
