"""Data: the synthetic shapes dataset, resize / hflip, and (below) the VOC and COCO loaders."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from frcnn_scratch.boxes import box_iou
from frcnn_scratch.data.coco import load_coco, write_coco
from frcnn_scratch.data.shapes import SHAPE_CLASSES, make_shapes_dataset, make_shapes_sample, shape_mask
from frcnn_scratch.data.transforms import hflip, resize
from frcnn_scratch.rescale import bilinear_matrix, compute_scale, resize_image
from frcnn_scratch.data.voc import VOC_CLASSES, load_voc, write_voc


def assert_same_sample(a, b):
    assert a["id"] == b["id"]
    for key in ("image", "boxes", "labels", "difficult"):
        assert a[key].dtype == b[key].dtype, f"{key}: dtype {a[key].dtype} != {b[key].dtype}"
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} differs")


# ---- shapes: hand cases --------------------------------------------------------------------------

def test_shape_masks_hand_cases():
    np.testing.assert_array_equal(shape_mask("square", 3), np.ones((3, 3), bool))
    # cross of side 3: arms one pixel wide through the centre
    np.testing.assert_array_equal(shape_mask("cross", 3), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    # triangle of side 4: pixel centres at 0.5..3.5; row y is |x + 0.5 - 2| <= 2 * (y + 0.5) / 4
    np.testing.assert_array_equal(shape_mask("triangle", 4),
                                  [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]])
    # disc of diameter 4: the four corner pixels (centre distance sqrt(1.5^2 * 2) = 2.12 > 2) are out
    np.testing.assert_array_equal(shape_mask("circle", 4),
                                  [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])
    with pytest.raises(ValueError, match="name"):
        shape_mask("hexagon", 8)


# ---- shapes: the dataset ------------------------------------------------------------------------

def test_sample_format_matches_contract():
    samples = make_shapes_dataset(20, seed=3)
    assert len(samples) == 20
    for s in samples:
        h, w, c = s["image"].shape
        assert c == 3 and 96 <= h <= 160 and 96 <= w <= 160, f"image shape {s['image'].shape}"
        assert s["image"].dtype == np.float32 and 0 <= s["image"].min() and s["image"].max() <= 1
        g = len(s["labels"])
        assert 1 <= g <= 4, f"{g} objects"
        assert s["boxes"].shape == (g, 4) and s["boxes"].dtype == np.float32
        assert s["labels"].dtype == np.int64 and set(s["labels"].tolist()) <= {1, 2, 3, 4}
        assert s["difficult"].shape == (g,) and s["difficult"].dtype == bool and not s["difficult"].any()
        assert isinstance(s["id"], str)
    assert len({s["id"] for s in samples}) == 20, "ids must be unique"
    assert SHAPE_CLASSES == ("circle", "square", "triangle", "cross")


def test_same_seed_same_data_and_different_seed_different_data():
    a, b = make_shapes_dataset(8, seed=5), make_shapes_dataset(8, seed=5)
    for x, y in zip(a, b):
        assert_same_sample(x, y)
    # image i does not depend on how many images were asked for
    for x, y in zip(make_shapes_dataset(3, seed=5), a[:3]):
        assert_same_sample(x, y)
    c = make_shapes_dataset(8, seed=6)
    assert any(x["image"].shape != y["image"].shape or not np.array_equal(x["image"], y["image"])
               for x, y in zip(a, c)), "seeds 5 and 6 gave the same images"


def test_boxes_are_tight_around_unoccluded_shapes():
    samples = make_shapes_dataset(30, seed=11, with_masks=True)
    for s in samples:
        masks, boxes = s["masks"], s["boxes"]
        assert masks.shape == (len(boxes),) + s["image"].shape[:2]
        assert (masks.sum(axis=0) <= 1).all(), f"{s['id']}: two shapes share a pixel"
        for m, (x1, y1, x2, y2) in zip(masks, boxes.astype(int)):
            ys, xs = np.nonzero(m)
            # pixel c covers [c, c + 1): tight means min col = x1 and max col = x2 - 1
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2), \
                f"{s['id']}: mask extent {(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)} != box"
            colours = s["image"][m]                                   # (P, 3) one flat colour
            np.testing.assert_array_equal(colours, np.broadcast_to(colours[0], colours.shape),
                                          err_msg=f"{s['id']}: shape not a single visible colour")
        if len(boxes) > 1:
            iou = box_iou(boxes, boxes) - np.eye(len(boxes))
            assert iou.max() <= 0.3 + 1e-6, f"{s['id']}: box IoU {iou.max()} > max_iou 0.3"


def test_options_image_size_classes_and_counts():
    samples = make_shapes_dataset(10, seed=2, image_size=64, shape_size=(8, 20), num_objects=2,
                                  classes=("circle", "square"))
    for s in samples:
        assert s["image"].shape == (64, 64, 3)
        assert set(s["labels"].tolist()) <= {1, 2}
        widths = s["boxes"][:, 2] - s["boxes"][:, 0]
        assert (widths <= 20).all() and (widths >= 1).all()
    empty = make_shapes_sample(np.random.default_rng(0), num_objects=0)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert make_shapes_dataset(0, seed=0) == []


@pytest.mark.parametrize("kwargs, name", [
    (dict(image_size=(100, 50)), "image_size"), (dict(shape_size=0), "shape_size"),
    (dict(num_objects=(3, 1)), "num_objects"), (dict(classes=("blob",)), "classes"),
    (dict(num_images=-1), "num_images"), (dict(seed=-3), "seed"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    args = dict(num_images=2, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        make_shapes_dataset(**args)


# ---- transforms: hand cases -----------------------------------------------------------------------

def test_resize_image_bilinear_hand_case():
    # 2 -> 4 pixels: output centres map to -0.25, 0.25, 0.75, 1.25 (clamped to 0 and 1)
    image = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    out = resize_image(image, 4, 4)
    row = np.array([0.0, 0.25, 0.75, 1.0])
    want = row[None, :] + 2 * row[:, None]          # the image is 2 * y + x, bilinear is exact on it
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(bilinear_matrix(4, 2) @ np.array([0.0, 1.0]), row, atol=1e-6)
    # same size is an exact copy
    img = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    np.testing.assert_array_equal(resize_image(img, 5, 7), img)


def test_compute_scale_follows_the_paper_rule():
    assert compute_scale(100, 200, 50, 1000) == (0.5, 50, 100)          # shorter side -> 50
    assert compute_scale(100, 200, 600, 1000) == (5.0, 500, 1000)       # 1200 > 1000: cap the longer
    assert compute_scale(200, 100, 600, 1000) == (5.0, 1000, 500)


def test_resize_scales_boxes_and_does_not_modify_input():
    sample = dict(image=np.zeros((100, 200, 3), np.float32),
                  boxes=np.array([[10, 20, 50, 60]], np.float32), labels=np.array([1]), id="a")
    before = {k: np.copy(v) for k, v in sample.items()}
    out, scale = resize(sample, 50, 1000)
    assert scale == 0.5 and out["image"].shape == (50, 100, 3)
    np.testing.assert_array_equal(out["boxes"], [[5, 10, 25, 30]])
    assert out["labels"] is sample["labels"] and out["id"] == "a"
    for k, v in before.items():
        np.testing.assert_array_equal(sample[k], v, err_msg=f"resize modified input {k}")


def test_hflip_hand_case_and_purity():
    image = np.arange(12, dtype=np.float32).reshape(1, 4, 3) / 12
    sample = dict(image=image, boxes=np.array([[0, 0, 1, 1], [1, 0, 4, 1]], np.float32))
    out = hflip(sample)
    np.testing.assert_array_equal(out["boxes"], [[3, 0, 4, 1], [0, 0, 3, 1]])
    np.testing.assert_array_equal(out["image"][0, 0], image[0, 3])
    np.testing.assert_array_equal(sample["boxes"], [[0, 0, 1, 1], [1, 0, 4, 1]])


def test_transforms_reject_bad_samples():
    with pytest.raises(ValueError, match="sample"):
        hflip({"boxes": np.zeros((0, 4))})
    with pytest.raises(ValueError, match="boxes"):
        hflip(dict(image=np.zeros((4, 4, 3)), boxes=[[3, 0, 1, 1]]))
    with pytest.raises(ValueError, match="min_size"):
        resize(dict(image=np.zeros((4, 4, 3)), boxes=np.zeros((0, 4))), -1, 10)


# ---- transforms: properties on the shapes data ------------------------------------------------------

SHAPES = make_shapes_dataset(12, seed=21, with_masks=True)


@settings(max_examples=12, deadline=None)
@given(st.integers(0, len(SHAPES) - 1))
def test_hflip_keeps_boxes_tight_and_twice_is_identity(i):
    s = SHAPES[i]
    f = hflip(s)
    masks = s["masks"][:, :, ::-1]                       # flipped masks
    for m, box in zip(masks, f["boxes"]):
        ys, xs = np.nonzero(m)
        np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert_same_sample(hflip(f), s)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, len(SHAPES) - 1), st.integers(20, 300), st.integers(20, 400))
def test_resize_keeps_boxes_inside_and_proportional(i, min_size, max_size):
    s = SHAPES[i]
    out, scale = resize(s, min_size, max_size)
    h, w = out["image"].shape[:2]
    height, width = s["image"].shape[:2]
    assert (h, w) == (round(height * scale), round(width * scale)), f"{(h, w)} at scale {scale}"
    assert max(h, w) <= max_size, f"longer side {max(h, w)} > max_size {max_size}"
    assert min(h, w) == min_size or max(h, w) == max_size, f"{(h, w)}: neither side hits its target"
    assert out["boxes"][:, 0::2].max() <= w and out["boxes"][:, 1::2].max() <= h
    assert out["boxes"].min() >= 0
    np.testing.assert_allclose(out["boxes"], np.minimum(s["boxes"] * scale, [w, h, w, h]), rtol=1e-6,
                               err_msg="boxes not scaled by `scale`")
    assert 0 <= out["image"].min() and out["image"].max() <= 1, "bilinear left the value range"


# ---- VOC -----------------------------------------------------------------------------------------------

PNG_TOL = 0.5 / 255 + 1e-6   # images go through 8-bit PNG: each value rounds to the nearest k / 255


def assert_round_trip(loaded, samples):
    assert len(loaded) == len(samples)
    for a, b in zip(loaded, samples):
        assert a["id"] == b["id"]
        assert a["image"].dtype == np.float32 and a["image"].shape == b["image"].shape
        np.testing.assert_allclose(a["image"], b["image"], atol=PNG_TOL, rtol=0,
                                   err_msg=f"{a['id']}: image differs beyond 8-bit rounding")
        for key in ("boxes", "labels", "difficult"):
            assert a[key].dtype == b[key].dtype, f"{key}: {a[key].dtype} != {b[key].dtype}"
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{a['id']}: {key} differs")


def small_set():
    samples = make_shapes_dataset(3, seed=8, image_size=(24, 40), shape_size=(6, 12))
    samples[1] = dict(samples[1], difficult=np.ones(len(samples[1]["labels"]), bool))   # flags survive
    samples[2] = dict(samples[2], boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64),
                      difficult=np.zeros(0, bool))                                     # no objects
    samples[0] = dict(samples[0], boxes=samples[0]["boxes"] + np.float32(0.25))       # non-integer boxes
    return samples


def test_voc_round_trip(tmp_path):
    samples = small_set()
    write_voc(tmp_path, samples, SHAPE_CLASSES, split="train")
    assert_round_trip(load_voc(tmp_path, "train", SHAPE_CLASSES), samples)


def test_voc_reads_one_based_inclusive_boxes(tmp_path):
    # a hand-written VOC file: object covering pixel columns 1..3 (1-based) -> x1 = 0, x2 = 3
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("img1\n")
    (tmp_path / "Annotations" / "img1.xml").write_text(
        "<annotation><filename>img1.jpg</filename><size><width>6</width><height>5</height>"
        "<depth>3</depth></size><object><name>dog</name><difficult>1</difficult><bndbox><xmin>1</xmin>"
        "<ymin>2</ymin><xmax>3</xmax><ymax>5</ymax></bndbox></object>"
        "<object><name>cat</name><bndbox><xmin>2</xmin><ymin>1</ymin><xmax>6</xmax><ymax>2</ymax>"
        "</bndbox></object></annotation>")
    from PIL import Image
    Image.fromarray(np.full((5, 6, 3), 255, np.uint8)).save(tmp_path / "JPEGImages" / "img1.jpg")
    (s,) = load_voc(tmp_path, "val")
    np.testing.assert_array_equal(s["boxes"], [[0, 1, 3, 5], [1, 0, 6, 2]])
    np.testing.assert_array_equal(s["labels"], [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("cat") + 1])
    np.testing.assert_array_equal(s["difficult"], [True, False])
    assert s["image"].shape == (5, 6, 3) and s["image"].dtype == np.float32
    assert abs(float(s["image"].min()) - 1.0) < 0.02, "white JPEG should read as ~1.0"


def test_voc_errors_name_the_file_or_class(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainval.txt"):
        load_voc(tmp_path)
    samples = small_set()
    write_voc(tmp_path, samples, SHAPE_CLASSES)
    with pytest.raises(ValueError, match="unknown class"):
        load_voc(tmp_path, class_names=("circle",))
    (tmp_path / "JPEGImages" / f"{samples[1]['id']}.png").unlink()
    with pytest.raises(FileNotFoundError, match=samples[1]["id"]):
        load_voc(tmp_path, class_names=SHAPE_CLASSES)
    (tmp_path / "Annotations" / f"{samples[0]['id']}.xml").unlink()
    with pytest.raises(FileNotFoundError, match=f"{samples[0]['id']}.xml"):
        load_voc(tmp_path, class_names=SHAPE_CLASSES)
    with pytest.raises(ValueError, match="labels"):
        write_voc(tmp_path / "x", samples, ("circle",))


@pytest.mark.parametrize("xml, message", [
    ("<annotation><object><name>dog</name></object>", "not valid XML"),
    ("<annotation><size><width>6</width><height>x</height></size></annotation>",
     "<height> is not a number: 'x'"),
    ("<annotation><object><name>dog</name></object></annotation>", r"object 0 \('dog'\) has no <bndbox>"),
    ("<annotation><size><width>6</width><height>5</height></size><object><name>dog</name><bndbox>"
     "<xmin>4</xmin><ymin>1</ymin><xmax>9</xmax><ymax>2</ymax></bndbox></object></annotation>",
     r"object 0 \('dog'\) bndbox: box \(3, 0, 9, 2\) lies outside the 6 x 5 image"),
    ("<annotation><object><name>dog</name><bndbox><xmin>4</xmin><ymin>1</ymin><xmax>2</xmax>"
     "<ymax>2</ymax></bndbox></object></annotation>", r"object 0 \('dog'\) bndbox: .*x2 < x1"),
    ("<annotation><object><name>emu</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
     "<ymax>2</ymax></bndbox></object></annotation>", r"object 0: unknown class 'emu'"),
])
def test_voc_bad_annotations_name_the_file_and_field(tmp_path, xml, message):
    from frcnn_scratch.data.voc import read_voc_split
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    (tmp_path / "Annotations" / "a.xml").write_text(xml)
    (tmp_path / "JPEGImages" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=message) as info:
        read_voc_split(tmp_path, "test", class_names=("dog",))
    assert "a.xml" in str(info.value)


def test_voc_empty_split_is_an_error(tmp_path):
    from frcnn_scratch.data.voc import read_voc_split
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("\n")
    with pytest.raises(ValueError, match="test.txt: the split lists no image"):
        read_voc_split(tmp_path, "test")


# ---- COCO ----------------------------------------------------------------------------------------------

def test_coco_round_trip(tmp_path):
    samples = small_set()
    write_coco(tmp_path / "ann.json", tmp_path / "images", samples, SHAPE_CLASSES)
    loaded, names = load_coco(tmp_path / "ann.json", tmp_path / "images")
    assert names == SHAPE_CLASSES
    assert_round_trip(loaded, samples)


def test_coco_hand_case_sparse_category_ids(tmp_path):
    import json
    from PIL import Image
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "b.png")      # grey -> RGB
    data = {"images": [{"id": 10, "file_name": "a.png"}, {"id": 3, "file_name": "b.png"}],
            "categories": [{"id": 90, "name": "zebra"}, {"id": 2, "name": "bike"}],
            "annotations": [{"image_id": 10, "category_id": 90, "bbox": [1, 0.5, 2, 3], "iscrowd": 1},
                            {"image_id": 10, "category_id": 2, "bbox": [0, 0, 5, 4]}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    (a, b), names = load_coco(tmp_path / "ann.json", tmp_path)
    assert names == ("bike", "zebra")                                  # sorted by category id
    np.testing.assert_array_equal(a["boxes"], [[1, 0.5, 3, 3.5], [0, 0, 5, 4]])
    np.testing.assert_array_equal(a["labels"], [2, 1])
    np.testing.assert_array_equal(a["difficult"], [True, False])
    assert a["id"] == "a" and b["id"] == "b" and b["image"].shape == (2, 2, 3)
    assert b["boxes"].shape == (0, 4) and b["labels"].dtype == np.int64


def test_coco_errors(tmp_path):
    import json
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(tmp_path / "nope.json", tmp_path)
    from PIL import Image
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "a.png")
    base = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 20}],
            "categories": [{"id": 1, "name": "x"}]}
    cases = [({"annotations": [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}, "image_id 2"),
             ({"annotations": [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}]}, "category_id 5"),
             ({"annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1]}]}, "negative"),
             ({"annotations": [{"image_id": 1, "category_id": 1, "bbox": [15, 2, 9, 3]}]},
              r"annotations\[0\] bbox: box \(15, 2, 24, 5\) lies outside the 20 x 10 image"),
             ({"annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, "a", 1, 1]}]}, "four numbers"),
             ({"annotations": [{"image_id": 1, "category_id": 1}]}, r"annotations\[0\]: missing key"),
             ({"images": []}, "'images' is empty"),
             ({"images": base["images"] * 2}, r"images\[1\]: duplicate image id 1")]
    for extra, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps(dict(base, **extra)))
        with pytest.raises(ValueError, match=message):
            load_coco(tmp_path / "bad.json", tmp_path)
    (tmp_path / "bad.json").write_text("{\"images\": [")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_coco(tmp_path / "bad.json", tmp_path)
    (tmp_path / "ok.json").write_text(json.dumps(base))
    (tmp_path / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ok.json: images\[0\] \(id 1\): image file not found: .*a.png"):
        load_coco(tmp_path / "ok.json", tmp_path)


# ---- the writers' shared sample check, and images in [0, 1] everywhere --------------------------------

@pytest.mark.parametrize("write", ["voc", "coco"])
@pytest.mark.parametrize("change, match", [
    (dict(labels=np.array([1.5])), r"samples\[0\]\['labels'\]: expected whole numbers"),
    (dict(labels=np.array([7])), r"samples\[0\]\['labels'\]: expected values in \[1, 4\], got 7"),
    (dict(labels=np.array([1, 2])), r"samples\[0\]: 1 boxes but 2 labels"),
    (dict(boxes=np.array([[5, 5, 1, 1]], np.float32)), r"samples\[0\]\['boxes'\]: box 0"),
])
def test_writers_check_each_sample_alike(tmp_path, write, change, match):
    sample = dict(image=np.zeros((8, 8, 3), np.float32), boxes=np.array([[1, 1, 4, 4]], np.float32),
                  labels=np.array([1]), id="a")
    sample.update(change)
    with pytest.raises(ValueError, match=match):
        if write == "voc":
            write_voc(tmp_path, [sample], SHAPE_CLASSES)
        else:
            write_coco(tmp_path / "ann.json", tmp_path / "images", [sample], SHAPE_CLASSES)


def test_loaders_and_shapes_give_float32_images_in_the_unit_range(tmp_path):
    """The model rejects images outside [0, 1]: every source must give float32 in [0, 1], a JPEG
    (8-bit) included, and resize / hflip must keep the range."""
    from PIL import Image
    samples = make_shapes_dataset(3, seed=0)
    for s in samples:
        assert s["image"].dtype == np.float32 and 0 <= s["image"].min() and s["image"].max() <= 1
        for t in (resize(s, 97, 300)[0], resize(s, 31, 300)[0], hflip(s)):
            assert 0 <= t["image"].min() and t["image"].max() <= 1
    write_voc(tmp_path / "voc", samples, SHAPE_CLASSES)
    jpg = tmp_path / "voc" / "JPEGImages" / f"{samples[0]['id']}.jpg"
    png = jpg.with_suffix(".png")
    Image.open(png).save(jpg, quality=90)                 # a real 8-bit JPEG; the loader falls back
    png.unlink()                                          # to it when the XML's PNG is gone
    write_coco(tmp_path / "coco.json", tmp_path / "coco", samples, SHAPE_CLASSES)
    loaded = load_voc(tmp_path / "voc", class_names=SHAPE_CLASSES)
    loaded += load_coco(tmp_path / "coco.json", tmp_path / "coco")[0]
    for s in loaded:
        assert s["image"].dtype == np.float32 and 0 <= s["image"].min() and s["image"].max() <= 1
    assert loaded[0]["image"].max() > 0.5                 # 0..255 was divided, not clipped to 0..1


def test_hard_mode_has_small_occluding_shapes_and_unlabelled_clutter():
    from frcnn_scratch.data.shapes import SHAPES_HARD
    hard = make_shapes_dataset(40, seed=2, with_masks=True, **SHAPES_HARD)
    occluded = sum(int((s["hidden"] > 0).sum()) for s in hard)
    assert occluded > 0, "no shape is partly hidden in 40 hard images"
    for s in hard:
        assert 1 <= len(s["labels"]) <= 8 and s["image"].dtype == np.float32
        sides = np.minimum(s["boxes"][:, 2] - s["boxes"][:, 0], s["boxes"][:, 3] - s["boxes"][:, 1])
        assert sides.max() <= 40
        for m, (x1, y1, x2, y2) in zip(s["masks"], s["boxes"].astype(int)):
            ys, xs = np.nonzero(m)                 # the visible part stays inside its box
            assert len(xs) == 0 or (xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2)
    easy = make_shapes_dataset(3, seed=2)         # the default mode is unchanged by the options
    for a, b in zip(easy, make_shapes_dataset(3, seed=2, occlude=False, clutter=0)):
        assert_same_sample(a, b)


def test_a_results_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous results file and no temporary one."""
    import json as json_module
    from frcnn_scratch.data import coco
    path = tmp_path / "d.json"
    det = [dict(boxes=np.array([[1, 2, 5, 6]], np.float32), scores=np.array([0.9], np.float32),
                labels=np.array([1]))]
    coco.write_coco_results(path, det, [7], [3])
    before = path.read_text()

    def broken(obj, f):
        f.write("[{\"image_id\": 7")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(coco.json, "dump", broken)
    with pytest.raises(OSError):
        coco.write_coco_results(path, det + det, [7, 8], [3])
    assert path.read_text() == before and json_module.loads(before)[0]["image_id"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]
