"""Hostile input, round three (issue 27), the data and ops side: phone photos, 16-bit and big
pictures, truncated JPEGs, loose COCO / VOC values, file names that leave their folder, results
files, and ops inputs where the backends disagreed.  Each test names the issue's item."""
import gc
import io
import json
import os
import re
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from frcnn_scratch import ops
from frcnn_scratch.data import SHAPE_CLASSES, make_shapes_dataset, open_dataset, write_coco, write_voc
from frcnn_scratch.data.coco import read_coco_annotations, read_coco_results, write_coco_results
from frcnn_scratch.data.images import read_image, read_image_reduced
from frcnn_scratch.data.voc import read_voc_split


def samples(n=2, seed=0):
    out = make_shapes_dataset(n, seed=seed)
    for k, s in enumerate(out):
        s["id"] = f"s{k}"
    return out


def coco_files(tmp_path, n=2, edit=None):
    """A COCO annotation file of n shapes images (edit(data) may change it): its spec."""
    write_coco(tmp_path / "a.json", tmp_path / "im", samples(n), SHAPE_CLASSES)
    if edit:
        data = json.loads((tmp_path / "a.json").read_text())
        edit(data)
        (tmp_path / "a.json").write_text(json.dumps(data))
    return f"coco:{tmp_path / 'a.json'}:{tmp_path / 'im'}"


def voc_files(tmp_path, n=2, edit=None):
    """A VOC folder of n shapes images (edit(xml text) -> text changes image s0's XML)."""
    write_voc(tmp_path, samples(n), SHAPE_CLASSES, split="train")
    if edit:
        xml = tmp_path / "Annotations" / "s0.xml"
        xml.write_text(edit(xml.read_text()))
    return f"voc:{tmp_path}"


