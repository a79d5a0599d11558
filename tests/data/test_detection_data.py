"""Detection data: the banana-style generator and reader round trip, the VOC reader, padding,
and every refusal of bad annotations (never a silently wrong target)."""

import os

import numpy as np
import pytest

from fdl.data import DatasetError, DatasetNotFoundError
from fdl.data import detection as dd

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("bananas")
    path = dd.generate_banana_dataset(str(root / "train"), 6, image_size=64, num_classes=3,
                                      max_objects=3, seed=5)
    return path


def test_generated_set_round_trips(generated):
    ds = dd.read_banana_dataset(generated, num_classes=3)
    assert ds.images.shape == (6, 64, 64, 3) and ds.images.dtype == np.float32
    assert 0 <= ds.images.min() and ds.images.max() <= 1
    t = ds.targets
    assert t.shape[0] == 6 and 1 <= t.shape[1] <= 3 and t.shape[2] == 5
    real = t[..., 0] >= 0
    assert real[:, 0].all()  # every image has an object, padding comes last
    assert np.all((t[real][:, 0] >= 0) & (t[real][:, 0] < 3))
    boxes = t[real][:, 1:]
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])
    assert np.all(t[~real] == -1)
    with open(os.path.join(generated, "label.csv")) as fh:
        assert fh.readline().strip() == ",".join(dd.BANANA_HEADER)


def test_generator_is_deterministic_and_refuses_to_overwrite(tmp_path, generated):
    again = dd.generate_banana_dataset(str(tmp_path / "again"), 6, image_size=64, num_classes=3,
                                       max_objects=3, seed=5)
    with open(os.path.join(generated, "label.csv")) as a, \
            open(os.path.join(again, "label.csv")) as b:
        assert a.read() == b.read()
    with pytest.raises(FileExistsError, match="overwrite"):
        dd.generate_banana_dataset(again, 2, image_size=64)
    with pytest.raises(ValueError, match="num_classes"):
        dd.generate_banana_dataset(str(tmp_path / "x"), 2, num_classes=9)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def _write_set(root, rows, size=(20, 30), header=",".join(dd.BANANA_HEADER)):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = {r.split(",")[0] for r in rows}
    for n in names:
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(os.path.join(root, "images", n))
    with open(os.path.join(root, "label.csv"), "w") as fh:
        fh.write("\n".join([header, *rows]) + "\n")
    return str(root)


def test_reader_normalises_and_pads(tmp_path):
    root = _write_set(tmp_path, ["a.png,0,3,2,15,10", "a.png,1,0,0,30,20", "b.png,1,6,4,12,8"])
    ds = dd.read_banana_dataset(root, max_objects=3)
    np.testing.assert_allclose(ds.targets[0, 0], [0, 0.1, 0.1, 0.5, 0.5])
    np.testing.assert_allclose(ds.targets[1], [[1, 0.2, 0.2, 0.4, 0.4], [-1] * 5, [-1] * 5])
    assert ds.names == ["a.png", "b.png"]
    with pytest.raises(DatasetError, match="more than max_objects=1"):
        dd.read_banana_dataset(root, max_objects=1)
    with pytest.raises(ValueError, match="out of range"):
        dd.read_banana_dataset(root, num_classes=1)
    small = dd.read_banana_dataset(root, image_size=(10, 15))
    assert small.images.shape == (2, 10, 15, 3)
    np.testing.assert_allclose(small.targets, dd.read_banana_dataset(root).targets)


@pytest.mark.parametrize("row,match", [
    ("a.png,0,10,2,5,10", "x1 < x0"),
    ("a.png,0,nan,2,5,10", "NaN"),
    ("a.png,0,3,2,45,10", "outside the 30x20 image"),
    ("a.png,0.5,3,2,5,10", "not an integer"),
    ("a.png,zero,3,2,5,10", "non-numeric"),
    ("a.png,0,3,2,5", "6 fields"),
])
def test_reader_refuses_bad_rows(tmp_path, row, match):
    root = _write_set(tmp_path, [row])
    with pytest.raises(ValueError, match=match):
        dd.read_banana_dataset(root)


def test_reader_missing_files_and_bad_header(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="label.csv"):
        dd.read_banana_dataset(str(tmp_path / "nowhere"))
    root = _write_set(tmp_path / "h", ["a.png,0,1,1,2,2"], header="name,label,x0,y0,x1,y1")
    with pytest.raises(DatasetError, match="header"):
        dd.read_banana_dataset(root)
    root = _write_set(tmp_path / "m", ["a.png,0,1,1,2,2"])
    with open(os.path.join(root, "label.csv"), "a") as fh:
        fh.write("missing.png,0,1,1,2,2\n")
    with pytest.raises(DatasetNotFoundError, match="missing.png"):
        dd.read_banana_dataset(root)
    root = _write_set(tmp_path / "e", [])
    with pytest.raises(DatasetError, match="empty ground-truth"):
        dd.read_banana_dataset(root)


