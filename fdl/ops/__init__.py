"""Box operations shared by the detection models: conversions, IoU, NMS, RoI pooling."""

from fdl.ops.boxes import (
    box_area,
    box_center_to_corner,
    box_corner_to_center,
    box_inter_union,
    box_iou,
    check_boxes,
    clip_boxes,
    generalized_box_iou,
    paired_box_iou,
    paired_generalized_box_iou,
)
from fdl.ops.nms import NMSResult, batched_nms, nms, nms_mask
from fdl.ops.roi import roi_align, roi_pool

__all__ = [
    "NMSResult", "batched_nms", "box_area", "box_center_to_corner", "box_corner_to_center",
    "box_inter_union", "box_iou", "check_boxes", "clip_boxes", "generalized_box_iou", "nms",
    "nms_mask", "paired_box_iou", "paired_generalized_box_iou", "roi_align", "roi_pool",
]