def peak_bytes(call):
    """The most bytes NumPy (and Python) held at once during call() (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---- item 8: EXIF orientation, applied as viewers apply it ----------------------------------------

def with_orientation(path, pixels, orientation, fmt="PNG"):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format=fmt, exif=exif.tobytes(),
                                 **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_viewers_do(tmp_path, orientation):
    from PIL import ImageOps
    pixels = (np.arange(6 * 10 * 3).reshape(6, 10, 3) * 4 % 256).astype(np.uint8)
    with_orientation(tmp_path / "p.png", pixels, orientation)
    with Image.open(tmp_path / "p.png") as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB")) / np.float32(255)
    np.testing.assert_allclose(read_image(tmp_path / "p.png"), shown, atol=1e-7)


def test_a_phone_photo_is_upright_in_train_eval_and_detect(tmp_path):
    """A portrait photo stored landscape with orientation 6: detect's reader, the datasets and
    their size checks all see it 40 wide and 60 tall, as its annotation (drawn on what a viewer
    shows) says."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :20] = 255                                 # the left third white, as stored
    (tmp_path / "im").mkdir()
    with_orientation(tmp_path / "im" / "photo.jpg", stored, 6, fmt="JPEG")
    image, factors = read_image_reduced(tmp_path / "im" / "photo.jpg", 1000)
    assert image.shape == (60, 40, 3) and factors == (1.0, 1.0)
    assert image[:15].mean() > 0.9 and image[-15:].mean() < 0.1   # turned right: white on top
    coco = dict(images=[dict(id=1, file_name="photo.jpg", height=60, width=40)],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[5, 30, 30, 25])],
                categories=[dict(id=1, name="thing")])
    (tmp_path / "a.json").write_text(json.dumps(coco))
    data = open_dataset(f"coco:{tmp_path / 'a.json'}:{tmp_path / 'im'}")
    assert data[0]["image"].shape == (60, 40, 3)
    assert data[0]["image"][:15].mean() > 0.9
    coco["images"][0].update(height=40, width=60)        # the stored size: boxes drawn sideways
    (tmp_path / "a.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"images\[0\].*EXIF orientation \(6\) shows it turned"):
        open_dataset(f"coco:{tmp_path / 'a.json'}:{tmp_path / 'im'}")


# ---- item 9: 16-bit and big pictures reduced before they become float ------------------------------

def test_a_16_bit_picture_in_a_dataset_is_reduced_before_it_becomes_float(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "im").mkdir()
    Image.fromarray((rng.random((1200, 1600)) * 65535).astype(np.uint16)).save(tmp_path / "im" / "d.png")
    coco = dict(images=[dict(id=1, file_name="d.png", height=1200, width=1600)], annotations=[],
                categories=[dict(id=1, name="thing")])
    (tmp_path / "a.json").write_text(json.dumps(coco))
    data = open_dataset(f"coco:{tmp_path / 'a.json'}:{tmp_path / 'im'}", min_size=60, max_size=80)
    full_float = 1200 * 1600 * 3 * 4
    peak = peak_bytes(lambda: data[0])
    assert peak < full_float / 3, f"peak {peak / 1e6:.1f} MB for a {full_float / 1e6:.0f} MB float copy"
    item = data[0]
    assert item["image"].shape == (60, 80, 3)
    assert abs(float(item["image"].mean()) - 0.5) < 0.02           # the mean of uniform noise


def test_a_16_bit_photo_for_detect_is_reduced_before_it_becomes_float(tmp_path):
    ramp = (np.arange(1200 * 1600) % 65536).astype(np.uint16).reshape(1200, 1600)
    Image.fromarray(ramp).save(tmp_path / "d.png")
    full_float = 1200 * 1600 * 3 * 4
    peak = peak_bytes(lambda: read_image_reduced(tmp_path / "d.png", 100))
    assert peak < full_float / 3, f"peak {peak / 1e6:.1f} MB for a {full_float / 1e6:.0f} MB float copy"
    image, (fy, fx) = read_image_reduced(tmp_path / "d.png", 100)
    assert max(image.shape[:2]) <= 100 and image.shape[2] == 3
    assert (fy, fx) == (1200 / image.shape[0], 1600 / image.shape[1])


def test_a_big_8_bit_picture_in_a_voc_split_is_reduced_too(tmp_path):
    big = np.full((1500, 2000, 3), 90, np.uint8)
    big[:, 1000:] = 200
    write_voc(tmp_path, [dict(image=np.zeros((8, 8, 3), np.float32), id="a")], SHAPE_CLASSES,
              split="t")
    Image.fromarray(big).save(tmp_path / "JPEGImages" / "a.png")
    xml = tmp_path / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<width>8", "<width>2000")
                   .replace("<height>8", "<height>1500"))
    data = open_dataset(f"voc:{tmp_path}", split="t", min_size=60, max_size=80)
    peak = peak_bytes(lambda: data[0])
    assert peak < big.size * 4 / 3, f"peak {peak / 1e6:.1f} MB, a float copy is {big.size * 4e-6:.0f}"
    image = data[0]["image"]
    assert image.shape == (60, 80, 3)
    assert abs(image[:, :38].mean() - 90 / 255) < 0.01 and abs(image[:, 42:].mean() - 200 / 255) < 0.01


def test_grey_stays_one_channel_until_the_resize(tmp_path):
    (tmp_path / "im").mkdir()
    Image.fromarray(np.full((1200, 1200), 77, np.uint8)).save(tmp_path / "im" / "g.png")
    coco = dict(images=[dict(id=1, file_name="g.png")], annotations=[],
                categories=[dict(id=1, name="thing")])
    (tmp_path / "a.json").write_text(json.dumps(coco))
    data = open_dataset(f"coco:{tmp_path / 'a.json'}:{tmp_path / 'im'}", min_size=400, max_size=400)
    rgb_float = 1200 * 1200 * 3 * 4
    peak = peak_bytes(lambda: data[0])
    assert peak < rgb_float * 0.7, \
        f"peak {peak / 1e6:.1f} MB, a colour float copy is {rgb_float / 1e6:.0f}"
    np.testing.assert_array_equal(data[0]["image"], np.full((400, 400, 3), np.float32(77) / 255))