def test_reader_refuses_mixed_sizes(tmp_path):
    root = _write_set(tmp_path, ["a.png,0,1,1,2,2"])
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(os.path.join(root, "images", "b.png"))
    with open(os.path.join(root, "label.csv"), "a") as fh:
        fh.write("b.png,0,1,1,2,2\n")
    with pytest.raises(DatasetError, match="image_size"):
        dd.read_banana_dataset(root)


def test_pad_targets():
    out = dd.pad_targets([np.array([[0, 0.1, 0.1, 0.2, 0.2]]), np.zeros((0, 5))], 2,
                         allow_empty=True)
    assert out.shape == (2, 2, 5) and (out[1] == -1).all()
    with pytest.raises(ValueError, match="empty"):
        dd.pad_targets([np.zeros((0, 5))], 2)


_VOC_XML = """<annotation><filename>{name}.jpg</filename>
<size><width>40</width><height>20</height><depth>3</depth></size>{objects}</annotation>"""
_VOC_OBJ = """<object><name>{cls}</name><difficult>{diff}</difficult>
<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""


def _voc(root, objects_by_image, split=("img1", "img2")):
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    for name, objs in objects_by_image.items():
        xml = _VOC_XML.format(name=name, objects="".join(_VOC_OBJ.format(**o) for o in objs))
        with open(os.path.join(base, "Annotations", f"{name}.xml"), "w") as fh:
            fh.write(xml)
        Image.fromarray(np.full((20, 40, 3), 128, np.uint8)).save(
            os.path.join(base, "JPEGImages", f"{name}.jpg"))
    with open(os.path.join(base, "ImageSets", "Main", "train.txt"), "w") as fh:
        fh.write("\n".join(split) + "\n")
    return str(root)


def test_voc_reader(tmp_path):
    root = _voc(tmp_path, {
        "img1": [{"cls": "dog", "diff": 0, "x0": 1, "y0": 1, "x1": 20, "y1": 10},
                 {"cls": "cat", "diff": 1, "x0": 11, "y0": 6, "x1": 40, "y1": 20}],
        "img2": [{"cls": "person", "diff": 0, "x0": 5, "y0": 3, "x1": 8, "y1": 9}]})
    ds = dd.read_voc_detection(root, image_size=(10, 20))
    assert ds.images.shape == (2, 10, 20, 3)
    dog, cat, person = (dd.VOC_CLASSES.index(c) for c in ("dog", "cat", "person"))
    np.testing.assert_allclose(ds.targets[0], [[dog, 0, 0, 0.5, 0.5],
                                               [cat, 0.25, 0.25, 1.0, 1.0]])
    np.testing.assert_allclose(ds.targets[1], [[person, 0.1, 0.1, 0.2, 0.45], [-1] * 5])
    assert ds.difficult.tolist() == [[False, True], [False, False]]
    no_diff = dd.read_voc_detection(root, keep_difficult=False)
    assert no_diff.targets.shape == (2, 1, 5)


def test_voc_reader_refuses_bad_annotations(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="Annotations"):
        dd.read_voc_detection(str(tmp_path / "none"))
    root = _voc(tmp_path / "a", {"img1": [{"cls": "unicorn", "diff": 0, "x0": 1, "y0": 1,
                                           "x1": 5, "y1": 5}]}, split=("img1",))
    with pytest.raises(DatasetError, match="unknown class 'unicorn'"):
        dd.read_voc_detection(root)
    root = _voc(tmp_path / "b", {"img1": []}, split=("img1",))
    with pytest.raises(ValueError, match="empty"):
        dd.read_voc_detection(root)
    root = _voc(tmp_path / "c", {"img1": [{"cls": "dog", "diff": 0, "x0": 9, "y0": 1,
                                           "x1": 5, "y1": 5}]}, split=("img1",))
    with pytest.raises(ValueError, match="x1 < x0"):
        dd.read_voc_detection(root)
    root = _voc(tmp_path / "d", {"img1": [{"cls": "dog", "diff": 0, "x0": "a", "y0": 1,
                                           "x1": 5, "y1": 5}]}, split=("img1",))
    with pytest.raises(DatasetError, match="non-numeric"):
        dd.read_voc_detection(root)
