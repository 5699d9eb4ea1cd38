"""The check of one sample that both dataset writers (voc.write_voc, coco.write_coco) make."""
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