def test_reduced_decoding_keeps_the_geometry(tmp_path):
    """A block-reduced picture resized to the model's scale puts every edge where resizing the
    full picture does (within a pixel of the output)."""
    from frcnn_scratch.rescale import resize_image
    image = np.zeros((997, 1203), np.uint8)
    image[300:700, 401:809] = 255
    (tmp_path / "im").mkdir()
    Image.fromarray(image).save(tmp_path / "im" / "e.png")
    coco = dict(images=[dict(id=1, file_name="e.png")], annotations=[],
                categories=[dict(id=1, name="thing")])
    (tmp_path / "a.json").write_text(json.dumps(coco))
    data = open_dataset(f"coco:{tmp_path / 'a.json'}:{tmp_path / 'im'}", min_size=50, max_size=200)
    got = data[0]["image"][:, :, 0]
    want = resize_image(image.astype(np.float32) / 255, *got.shape)
    assert np.abs(got - want).max() < 0.35 and np.abs(got - want).mean() < 0.01


# ---- item 10: a truncated JPEG is refused by name --------------------------------------------------

def jpeg_bytes(shape=(300, 400), progressive=False):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray((rng.random(shape + (3,)) * 255).astype(np.uint8)).save(
        buf, format="JPEG", progressive=progressive)
    return buf.getvalue()


@pytest.mark.parametrize("cut", ["header only", "half", "most", "progressive"])
def test_a_truncated_jpeg_closed_with_an_end_marker_is_refused_by_name(tmp_path, cut):
    data = jpeg_bytes(progressive=cut == "progressive")
    keep = {"header only": data.find(b"\xff\xda") + 14, "half": len(data) // 2,
            "most": len(data) - 200, "progressive": len(data) * 2 // 3}[cut]
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:keep] + b"\xff\xd9")
    for read in (read_image, lambda p: read_image_reduced(p, 100)):
        with pytest.raises(ValueError, match=r"cut.jpg' is a truncated JPEG"):
            read(path)


def test_a_complete_jpeg_with_bytes_after_its_end_is_read(tmp_path):
    data = jpeg_bytes()
    (tmp_path / "ok.jpg").write_bytes(data + b"trailing bytes some cameras write")
    assert read_image(tmp_path / "ok.jpg").shape == (300, 400, 3)


