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
from fdl.models.detection.rcnn import (
    check_ground_truth,
    decode_boxes,
    encode_boxes,
    fast_rcnn_loss,
    faster_rcnn,
    faster_rcnn_loss,
    grid_anchors,
    match_boxes,
    postprocess_detections,
    resnet_trunk,
    roi_box_head,
    rpn_head,
    rpn_loss,
    rpn_proposals,
    rpn_targets,
    sample_balanced,
    sample_rois,
    to_pixels,
)
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
from fdl.models.detection.yolo import (
    yolo,
    yolo_decode,
    yolo_detect,
    yolo_head,
    yolo_loss,
    yolo_targets,
)

__all__ = [
    "RATIOS", "SIZES", "assign_anchor_to_bbox", "base_net", "check_targets", "coco_map",
    "draw_boxes", "pairwise_iou", "save_detection_grid", "voc_ap", "voc_map",
    "detections_to_list", "down_sample_blk", "focal_loss", "make_ssd_loss",
    "multibox_detection", "multibox_prior", "multibox_target", "num_anchors_per_pixel",
    "offset_boxes", "offset_inverse", "ssd_detect", "ssd_loss", "ssd_metrics", "tiny_ssd",
]
__all__ += [  # two-stage (Faster R-CNN)
    "check_ground_truth", "decode_boxes", "encode_boxes", "fast_rcnn_loss", "faster_rcnn",
    "faster_rcnn_loss", "grid_anchors", "match_boxes", "postprocess_detections",
    "resnet_trunk", "roi_box_head", "rpn_head", "rpn_loss", "rpn_proposals", "rpn_targets",
    "sample_balanced", "sample_rois", "to_pixels",
]
__all__ += ["yolo", "yolo_decode", "yolo_detect", "yolo_head", "yolo_loss", "yolo_targets"]
