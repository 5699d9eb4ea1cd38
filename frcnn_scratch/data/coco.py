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
from ..boxes import xyxy_to_xywh
from ._samples import check_id, check_inside, check_sample
from .images import check_size, read_image, sample_image_format, write_image


def _read_json(path, what):
    """The JSON content of a file; a missing file or malformed JSON is one error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def _require(entry, keys, where):
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def read_coco_annotations(annotation_json, image_dir):
    """Read a COCO JSON file and find its image files, without decoding any image.

    Args:
        annotation_json: path of the JSON file.
        image_dir: folder holding the files named by images[*].file_name.
    Returns:
        (records, class_names, category_ids): one record per entry of "images", in that order:
        dict(image_id (COCO's id), id (file name without extension), path, size ((H, W) from the
        entry, or None), boxes (G, 4) float32 xyxy, labels (G,) int64 in 1..C, difficult (G,) bool
        = iscrowd, area (G,) float64 = the annotations' area, or the box area where absent);
        class_names the C names in label order; category_ids the C COCO category ids, label
        k = category_ids[k - 1].
    Raises:
        FileNotFoundError naming the JSON file or the missing image; ValueError naming the file
        and the entry for malformed JSON, a missing key, an unknown image or category, a negative
        box size or a box outside its image, duplicate ids, no images.
    """
    data = _read_json(annotation_json, "annotation file")
    if not isinstance(data, dict):
        raise ValueError(f"{annotation_json}: expected a JSON object with images and categories")
    _require(data, ("images", "categories"), annotation_json)
    if not data["images"]:
        raise ValueError(f"{annotation_json}: 'images' is empty: no image to read")

    for n, c in enumerate(data["categories"]):
        _require(c, ("id", "name"), f"{annotation_json}: categories[{n}]")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: n + 1 for n, c in enumerate(categories)}     # category id -> 1..C
    if len(label_of) != len(categories):
        raise ValueError(f"{annotation_json}: categories: duplicate category ids")
    class_names = tuple(str(c["name"]) for c in categories)

    per_image, entries = {}, {}
    for n, img in enumerate(data["images"]):
        where = f"{annotation_json}: images[{n}]"
        _require(img, ("id", "file_name"), where)
        if img["id"] in per_image:
            raise ValueError(f"{where}: duplicate image id {img['id']}")
        path = os.path.join(image_dir, img["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where} (id {img['id']}): image file not found: {path}")
        size = (int(img["height"]), int(img["width"])) if "height" in img and "width" in img else None
        per_image[img["id"]] = ([], [], [], [])                       # boxes, labels, crowd, area
        entries[img["id"]] = (path, size)
    for n, ann in enumerate(data.get("annotations", [])):
        where = f"{annotation_json}: annotations[{n}]"
        _require(ann, ("image_id", "category_id", "bbox"), where)
        if ann["image_id"] not in per_image:
            raise ValueError(f"{where}: image_id {ann['image_id']} is not in images")
        if ann["category_id"] not in label_of:
            raise ValueError(f"{where}: category_id {ann['category_id']} is not in categories")
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: bbox must hold four numbers, got {bbox!r}") from None
        if not all(np.isfinite([x, y, w, h])):
            raise ValueError(f"{where}: bbox is not finite: {bbox}")
        if w < 0 or h < 0:
            raise ValueError(f"{where}: bbox has a negative width or height: {bbox}")
        size = entries[ann["image_id"]][1]
        if size is not None and 0 not in size:
            check_inside((x, y, x + w, y + h), size, f"{where} bbox")
        boxes, labels, crowd, area = per_image[ann["image_id"]]
        boxes.append([x, y, x + w, y + h])                            # [x, y, w, h] -> xyxy
        labels.append(label_of[ann["category_id"]])
        crowd.append(bool(ann.get("iscrowd", 0)))
        area.append(float(ann["area"]) if "area" in ann else w * h)

    records = []
    for img in data["images"]:
        boxes, labels, crowd, area = per_image[img["id"]]
        path, size = entries[img["id"]]
        records.append(dict(
            image_id=img["id"], id=os.path.splitext(os.path.basename(img["file_name"]))[0],
            path=path, size=size,
            boxes=as_boxes(np.array(boxes, dtype=np.float32).reshape(-1, 4), f"image {img['id']} boxes"),
            labels=np.array(labels, dtype=np.int64), difficult=np.array(crowd, dtype=bool),
            area=np.array(area, dtype=np.float64)))
    return records, class_names, tuple(c["id"] for c in categories)


def load_coco(annotation_json, image_dir):
    """Load a COCO-style detection dataset, every image decoded (read_coco_annotations reads the
    annotations alone; frcnn_scratch.data.dataset decodes lazily).

    Args:
        annotation_json: path of the JSON file.
        image_dir: folder holding the files named by images[*].file_name.
    Returns:
        (samples, class_names): samples in the order of the JSON's "images" list, each
        dict(image (H, W, 3) float32 in [0, 1], boxes (G, 4) float32 xyxy, labels (G,) int64 in 1..C,
        difficult (G,) bool = iscrowd, id = file name without extension); class_names a tuple of C
        names in label order.
    Raises:
        as read_coco_annotations.
    """
    records, class_names, _ = read_coco_annotations(annotation_json, image_dir)
    samples = []
    for r in records:
        image = read_image(r["path"])
        check_size(image, r["size"], r["path"])
        samples.append(dict(image=image, boxes=r["boxes"], labels=r["labels"],
                            difficult=r["difficult"], id=r["id"]))
    return samples, class_names


def write_coco(json_path, image_dir, samples, class_names, image_format="png"):
    """Write samples as a COCO JSON file plus images, readable by load_coco.

    Image ids are 1..N, category ids 1..C (label = category id), file names "{sample id}.png" (or
    .jpg), difficult boxes are written as iscrowd = 1.

    Args:
        json_path: the JSON file to write (its folder is created if needed).
        image_dir: folder for the images (created if needed).
        samples: list of sample dicts (a grey image is (H, W); a sample's optional "format",
            "png" or "jpg", picks its file format).
        class_names: names in label order.
        image_format: "png" or "jpg" for samples without a format.
    Returns:
        the JSON content as a dict.
    """
    os.makedirs(image_dir, exist_ok=True)
    if os.path.dirname(json_path):
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
    images, annotations = [], []
    for n, sample in enumerate(samples):
        image_id = check_id(sample.get("id", f"{n:06d}"))
        if any(os.path.splitext(img["file_name"])[0] == image_id for img in images):
            raise ValueError(f"samples[{n}]: duplicate id {image_id!r} (its image would be overwritten)")
        image, boxes, labels, difficult = check_sample(sample, n, class_names)
        ext = sample_image_format(sample, image_format)
        file_name = f"{image_id}.{ext}"
        write_image(os.path.join(image_dir, file_name), image, ext)
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


# ---- results files: what a detector found, in COCO's format -------------------------------------------

def write_coco_results(path, detections, image_ids, category_ids, file_names=None):
    """Write detections as a COCO results file, which pycocotools and other COCO tools read.

    Args:
        path: the JSON file.
        detections: one dict per image: boxes (D, 4) xyxy in the image's pixels, scores, labels.
        image_ids: the image id of each entry of detections (the dataset's ids).
        category_ids: category_ids[label - 1] is the category id written for a label.
        file_names: optional image file name per entry, added to each result as "file_name".
    Returns:
        the list of results: dict(image_id, category_id, bbox [x, y, w, h], score) per detection,
        in image order and, within an image, in the detections' order.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"image_ids: expected {len(detections)} ids, one per image, got {len(image_ids)}")
    results = []
    for n, (det, image_id) in enumerate(zip(detections, image_ids)):
        labels = np.asarray(det["labels"], np.int64)
        for box, s, label in zip(xyxy_to_xywh(det["boxes"]).tolist(),
                                 np.asarray(det["scores"], np.float64).tolist(), labels.tolist()):
            entry = dict(image_id=image_id, category_id=category_ids[label - 1], bbox=box, score=s)
            if file_names is not None:
                entry["file_name"] = file_names[n]
            results.append(entry)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f)
    return results


def read_coco_results(path, image_ids, category_ids):
    """Read a COCO results file back as one detection dict per image (in image_ids' order).

    Returns:
        list of dict(boxes_xywh (D, 4) float64 as written, boxes (D, 4) float32 xyxy, scores (D,)
        float64, labels (D,) int64 = 1 + the index of the category in category_ids).
    Raises:
        FileNotFoundError; ValueError naming the file and the entry (not a list, a missing key, an
        image or category the dataset does not have, a malformed box).
    """
    results = _read_json(path, "detections file")
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a list of results (image_id, category_id, bbox, score)")
    index_of = {image_id: i for i, image_id in enumerate(image_ids)}
    label_of = {c: k + 1 for k, c in enumerate(category_ids)}
    per_image = [([], [], []) for _ in image_ids]
    for n, r in enumerate(results):
        where = f"{path}: [{n}]"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected an object, got {r!r:.60}")
        _require(r, ("image_id", "category_id", "bbox", "score"), where)
        if r["image_id"] not in index_of:
            raise ValueError(f"{where}: image_id {r['image_id']!r} is not an image of the dataset")
        if r["category_id"] not in label_of:
            raise ValueError(f"{where}: category_id {r['category_id']!r} is not a class of the model")
        bbox = r["bbox"]
        try:
            x, y, w, h = (float(v) for v in bbox)
            score = float(r["score"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: bbox must be four numbers and score a number") from None
        if not np.all(np.isfinite([x, y, w, h, score])) or w < 0 or h < 0:
            raise ValueError(f"{where}: bbox must be finite with w, h >= 0, got {bbox}")
        boxes, scores, labels = per_image[index_of[r["image_id"]]]
        boxes.append([x, y, w, h])
        scores.append(score)
        labels.append(label_of[r["category_id"]])
    out = []
    for boxes, scores, labels in per_image:
        xywh = np.array(boxes, np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        out.append(dict(boxes_xywh=xywh, boxes=xyxy, scores=np.array(scores, np.float64),
                        labels=np.array(labels, np.int64)))
    return out