def test_a_truncated_jpeg_in_a_dataset_names_its_file(tmp_path):
    spec = coco_files(tmp_path)
    data = jpeg_bytes((96, 128))
    (tmp_path / "im" / "s0.png").write_bytes(data[:len(data) // 2] + b"\xff\xd9")
    coco = json.loads((tmp_path / "a.json").read_text())
    coco["images"][0].update(height=96, width=128)
    coco["annotations"] = []
    (tmp_path / "a.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"s0.png' is a truncated JPEG"):
        open_dataset(spec)[0]


# ---- item 11: COCO's loose values, blank names, sizes checked when the data is opened ---------------

@pytest.mark.parametrize("field, value, message", [
    ("iscrowd", "0", r"annotations\[0\].iscrowd: expected 0 or 1, got the string '0'"),
    ("iscrowd", "false", r"annotations\[0\].iscrowd: expected 0 or 1"),
    ("area", float("nan"), r"annotations\[0\].area: expected a finite number >= 0"),
    ("area", -5, r"annotations\[0\].area: expected a finite number >= 0, got -5"),
    ("bbox", [True, True, True, True], r"annotations\[0\].bbox: expected \[x, y, w, h\]"),
])
def test_coco_annotation_values_of_the_wrong_kind_are_refused(tmp_path, field, value, message):
    spec = coco_files(tmp_path, edit=lambda d: d["annotations"][0].update({field: value}))
    with pytest.raises(ValueError, match=message):
        open_dataset(spec)


def test_coco_iscrowd_as_json_booleans_is_read_as_meant(tmp_path):
    spec = coco_files(tmp_path, edit=lambda d: [a.update(iscrowd=False) for a in d["annotations"]])
    assert not open_dataset(spec)[0]["difficult"].any()


def test_empty_class_names_are_refused(tmp_path):
    spec = coco_files(tmp_path / "c", edit=lambda d: d["categories"][2].update(name=" "))
    with pytest.raises(ValueError, match=r"categories\[2\].name: expected a non-empty class name"):
        open_dataset(spec)
    spec = voc_files(tmp_path / "v", edit=lambda t: re.sub(r"<name>[^<]*</name>", "<name> </name>",
                                                           t, count=1))
    with pytest.raises(ValueError, match=r"s0.xml: object 0: <name> is empty"):
        open_dataset(spec, split="train")


def test_declared_sizes_are_checked_when_the_data_is_opened(tmp_path):
    spec = coco_files(tmp_path / "c", edit=lambda d: d["images"][1].update(height=1000))
    with pytest.raises(ValueError, match=r"images\[1\]: declares \d+ x 1000 .* but .*s1.png is"):
        open_dataset(spec)
    spec = voc_files(tmp_path / "v", edit=lambda t: t.replace("<height>", "<height>1", 1))
    with pytest.raises(ValueError, match=r"s0.xml: <size>: declares .* but .*s0.png is"):
        open_dataset(spec, split="train")


@pytest.mark.parametrize("value", [120.5, "120"])
def test_a_fractional_or_text_size_is_refused_not_truncated(tmp_path, value):
    spec = coco_files(tmp_path, edit=lambda d: d["images"][0].update(height=value))
    with pytest.raises(ValueError, match=r"images\[0\].height: expected a whole number of pixels"):
        open_dataset(spec)


# ---- item 16: file names that leave the image folder ----------------------------------------------

@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_coco_file_names_may_not_leave_the_image_folder(tmp_path, name):
    spec = coco_files(tmp_path / "d")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "d" / "outside.png")
    name = str(tmp_path / "d" / "outside.png") if name == "ABSOLUTE" else name
    coco = json.loads((tmp_path / "d" / "a.json").read_text())
    coco["images"][0].update(file_name=name, height=4, width=4)
    coco["annotations"] = []
    (tmp_path / "d" / "a.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"images\[0\].file_name: file name .* leaves the image folder"):
        open_dataset(spec)


def test_voc_file_names_and_ids_may_not_leave_the_dataset(tmp_path):
    spec = voc_files(tmp_path / "v", edit=lambda t: t.replace("<filename>", "<filename>../../", 1))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "s0.png")
    with pytest.raises(ValueError, match=r"s0.xml: <filename>: file name '../../s0.png' leaves"):
        open_dataset(spec, split="train")
    (tmp_path / "v" / "ImageSets" / "Main" / "train.txt").write_text("s1\n../v/Annotations/s1\n")
    with pytest.raises(ValueError,
                       match=r"train.txt: line 2: '../v/Annotations/s1' cannot be an image id"):
        read_voc_split(tmp_path / "v", "train")


# ---- item 17: wrongly typed values are one line naming the file, entry and field --------------------

@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(images=5), r"a.json: images: expected a list, got 5"),
    (lambda d: d.update(categories=None), r"a.json: categories: expected a list, got null"),
    (lambda d: d["images"][0].update(height=float("inf")),
     r"images\[0\].height: expected a whole number"),
    (lambda d: d["images"][0].update(height=[96]),
     r"images\[0\].height: expected a whole number .* got a list"),
    (lambda d: d["annotations"][0].update(image_id=[1]),
     r"annotations\[0\].image_id: expected an int .* got a list"),
    (lambda d: d["images"][0].update(id={"a": 1}), r"images\[0\].id: expected an int .* got an object"),
    (lambda d: d["categories"][0].update(id=1.5), r"categories\[0\].id: expected an int"),
    (lambda d: d["images"][1].update(id="2"), r"images\[1\].id: '2', but images\[0\]'s id is 1"),
    (lambda d: d["images"][0].update(file_name=7),
     r"images\[0\].file_name: expected a file name, got 7"),
    (lambda d: d.update(annotations=[5]), r"annotations\[0\]: expected an object, got 5"),
])
def test_coco_values_of_the_wrong_type_are_named(tmp_path, edit, message):
    spec = coco_files(tmp_path, edit=edit)
    with pytest.raises(ValueError, match=message) as info:
        open_dataset(spec)
    assert "a.json" in str(info.value)


