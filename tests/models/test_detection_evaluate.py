"""mAP: COCO against pycocotools' numbers (recorded in ``detection_map_golden.json``), VOC on
hand-computed cases (11-point and area), difficult objects, duplicates, bad input; drawing."""

import json
import os

import numpy as np
import pytest

from fdl.models import detection as D

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detection_map_golden.json")


def test_coco_map_equals_pycocotools():
    with open(GOLDEN) as fh:
        cases = json.load(fh)["cases"]
    for c in cases:
        dets = [np.asarray(d, np.float64).reshape(-1, 6) for d in c["detections"]]
        gts = [np.asarray(g, np.float64).reshape(-1, 5) for g in c["ground_truth"]]
        r = D.coco_map(dets, gts, num_classes=c["num_classes"])
        np.testing.assert_allclose([r["map"], r["map50"], r["map75"]], c["coco_stats"],
                                   rtol=1e-9, atol=1e-12)


def _gt(*rows_per_image, m=3):
    out = np.full((len(rows_per_image), m, 5), -1.0)
    for i, rows in enumerate(rows_per_image):
        out[i, :len(rows)] = rows
    return out


def test_perfect_detections_score_one():
    gt = _gt([[0, 0.1, 0.1, 0.4, 0.4], [1, 0.5, 0.5, 0.9, 0.8]], [[1, 0.2, 0.3, 0.6, 0.7]])
    dets = [np.array([[g[0], 0.9, *g[1:]] for g in img if g[0] >= 0]) for img in gt]
    for method in ("area", "11point"):
        assert D.voc_map(dets, gt, method=method)["map"] == pytest.approx(1.0)
    assert D.coco_map(dets, gt)["map"] == pytest.approx(1.0)


def test_voc_hand_computed():
    gt = _gt([[0, 0.0, 0.0, 0.5, 0.5]], [[0, 0.5, 0.5, 1.0, 1.0]])
    dets = [np.array([[0, 0.9, 0.0, 0.0, 0.5, 0.5],     # TP
                      [0, 0.8, 0.5, 0.0, 1.0, 0.5]]),   # FP (no overlap)
            np.array([[0, 0.7, 0.52, 0.5, 1.0, 1.0]])]   # TP (IoU 0.96)
    # recall [.5, .5, 1], precision [1, .5, 2/3]
    assert D.voc_map(dets, gt, method="area")["map"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert D.voc_map(dets, gt, method="11point")["map"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert D.voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_voc_duplicates_difficult_and_threshold():
    gt = _gt([[0, 0.0, 0.0, 0.5, 0.5], [0, 0.6, 0.6, 0.9, 0.9]])
    difficult = np.array([[False, True, False]])
    dets = [np.array([[0, 0.9, 0.0, 0.0, 0.5, 0.5],    # TP
                      [0, 0.8, 0.0, 0.0, 0.5, 0.5],    # duplicate: FP
                      [0, 0.7, 0.6, 0.6, 0.9, 0.9]])]  # on the difficult box: ignored
    r = D.voc_map(dets, gt, difficult=difficult)
    assert r["npos"][0] == 1
    assert r["map"] == pytest.approx(1.0)  # precision 1 at recall 1 comes first
    r = D.voc_map(dets, gt)  # without the flag the third detection is a TP
    assert r["npos"][0] == 2 and r["map"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # IoU exactly at the threshold is not a match (the devkit's ``>``)
    half = [np.array([[0, 0.9, 0.0, 0.0, 0.5, 0.25]])]  # IoU 0.5 with the first box
    assert D.voc_map(half, _gt([[0, 0.0, 0.0, 0.5, 0.5]]))["map"] == 0.0


def test_coco_partial_iou():
    gt = _gt([[0, 0.0, 0.0, 1.0, 1.0]])
    det = [np.array([[0, 0.9, 0.0, 0.0, 1.0, 0.72]])]  # IoU 0.72: thresholds .50-.70 match
    r = D.coco_map(det, gt)
    assert r["map"] == pytest.approx(0.5) and r["map50"] == 1.0 and r["map75"] == 0.0


def test_bad_input():
    gt = _gt([[0, 0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        D.voc_map([np.array([[0, np.nan, 0, 0, 1, 1]])], gt)
    with pytest.raises(ValueError, match="images"):
        D.voc_map([np.zeros((0, 6)), np.zeros((0, 6))], gt)
    with pytest.raises(ValueError, match="method"):
        D.voc_ap([1.0], [1.0], method="101")


def test_draw_and_save_grid(tmp_path):
    img = np.zeros((32, 40, 3), np.float32)
    dets = np.array([[0, 0.95, 0.1, 0.1, 0.5, 0.5], [1, 0.2, 0.5, 0.5, 0.9, 0.9]])
    out = D.draw_boxes(img, dets, score_threshold=0.5)
    assert out.dtype == np.uint8 and out.shape == (32, 40, 3)
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert (255, 64, 64) in colours  # class 0 (score 0.95) is drawn
    assert (64, 160, 255) not in colours  # class 1 (score 0.2) is below the threshold
    out = D.draw_boxes(img, ground_truth=[[0, 0.0, 0.0, 1.0, 1.0]])
    assert (out[0] == 255).all()  # ground truth in white
    path = D.save_detection_grid(str(tmp_path / "sub" / "grid.png"), [img, img, img],
                                 [dets, dets, dets], columns=2)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (80, 64)
    assert not [p for p in os.listdir(tmp_path / "sub") if p.startswith(".tmp")]
