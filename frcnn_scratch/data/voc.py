"""PASCAL VOC loader (and writer): the dataset the Faster R-CNN paper trains and tests on.

Layout under `root` (e.g. VOCdevkit/VOC2007):

    ImageSets/Main/{split}.txt    one image id a line
    Annotations/{id}.xml          size, and per object: name, difficult, bndbox xmin ymin xmax ymax
    JPEGImages/{id}.jpg           (or .png; the XML's <filename> is tried first)

Box convention. VOC stores 1-based, inclusive pixel indices: a box covering the top-left pixel only
is xmin = ymin = xmax = ymax = 1. This project uses continuous 0-based coordinates where pixel i
covers [i, i + 1), so

    x1 = xmin - 1,  y1 = ymin - 1,  x2 = xmax,  y2 = ymax       (and back: xmin = x1 + 1, xmax = x2)

and the width x2 - x1 equals VOC's xmax - xmin + 1.
"""
import os
import xml.etree.ElementTree as ET

import numpy as np

from .._checks import as_boxes
from ._samples import check_sample

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # label = index + 1 (0 is background)


# ---- image files (shared with coco.py) ----------------------------------------------------------------

def read_image(path):
    """Read a JPEG/PNG file as (H, W, 3) float32 RGB in [0, 1] (grey and RGBA are converted)."""
    from PIL import Image   # matplotlib depends on Pillow, so it is always there

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)         # (H, W, 3) in 0..255
    return rgb / np.float32(255.0)


def write_image(path, image):
    """Write an (H, W, 3) float image in [0, 1] as an 8-bit PNG (values rounded to k / 255)."""
    from PIL import Image

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected shape (H, W, 3), got {image.shape}")
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG")


# ---- reading ------------------------------------------------------------------------------------------

def _text(node, tag, path, default=None):
    child = node.find(tag)
    if child is None or child.text is None:
        if default is not None:
            return default
        raise ValueError(f"{path}: missing <{tag}>")
    return child.text.strip()


def _parse_annotation(path, class_names):
    """One XML file -> (filename or None, (height, width) or None, boxes, labels, difficult)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML ({e})") from None
    size = root.find("size")
    hw = None
    if size is not None:
        hw = (int(float(_text(size, "height", path))), int(float(_text(size, "width", path))))
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = _text(obj, "name", path)
        if name not in class_names:
            raise ValueError(f"{path}: unknown class {name!r}; class_names has {list(class_names)}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"{path}: object {name!r} has no <bndbox>")
        xmin, ymin, xmax, ymax = (float(_text(bndbox, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1, ymin - 1, xmax, ymax])               # 1-based inclusive -> continuous
        labels.append(class_names.index(name) + 1)
        difficult.append(int(float(_text(obj, "difficult", path, default="0"))) == 1)
    boxes = as_boxes(np.array(boxes, dtype=np.float32).reshape(-1, 4), f"{path}: bndbox")
    filename = root.findtext("filename")
    return (filename.strip() if filename else None), hw, boxes, labels, difficult


def load_voc(root, split="trainval", class_names=VOC_CLASSES):
    """Load a PASCAL VOC split as a list of samples.

    Args:
        root: folder holding ImageSets/, Annotations/ and JPEGImages/ (e.g. VOCdevkit/VOC2007).
        split: name of the list file ImageSets/Main/{split}.txt ("train", "val", "trainval", "test").
        class_names: the classes, in label order (label = index + 1); an object of another class is
            an error (pass the dataset's own class list).
    Returns:
        list of samples dict(image (H, W, 3) float32 in [0, 1], boxes (G, 4) float32 xyxy continuous,
        labels (G,) int64, difficult (G,) bool, id str), in the order of the list file.
    Raises:
        FileNotFoundError naming the missing file; ValueError for an unknown class or a bad box.
    """
    class_names = tuple(class_names)
    list_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"split list not found: {list_file}")
    with open(list_file) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    samples = []
    for image_id in ids:
        filename, hw, boxes, labels, difficult = _parse_annotation(
            os.path.join(root, "Annotations", f"{image_id}.xml"), class_names)
        candidates = ([filename] if filename else []) + [f"{image_id}.jpg", f"{image_id}.png"]
        paths = [os.path.join(root, "JPEGImages", c) for c in candidates]
        found = [p for p in paths if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"image for {image_id!r} not found; tried {', '.join(paths)}")
        image = read_image(found[0])                                   # (H, W, 3)
        if hw is not None and 0 not in hw and hw != image.shape[:2]:
            raise ValueError(f"{found[0]}: image is {image.shape[:2]} (H, W) but its XML says {hw}")
        samples.append(dict(image=image, boxes=boxes, labels=np.array(labels, dtype=np.int64),
                            difficult=np.array(difficult, dtype=bool), id=image_id))
    return samples


# ---- writing ------------------------------------------------------------------------------------------

def _number(v):
    """Text for a coordinate: an int when whole (VOC's usual form), else a float that reads back exactly."""
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def _check_id(image_id):
    image_id = str(image_id)
    if not image_id or any(c in image_id for c in "/\\ \t\n") or image_id in (".", ".."):
        raise ValueError(f"sample id: {image_id!r} cannot be used as a file name")
    return image_id


def write_voc(root, samples, class_names, split="trainval"):
    """Write samples in VOC layout (PNG images) so that load_voc(root, split, class_names) reads them back.

    Args:
        root: output folder (created if needed).
        samples: list of sample dicts (image, boxes, labels, optional difficult, id).
        class_names: names in label order (label = index + 1).
        split: name of the list file to write, ImageSets/Main/{split}.txt (overwritten).
    Returns:
        list of the ids written.
    """
    class_names = tuple(class_names)
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = []
    for n, sample in enumerate(samples):
        image_id = _check_id(sample.get("id", f"{n:06d}"))
        if image_id in ids:
            raise ValueError(f"samples[{n}]: duplicate id {image_id!r} (its files would be overwritten)")
        image, boxes, labels, difficult = check_sample(sample, n, class_names)

        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = os.path.basename(os.path.abspath(root))
        ET.SubElement(ann, "filename").text = f"{image_id}.png"
        size = ET.SubElement(ann, "size")
        ET.SubElement(size, "width").text = str(image.shape[1])
        ET.SubElement(size, "height").text = str(image.shape[0])
        ET.SubElement(size, "depth").text = "3"
        for (x1, y1, x2, y2), label, diff in zip(boxes, labels, difficult):
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = class_names[label - 1]
            ET.SubElement(obj, "truncated").text = "0"
            ET.SubElement(obj, "difficult").text = "1" if diff else "0"
            bndbox = ET.SubElement(obj, "bndbox")
            # continuous -> VOC 1-based inclusive (see the module docstring)
            for tag, v in (("xmin", float(x1) + 1), ("ymin", float(y1) + 1), ("xmax", x2), ("ymax", y2)):
                ET.SubElement(bndbox, tag).text = _number(v)
        ET.indent(ann)
        ET.ElementTree(ann).write(os.path.join(root, "Annotations", f"{image_id}.xml"))
        write_image(os.path.join(root, "JPEGImages", f"{image_id}.png"), image)
        ids.append(image_id)
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in ids))
    return ids