@pytest.mark.parametrize("text", ["inf", "nan", "1e400", "96.5"])
def test_voc_sizes_that_are_not_whole_numbers_are_named(tmp_path, text):
    spec = voc_files(tmp_path, edit=lambda t: t.replace("<height>", f"<height>{text}<!--", 1)
                     .replace("</height>", "--></height>", 1))
    with pytest.raises(ValueError, match=r"s0.xml: <size><height>: expected a whole number of pixels"):
        open_dataset(spec, split="train")


# ---- item 18: messages that name the file and the field -------------------------------------------

def test_a_split_file_that_is_not_utf8_is_named(tmp_path):
    voc_files(tmp_path)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_bytes(b"s0\ns\xff1\n")
    with pytest.raises(ValueError, match=r"train.txt: line 2: not UTF-8 text"):
        read_voc_split(tmp_path, "train")


def test_a_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    voc_files(tmp_path)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_bytes("\ufeffs0\ns1\n".encode())
    records, _ = read_voc_split(tmp_path, "train")
    assert [r["id"] for r in records] == ["s0", "s1"]
    spec = coco_files(tmp_path / "c")
    path = tmp_path / "c" / "a.json"
    path.write_bytes("\ufeff".encode() + path.read_bytes())
    assert len(open_dataset(spec)) == 2


