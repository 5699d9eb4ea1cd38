"""Datasets and transforms. A sample is dict(image=(H, W, 3) float32 in [0, 1], boxes=(G, 4) float32
xyxy, labels=(G,) int64 in 1..num_classes (0 is background), difficult=(G,) bool, id=str).

    shapes.py      make_shapes_dataset(num_images, seed): synthetic filled shapes, no download
    images.py      read_image(path), write_image(path, image): image files (PNG, JPEG, ...), shown
                   as viewers show them (EXIF orientation), reduced before they become float
    voc.py         load_voc(root, split): PASCAL VOC layout (XML annotations); write_voc
    coco.py        load_coco(annotation_json, image_dir): COCO JSON; write_coco
    transforms.py  resize(sample, min_size, max_size), hflip(sample)
    dataset.py     open_dataset("shapes" | "voc:ROOT" | "coco:ANN.json:IMAGES"): read lazily,
                   resized, kept once used twice; what `frcnn --data` opens
"""
from .coco import load_coco, write_coco
from .dataset import Dataset, open_dataset
from .shapes import SHAPE_CLASSES, make_shapes_dataset
from .transforms import hflip, resize
from .voc import VOC_CLASSES, load_voc, write_voc

__all__ = ["SHAPE_CLASSES", "VOC_CLASSES", "Dataset", "hflip", "load_coco", "load_voc",
           "make_shapes_dataset", "open_dataset", "resize", "write_coco", "write_voc"]
