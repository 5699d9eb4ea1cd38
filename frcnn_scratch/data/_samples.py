"""Checks that the VOC and COCO formats share: a sample to write, its id as a file name, a box
inside its image."""
import numpy as np

from .._checks import as_boxes, as_labels


def check_sample(sample, n, class_names):
    """samples[n] -> (image, boxes (G, 4) float32, labels (G,) int64 in 1..C, difficult (G,) bool).

    Missing boxes / labels / difficult mean none (an image without objects); C = len(class_names).
    A bad entry is a ValueError naming samples[n] and the key.
    """
    image = np.asarray(sample["image"])
    boxes = as_boxes(sample.get("boxes", np.zeros((0, 4))), f"samples[{n}]['boxes']")
    labels = np.asarray(sample.get("labels", np.zeros(0, np.int64)))
    difficult = np.asarray(sample.get("difficult", np.zeros(len(labels), bool)), dtype=bool)
    if len(labels) != len(boxes) or len(difficult) != len(boxes):
        raise ValueError(f"samples[{n}]: {len(boxes)} boxes but {len(labels)} labels and "
                         f"{len(difficult)} difficult flags")
    labels = as_labels(labels, f"samples[{n}]['labels']", 1, len(class_names))   # (G,) int64
    return image, boxes, labels, difficult


def check_inside(box, hw, where, slack=1.0):
    """A box (x1, y1, x2, y2) must lie inside an image of (height, width), within `slack` pixels."""
    h, w = hw
    x1, y1, x2, y2 = (float(v) for v in box)
    if x1 < -slack or y1 < -slack or x2 > w + slack or y2 > h + slack:
        raise ValueError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the "
                         f"{w} x {h} image")


def check_id(image_id):
    """A sample's id as the stem of its files' names: no separator, no space, not "." or ".."."""
    image_id = str(image_id)
    if not image_id or any(c in image_id for c in "/\\ \t\n") or image_id in (".", ".."):
        raise ValueError(f"sample id: {image_id!r} cannot be used as a file name")
    return image_id