def test_deeply_nested_json_is_named(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep.json: not valid JSON \(nested too deep"):
        read_coco_annotations(tmp_path / "deep.json", tmp_path)
    with pytest.raises(ValueError, match=r"deep.json: not valid JSON"):
        read_coco_results(tmp_path / "deep.json", [1], [1])


def test_nan_sizes_name_the_file_and_field(tmp_path):
    spec = coco_files(tmp_path, edit=lambda d: d["images"][1].update(width=float("nan")))
    with pytest.raises(ValueError,
                       match=r"a.json: images\[1\].width: expected a whole number .* got nan"):
        open_dataset(spec)


def test_duplicate_category_names_are_named_where_they_are(tmp_path):
    spec = coco_files(tmp_path, edit=lambda d: d["categories"][3].update(name="circle"))
    with pytest.raises(ValueError, match=r"categories\[3\].name: class name 'circle' repeats "
                                         r".*categories\[0\].name's"):
        open_dataset(spec)


# ---- item 12 (parsing): results files with loose values or another set of images ------------------

@pytest.mark.parametrize("change, message", [
    (dict(bbox="1234"), r"\[0\].bbox: expected \[x, y, w, h\], four numbers"),
    (dict(bbox=["1", "2", "3", "4"]), r"\[0\].bbox: expected \[x, y, w, h\], four numbers"),
    (dict(score="0.9"), r"\[0\].score: expected a finite number, got the string '0.9'"),
    (dict(score=True), r"\[0\].score: expected a finite number, got true"),
    (dict(image_id=True), r"\[0\].image_id: expected an int .* got true"),
    (dict(image_id=1.0), r"\[0\].image_id: expected an int .* got 1.0"),
    (dict(category_id=False), r"\[0\].category_id: expected an int .* got false"),
])
def test_results_with_values_of_the_wrong_kind_are_refused(tmp_path, change, message):
    entry = dict(image_id=1, category_id=1, bbox=[1, 2, 3, 4], score=0.5)
    entry.update(change)
    (tmp_path / "r.json").write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=message):
        read_coco_results(tmp_path / "r.json", [1, 2], [1, 2])


def test_results_written_for_other_files_are_not_scored_against_the_dataset(tmp_path):
    det = dict(boxes=np.array([[1, 2, 5, 6]], np.float32), scores=np.array([0.5]), labels=np.array([1]))
    write_coco_results(tmp_path / "r.json", [det, det], [1, 2], [1], file_names=["a.png", "b.png"])
    with pytest.raises(ValueError, match=r"\[0\].file_name: 'a.png' is not image 1's file \('s0.png'\)"):
        read_coco_results(tmp_path / "r.json", [1, 2], [1], file_names=["s0.png", "s1.png"])
    with pytest.raises(ValueError,
                       match=r"\[0\].file_name: 'a.png', but image 1 of the dataset is no file"):
        read_coco_results(tmp_path / "r.json", [1, 2], [1], file_names=[None, None])
    got = read_coco_results(tmp_path / "r.json", [1, 2], [1], file_names=["x/a.png", "y/b.png"])
    assert [len(d["scores"]) for d in got] == [1, 1]
    spec = coco_files(tmp_path / "c")
    assert open_dataset(spec).file_names == ["s0.png", "s1.png"]
    assert open_dataset("shapes", num_images=2).file_names == [None, None]


# ---- item 21 (data): a colon in a COCO path; the shapes relabelled by name ---------------------------

def test_a_colon_in_the_coco_annotation_path(tmp_path):
    folder = tmp_path / "with:colon"
    folder.mkdir()
    coco_files(folder)
    os.rename(folder / "a.json", folder / "a:b.json")
    data = open_dataset(f"coco:{folder / 'a:b.json'}:{folder / 'im'}")
    assert len(data) == 2 and data[0]["image"].ndim == 3


def test_the_shapes_are_relabelled_by_name_for_a_model_in_another_order():
    order = ("cross", "triangle", "square", "circle")
    data = open_dataset("shapes", num_images=3, seed=4, class_names=order)
    for item, s in zip(data, make_shapes_dataset(3, seed=4)):
        want = [order.index(SHAPE_CLASSES[label - 1]) + 1 for label in s["labels"]]
        assert item["labels"].tolist() == want
    assert data.class_names == order
    with pytest.raises(ValueError, match=r"classes \['cross'\] are not among the model's"):
        open_dataset("shapes", class_names=("circle", "square", "triangle"))


# ---- item 1 (data): a pass over the data keeps nothing, however many images ---------------------

def test_pictures_for_drawing_come_reduced(tmp_path):
    spec = coco_files(tmp_path)
    data = open_dataset(spec)
    image, (fy, fx) = data.picture(0, 50)
    h, w = data.original_image(0).shape[:2]
    assert max(image.shape[:2]) <= 50 and (fy, fx) == (h / image.shape[0], w / image.shape[1])
    shapes = open_dataset("shapes", num_images=1)
    image, factors = shapes.picture(0, 50)
    assert factors == (1.0, 1.0) and np.array_equal(image, shapes.original_image(0))


@pytest.mark.parametrize("kind", ["shapes", "voc"])
def test_one_pass_over_a_dataset_keeps_no_image(tmp_path, kind):
    if kind == "voc":
        write_voc(tmp_path, samples(12), SHAPE_CLASSES, split="train")
        data = open_dataset(f"voc:{tmp_path}", split="train", min_size=96, max_size=160)
    else:
        data = open_dataset("shapes", num_images=12, seed=1)
    gc.collect()
    tracemalloc.start()
    for i in range(len(data)):
        data[i]
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    one_image = 96 * 96 * 3                               # the smallest image, in 8 bits
    assert kept < one_image, f"{kept / 1e3:.0f} KB kept after one pass over {len(data)} images"


# ---- item 15: ops inputs where the backends disagreed: the same answer or the same refusal -----

BACKENDS = ["numpy", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_boxes_whose_area_overflows_float32_are_refused(backend):
    far = np.array([[1e20, 1e20, 3e20, 3e20], [1e20, 1e20, 3e20, 3e20]], np.float32)
    with pytest.raises(ValueError, match=r"boxes1: coordinates must lie within \+-1e\+18"):
        ops.box_iou(far, far, backend=backend)
    with pytest.raises(ValueError, match=r"boxes: coordinates must lie within \+-1e\+18"):
        ops.nms(far, np.array([1, 0.5], np.float32), 0.5, backend=backend)
    near = far / np.float32(1e3)                          # 1e17: areas 4e34, finite
    assert ops.box_iou(near, near, backend=backend).tolist() == [[1, 1], [1, 1]]
    assert ops.nms(near, np.array([1, 0.5], np.float32), 0.5, backend=backend).tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_align_sums_that_would_overflow_are_refused_alike(backend):
    big = np.full((1, 1, 4, 4), 3e38, np.float32)
    rois = np.array([[0, 0, 0, 4, 4]], np.float32)
    with pytest.raises(ValueError, match=r"features: values up to 3e\+38 summed over 4 samples"):
        ops.roi_align(big, rois, 2, 1.0, sampling_ratio=2, backend=backend)
    ok = ops.roi_align(big / np.float32(8), rois, 2, 1.0, sampling_ratio=2, backend=backend)
    assert np.isfinite(ok).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_and_text_arrays_are_refused(backend):
    with pytest.raises(ValueError, match=r"boxes1: expected real numbers, got complex numbers"):
        ops.box_iou(np.array([[0, 0, 1 + 1j, 1]]), np.zeros((1, 4)), backend=backend)
    with pytest.raises(ValueError, match=r"features: expected real numbers, got complex"):
        ops.roi_align(np.zeros((1, 1, 4, 4), np.complex64), np.zeros((1, 5)), 2, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"scores: expected real numbers, got text"):
        ops.nms(np.zeros((1, 4)), np.array(["0.5"]), 0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aligned_must_be_a_bool(backend):
    f = np.zeros((1, 1, 4, 4), np.float32)
    r = np.array([[0, 0, 0, 3, 3]], np.float32)
    for bad in ("no", "False", 0, None):
        with pytest.raises(ValueError, match="aligned: expected True or False"):
            ops.roi_align(f, r, 2, 1.0, aligned=bad, backend=backend)
        with pytest.raises(ValueError, match="aligned: expected True or False"):
            ops.roi_align_backward(np.zeros((1, 1, 2, 2), np.float32), r, f.shape, 2, 1.0,
                                   aligned=bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rois_beyond_the_integers_of_the_backends_are_refused(backend):
    f = np.arange(36, dtype=np.float32).reshape(1, 1, 6, 6)
    for v in (1e19, 3e38):
        rois = np.array([[0, -v, -v, v, v]], np.float32)
        with pytest.raises(ValueError, match=r"rois: corners must lie within"):
            ops.roi_pool(f, rois, 2, 1.0, backend=backend)
        with pytest.raises(ValueError, match=r"rois: corners must lie within"):
            ops.roi_align(f, rois, 2, 1.0, sampling_ratio=1, backend=backend)
    big = np.array([[0, -1e9, -1e9, 1e9, 1e9]], np.float32)   # within: the same cells on both
    want = ops.roi_pool(f, big, 2, 1.0, backend="numpy")
    got = ops.roi_pool(f, big, 2, 1.0, backend=backend)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


# ---- item 20 (ops): allocation failures are MemoryErrors; sampling bounded ---------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_an_allocation_failure_is_a_memory_error_on_both_backends(backend):
    boxes = np.tile(np.array([[0, 0, 1, 1]], np.float32), (600_000, 1))   # a 1.4 TB IoU matrix
    with pytest.raises(MemoryError):
        ops.box_iou(boxes, boxes, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_huge_sampling_ratio_is_refused_at_once(backend):
    f = np.zeros((1, 1, 4, 4), np.float32)
    r = np.array([[0, 0, 0, 3, 3]], np.float32)
    with pytest.raises(ValueError, match=r"sampling_ratio: expected at most 256 samples per bin side"):
        ops.roi_align(f, r, 2, 1.0, sampling_ratio=10 ** 6, backend=backend)
    with pytest.raises(ValueError, match=r"sampling_ratio: expected at most 256"):
        ops.roi_align_backward(np.zeros((1, 1, 2, 2), np.float32), r, f.shape, 2, 1.0,
                               sampling_ratio=10 ** 6, backend=backend)
    huge = np.array([[0, 0, 0, 1e8, 1e8]], np.float32)     # adaptive: 5e7 samples a bin side
    with pytest.raises(ValueError, match=r"rois: RoI 0 takes 50000000 samples per bin side"):
        ops.roi_align(f, huge, 2, 1.0, backend=backend)


def test_the_kernel_launcher_bounds_the_sampling_ratio_as_the_door_does():
    pytest.importorskip("torch")
    import torch
    from frcnn_scratch import _checks
    from frcnn_scratch.kernels import _launch, roi_align
    assert _launch.MAX_SAMPLING_RATIO == _checks.MAX_SAMPLING_RATIO
    with pytest.raises(ValueError, match="sampling_ratio: expected an int at most 256"):
        roi_align.roi_align_forward(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, 2, 1.0,
                                    sampling_ratio=10 ** 6)
