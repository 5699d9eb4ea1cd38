"""data/dataset.py: what `--data` opens: lazy decoding (once per image), the paper's resize, ground
truth in original pixels, class names from the data or a model, and clear errors."""
import numpy as np
import pytest

from frcnn_scratch.data import SHAPE_CLASSES, make_shapes_dataset, open_dataset, write_coco, write_voc
from frcnn_scratch.data import images
from frcnn_scratch.data.dataset import parse_spec


def samples(n=3, seed=0):
    out = make_shapes_dataset(n, seed=seed)
    for k, s in enumerate(out):
        s["id"] = f"s{k}"
    return out


def test_images_used_twice_are_kept_and_images_used_once_are_not(tmp_path, monkeypatch):
    write_voc(tmp_path, samples(), SHAPE_CLASSES, split="train")
    data = open_dataset(f"voc:{tmp_path}", split="train", min_size=48, max_size=96)
    calls = []
    real = images.read_image_reduced_by
    monkeypatch.setattr("frcnn_scratch.data.dataset.read_image_reduced_by",
                        lambda path, f: calls.append(path) or real(path, f))
    first = [data[i]["image"] for i in range(len(data))]       # an evaluation: each image once
    assert len(calls) == 3 and not data._cache, "images used once must not be kept"
    for _ in range(2):                                           # training comes back to them
        for i in range(len(data)):
            np.testing.assert_array_equal(data[i]["image"], first[i])
    assert len(calls) == 6, f"{len(calls)} decodes for 3 images read 3 times each"


def test_resize_rule_scale_and_ground_truth_in_original_pixels(tmp_path):
    original = samples(2, seed=3)
    write_coco(tmp_path / "a.json", tmp_path / "im", original, SHAPE_CLASSES)
    data = open_dataset(f"coco:{tmp_path / 'a.json'}:{tmp_path / 'im'}", min_size=64, max_size=80)
    for i, s in enumerate(original):
        item, truth = data[i], data.ground_truth(i)
        h, w = s["image"].shape[:2]
        assert min(item["image"].shape[:2]) == 64 or max(item["image"].shape[:2]) == 80
        assert abs(item["scale"] - min(64 / min(h, w), 80 / max(h, w))) < 1e-12
        assert item["image"].dtype == np.float32 and 0 <= item["image"].min() <= item["image"].max() <= 1
        np.testing.assert_allclose(item["boxes"], np.clip(s["boxes"] * item["scale"], 0,
                                   [item["image"].shape[1], item["image"].shape[0]] * 2), rtol=1e-6)
        np.testing.assert_array_equal(truth["boxes"], s["boxes"])       # scored in original pixels
        np.testing.assert_array_equal(truth["area"], (s["boxes"][:, 2] - s["boxes"][:, 0])
                                      .astype(np.float64) * (s["boxes"][:, 3] - s["boxes"][:, 1]))
    assert data.image_ids == [1, 2] and data.category_ids == (1, 2, 3, 4)


def test_shapes_without_resize_are_the_samples_themselves():
    data = open_dataset("shapes", num_images=3, seed=5)
    for item, s in zip(data, make_shapes_dataset(3, seed=5)):
        np.testing.assert_array_equal(item["image"], s["image"])
        np.testing.assert_array_equal(item["boxes"], s["boxes"])
        assert item["scale"] == 1.0


def test_model_classes_relabel_coco_data_by_name(tmp_path):
    original = samples(2, seed=6)
    write_coco(tmp_path / "a.json", tmp_path / "im", original, SHAPE_CLASSES)
    spec = f"coco:{tmp_path / 'a.json'}:{tmp_path / 'im'}"
    model_order = ("cross", "triangle", "square", "circle", "hexagon")
    data = open_dataset(spec, class_names=model_order)
    for i, s in enumerate(original):
        want = [model_order.index(SHAPE_CLASSES[label - 1]) + 1 for label in s["labels"]]
        assert data[i]["labels"].tolist() == want
    assert data.category_ids[:4] == (4, 3, 2, 1) and data.category_ids[4] not in (1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"classes \['square'\] are not among the model's"):
        open_dataset(spec, class_names=("circle", "triangle", "cross"))


@pytest.mark.parametrize("spec", ["", "voc", "voc:", "coco:a.json", "shapes:x", "imagenet:/x"])
def test_bad_specs_say_what_is_expected(spec):
    with pytest.raises(ValueError, match="--data: expected shapes, shapes-hard, voc:ROOT or coco:"):
        parse_spec(spec)


def test_a_box_outside_its_image_is_named(tmp_path):
    s = samples(1)
    write_voc(tmp_path, s, SHAPE_CLASSES, split="train")
    xml = tmp_path / "Annotations" / "s0.xml"
    text = xml.read_text()
    xml.write_text(text.replace("<xmax>", "<xmax>9", 1))   # xmax 9xx: far past the right edge
    with pytest.raises(ValueError, match=r"s0.xml: object 0 .* lies outside the"):
        open_dataset(f"voc:{tmp_path}", split="train")
