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
import tempfile

import numpy as np

from .._checks import as_boxes
from ..boxes import xyxy_to_xywh
from ._samples import (_kind, a_list, an_id, an_object, check_declared_size, check_id, check_inside,
                       check_sample, class_name, inside_folder, is_number, image_side, number,
                       read_json, unique_names)
from .images import check_size, image_header, read_image, sample_image_format, write_image


def _require(entry, keys, where):
    an_object(entry, where)
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def _bbox(value, where):
    """[x, y, w, h]: four finite numbers (not strings, not booleans), w and h >= 0."""
    if not isinstance(value, list) or len(value) != 4 or not all(is_number(v) for v in value):
        raise ValueError(f"{where}: expected [x, y, w, h], four numbers, got "
                         f"{json.dumps(value)[:60]}")
    x, y, w, h = (float(v) for v in value)
    if not all(np.isfinite([x, y, w, h])):
        raise ValueError(f"{where}: bbox is not finite: {value}")
    if w < 0 or h < 0:
        raise ValueError(f"{where}: bbox has a negative width or height: {value}")
    return x, y, w, h


def _iscrowd(value, where):
    """COCO's iscrowd: 0 or 1 (JSON's false / true too); a string such as "0" is refused rather
    than read as true."""
    if isinstance(value, bool) or (is_number(value) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{where}: expected 0 or 1, got {_kind(value)}")


def _image_size(img, where, path):
    """The (H, W) an images entry declares, checked against its file's header (the size the
    picture is shown at, EXIF orientation applied): the file's size when none is declared."""
    header = image_header(path)
    declared = None
    if "height" in img or "width" in img:
        declared = (image_side(img.get("height", 0), f"{where}.height"),
                    image_side(img.get("width", 0), f"{where}.width"))
    return check_declared_size(declared, header, where, path)


def read_coco_annotations(annotation_json, image_dir):
    """Read a COCO JSON file and find its image files, reading only each file's header.

    Args:
        annotation_json: path of the JSON file.
        image_dir: folder holding the files named by images[*].file_name (names must stay in it).
    Returns:
        (records, class_names, category_ids): one record per entry of "images", in that order:
        dict(image_id (COCO's id), id (file name without extension), file_name, path, size
        ((H, W) as shown, from the file's header, which the entry's height and width must match),
        boxes (G, 4) float32 xyxy, labels (G,) int64 in 1..C, difficult (G,) bool = iscrowd,
        area (G,) float64 = the annotations' area, or the box area where absent); class_names
        the C names in label order; category_ids the C COCO category ids, label
        k = category_ids[k - 1].
    Raises:
        FileNotFoundError naming the JSON file or the missing image; ValueError naming the file,
        the entry and the field for malformed JSON, a missing key, a value of the wrong type (a
        string for a number, a list for an id, a fraction or Infinity for a size), an unknown
        image or category, a negative box size or a box outside its image, duplicate ids or
        class names, a declared size that is not the file's, no images.
    """
    data = read_json(annotation_json, "annotation file")
    if not isinstance(data, dict):
        raise ValueError(f"{annotation_json}: expected a JSON object with images and categories")
    _require(data, ("images", "categories"), annotation_json)
    images = a_list(data["images"], f"{annotation_json}: images")
    categories = a_list(data["categories"], f"{annotation_json}: categories")
    annotations = a_list(data.get("annotations", []), f"{annotation_json}: annotations")
    if not images:
        raise ValueError(f"{annotation_json}: 'images' is empty: no image to read")

    where_of = {}
    for n, c in enumerate(categories):
        where = f"{annotation_json}: categories[{n}]"
        _require(c, ("id", "name"), where)
        an_id(c["id"], f"{where}.id")
        class_name(c["name"], f"{where}.name")
        if c["id"] in where_of:
            raise ValueError(f"{where}: duplicate category id {c['id']!r} "
                             f"({where_of[c['id']].split(': ')[-1]} has it too)")
        where_of[c["id"]] = where
    unique_names([c["name"] for c in categories],
                 [f"{annotation_json}: categories[{n}].name" for n in range(len(categories))])
    try:
        categories = sorted(categories, key=lambda c: c["id"])
    except TypeError:
        raise ValueError(f"{annotation_json}: categories: ids mix ints and strings") from None
    label_of = {c["id"]: n + 1 for n, c in enumerate(categories)}     # category id -> 1..C
    class_names = tuple(c["name"] for c in categories)

    per_image, entries = {}, {}
    for n, img in enumerate(images):
        where = f"{annotation_json}: images[{n}]"
        _require(img, ("id", "file_name"), where)
        image_id = an_id(img["id"], f"{where}.id")
        if image_id in per_image:
            raise ValueError(f"{where}: duplicate image id {image_id!r}")
        path = inside_folder(image_dir, img["file_name"], f"{where}.file_name")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where} (id {image_id!r}): image file not found: {path}")
        size = _image_size(img, where, path)
        if per_image and type(image_id) is not type(next(iter(per_image))):
            raise ValueError(f"{where}.id: {image_id!r}, but images[0]'s id is "
                             f"{next(iter(per_image))!r}: ids must all be ints or all strings")
        per_image[image_id] = ([], [], [], [])                        # boxes, labels, crowd, area
        entries[image_id] = (path, size)
    for n, ann in enumerate(annotations):
        where = f"{annotation_json}: annotations[{n}]"
        _require(ann, ("image_id", "category_id", "bbox"), where)
        image_id = an_id(ann["image_id"], f"{where}.image_id")
        category_id = an_id(ann["category_id"], f"{where}.category_id")
        if image_id not in per_image:
            raise ValueError(f"{where}: image_id {image_id!r} is not in images")
        if category_id not in label_of:
            raise ValueError(f"{where}: category_id {category_id!r} is not in categories")
        x, y, w, h = _bbox(ann["bbox"], f"{where}.bbox")
        check_inside((x, y, x + w, y + h), entries[image_id][1], f"{where} bbox")
        boxes, labels, crowd, area = per_image[image_id]
        boxes.append([x, y, x + w, y + h])                            # [x, y, w, h] -> xyxy
        labels.append(label_of[category_id])
        crowd.append(_iscrowd(ann.get("iscrowd", 0), f"{where}.iscrowd"))
        area.append(number(ann["area"], f"{where}.area", minimum=0) if "area" in ann else w * h)

    records = []
    for img in images:
        boxes, labels, crowd, area = per_image[img["id"]]
        path, size = entries[img["id"]]
        records.append(dict(
            image_id=img["id"], id=os.path.splitext(os.path.basename(img["file_name"]))[0],
            file_name=img["file_name"], path=path, size=size,
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
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:                                          # a kill mid-write leaves no half file
        with os.fdopen(fd, "w") as f:
            json.dump(results, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return results


def read_coco_results(path, image_ids, category_ids, file_names=None):
    """Read a COCO results file back as one detection dict per image (in image_ids' order).

    Args:
        path: the JSON file (a list of dict(image_id, category_id, bbox, score[, file_name])).
        image_ids: the dataset's image ids; category_ids: its category ids, label k + 1 each.
        file_names: the dataset's file name of each image (None for an image held in memory),
            or None not to check.  A result that gives a file_name must name its image's file
            (compared without folders): a results file that `frcnn detect a.png b.png` wrote
            for its own images 1, 2 is not scored against the dataset's images 1, 2.
    Returns:
        list of dict(boxes_xywh (D, 4) float64 as written, boxes (D, 4) float32 xyxy, scores (D,)
        float64, labels (D,) int64 = 1 + the index of the category in category_ids).
    Raises:
        FileNotFoundError; ValueError naming the file, the entry and the field (not a list, a
        missing key, an id that is a bool, a float or a list, a bbox or score that is not made of
        numbers, an image or category the dataset does not have, another image's file name).
    """
    results = read_json(path, "detections file")
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a list of results (image_id, category_id, bbox, score)")
    index_of = {image_id: i for i, image_id in enumerate(image_ids)}
    label_of = {c: k + 1 for k, c in enumerate(category_ids)}
    per_image = [([], [], []) for _ in image_ids]
    for n, r in enumerate(results):
        where = f"{path}: [{n}]"
        _require(r, ("image_id", "category_id", "bbox", "score"), where)
        image_id = an_id(r["image_id"], f"{where}.image_id")
        category_id = an_id(r["category_id"], f"{where}.category_id")
        if image_id not in index_of:
            raise ValueError(f"{where}: image_id {image_id!r} is not an image of the dataset")
        if category_id not in label_of:
            raise ValueError(f"{where}: category_id {category_id!r} is not a class of the model")
        x, y, w, h = _bbox(r["bbox"], f"{where}.bbox")
        score = number(r["score"], f"{where}.score")
        i = index_of[image_id]
        if file_names is not None and "file_name" in r:
            _check_file_name(r["file_name"], file_names[i], image_id, f"{where}.file_name")
        boxes, scores, labels = per_image[i]
        boxes.append([x, y, w, h])
        scores.append(score)
        labels.append(label_of[category_id])
    out = []
    for boxes, scores, labels in per_image:
        xywh = np.array(boxes, np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        out.append(dict(boxes_xywh=xywh, boxes=xyxy, scores=np.array(scores, np.float64),
                        labels=np.array(labels, np.int64)))
    return out


def _check_file_name(given, own, image_id, where):
    """A result's file_name must be its image's (folders aside)."""
    if not isinstance(given, str):
        raise ValueError(f"{where}: expected a file name, got {_kind(given)}")
    if own is None:
        raise ValueError(f"{where}: {given!r}, but image {image_id!r} of the dataset is no file; "
                         "this results file was written for other images")
    if os.path.basename(given.replace("\\", "/")) != os.path.basename(str(own).replace("\\", "/")):
        raise ValueError(f"{where}: {given!r} is not image {image_id!r}'s file ({own!r}); this "
                         "results file was written for other images")
