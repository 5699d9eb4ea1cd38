"""COCO-format loader (and writer): one JSON file with images, annotations and categories.

    {"images":      [{"id": 7, "file_name": "a.jpg", "height": 120, "width": 160}, ...],
     "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [x, y, w, h],
                      "iscrowd": 0, "area": ...}, ...],
     "categories":  [{"id": 3, "name": "circle"}, ...]}

COCO boxes are [x, y, width, height] in continuous pixel coordinates, the same convention as this
project, so xyxy = (x, y, x + w, y + h) with no +-1. Category ids need not be contiguous (COCO's own
run 1..90 with gaps); they are mapped to labels 1..C in increasing id order, and class_names lists
the names in that order. Crowd regions (iscrowd = 1) become difficult boxes, which VOC evaluation
ignores. Images without annotations are kept, with empty boxes.
"""
import json
import os

import numpy as np

from .._checks import as_boxes
from ._samples import check_sample
from .voc import _check_id, read_image, write_image


def _require(entry, keys, where):
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def load_coco(annotation_json, image_dir):
    """Load a COCO-style detection dataset.

    Args:
        annotation_json: path of the JSON file.
        image_dir: folder holding the files named by images[*].file_name.
    Returns:
        (samples, class_names): samples in the order of the JSON's "images" list, each
        dict(image (H, W, 3) float32 in [0, 1], boxes (G, 4) float32 xyxy, labels (G,) int64 in 1..C,
        difficult (G,) bool = iscrowd, id = file name without extension); class_names a tuple of C
        names in label order.
    Raises:
        FileNotFoundError naming the missing file; ValueError for a malformed entry, an annotation
        naming an unknown image or category, or a negative box size.
    """
    if not os.path.isfile(annotation_json):
        raise FileNotFoundError(f"annotation file not found: {annotation_json}")
    with open(annotation_json) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{annotation_json}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{annotation_json}: expected a JSON object with images and categories")
    _require(data, ("images", "categories"), annotation_json)

    categories = sorted(data["categories"], key=lambda c: c["id"])
    for c in categories:
        _require(c, ("id", "name"), f"{annotation_json}: category {c}")
    label_of = {c["id"]: n + 1 for n, c in enumerate(categories)}     # category id -> 1..C
    class_names = tuple(c["name"] for c in categories)

    per_image = {}
    for img in data["images"]:
        _require(img, ("id", "file_name"), f"{annotation_json}: image {img}")
        per_image[img["id"]] = ([], [], [])                           # boxes, labels, difficult
    for n, ann in enumerate(data.get("annotations", [])):
        where = f"{annotation_json}: annotations[{n}]"
        _require(ann, ("image_id", "category_id", "bbox"), where)
        if ann["image_id"] not in per_image:
            raise ValueError(f"{where}: image_id {ann['image_id']} is not in images")
        if ann["category_id"] not in label_of:
            raise ValueError(f"{where}: category_id {ann['category_id']} is not in categories")
        bbox = ann["bbox"]
        if len(bbox) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox}")
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            raise ValueError(f"{where}: bbox has a negative width or height: {bbox}")
        boxes, labels, difficult = per_image[ann["image_id"]]
        boxes.append([x, y, x + w, y + h])                            # [x, y, w, h] -> xyxy
        labels.append(label_of[ann["category_id"]])
        difficult.append(bool(ann.get("iscrowd", 0)))

    samples = []
    for img in data["images"]:
        boxes, labels, difficult = per_image[img["id"]]
        image = read_image(os.path.join(image_dir, img["file_name"]))  # names the path if missing
        samples.append(dict(
            image=image,
            boxes=as_boxes(np.array(boxes, dtype=np.float32).reshape(-1, 4), f"image {img['id']} boxes"),
            labels=np.array(labels, dtype=np.int64),
            difficult=np.array(difficult, dtype=bool),
            id=os.path.splitext(os.path.basename(img["file_name"]))[0],
        ))
    return samples, class_names


def write_coco(json_path, image_dir, samples, class_names):
    """Write samples as a COCO JSON file plus PNG images, readable by load_coco.

    Image ids are 1..N, category ids 1..C (label = category id), file names "{sample id}.png",
    difficult boxes are written as iscrowd = 1.

    Args:
        json_path: the JSON file to write (its folder is created if needed).
        image_dir: folder for the PNG images (created if needed).
        samples: list of sample dicts.
        class_names: names in label order.
    Returns:
        the JSON content as a dict.
    """
    os.makedirs(image_dir, exist_ok=True)
    if os.path.dirname(json_path):
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
    images, annotations = [], []
    for n, sample in enumerate(samples):
        image_id = _check_id(sample.get("id", f"{n:06d}"))
        if any(img["file_name"] == f"{image_id}.png" for img in images):
            raise ValueError(f"samples[{n}]: duplicate id {image_id!r} (its image would be overwritten)")
        image, boxes, labels, difficult = check_sample(sample, n, class_names)
        file_name = f"{image_id}.png"
        write_image(os.path.join(image_dir, file_name), image)
        images.append(dict(id=n + 1, file_name=file_name, height=int(image.shape[0]),
                           width=int(image.shape[1])))
        for (x1, y1, x2, y2), label, diff in zip(boxes.tolist(), labels.tolist(), difficult.tolist()):
            annotations.append(dict(id=len(annotations) + 1, image_id=n + 1, category_id=label,
                                    bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1),
                                    iscrowd=int(diff)))
    data = dict(images=images, annotations=annotations,
                categories=[dict(id=k + 1, name=name) for k, name in enumerate(class_names)])
    with open(json_path, "w") as f:
        json.dump(data, f)
    return data
