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
from ._samples import (check_declared_size, check_id, check_inside, check_sample, image_side,
                       inside_folder, read_text_lines)
from .images import check_size, image_header, read_image, sample_image_format, write_image

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # label = index + 1 (0 is background)


# ---- reading ------------------------------------------------------------------------------------------

def _text(node, tag, path, default=None):
    child = node.find(tag)
    if child is None or child.text is None:
        if default is not None:
            return default
        raise ValueError(f"{path}: missing <{tag}>")
    return child.text.strip()


def _read_number(node, tag, path, default=None, where=None):
    """The number in <tag> of `node`; a ValueError naming the file and the tag otherwise."""
    text = _text(node, tag, path, default)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: {where or ''}<{tag}> is not a number: {text[:40]!r}") from None


def _read_size(root, path):
    """(height, width) from <size>, whole numbers of pixels (a fraction, inf or NaN is refused,
    not truncated); None without <size>."""
    size = root.find("size")
    if size is None:
        return None
    return tuple(image_side(_read_number(size, tag, path, where="<size>"), f"{path}: <size><{tag}>")
                 for tag in ("height", "width"))


def _parse_annotation(path):
    """One XML file -> (filename or None, (height, width) or None, objects [(name, box, difficult)]).

    box is the object's continuous (x1, y1, x2, y2), checked: finite, x2 >= x1, y2 >= y1, and
    inside the image when the XML gives its size (a pixel of slack for tools that round;
    read_voc_split checks the others against their image file's size).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML ({e})") from None
    hw = _read_size(root, path)
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = _text(obj, "name", path)
        if not name:
            raise ValueError(f"{path}: object {k}: <name> is empty; every object needs its class")
        where = f"{path}: object {k} ({name!r})"
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"{where} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_read_number(bndbox, t, path, where=f"object {k} ")
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        box = as_boxes([[xmin - 1, ymin - 1, xmax, ymax]],                # 1-based inclusive ->
                       f"{where} bndbox")[0]                             # continuous
        if hw is not None and 0 not in hw:
            check_inside(box, hw, f"{where} bndbox")
        difficult = _read_number(obj, "difficult", path, default="0", where=f"object {k} ")
        if difficult not in (0, 1):
            raise ValueError(f"{where}: <difficult> must be 0 or 1, got {difficult:g}")
        objects.append((name, box, difficult == 1))
    filename = root.findtext("filename")
    return (filename.strip() if filename and filename.strip() else None), hw, objects


def _split_ids(list_file):
    """The image ids a split's list file gives, one a line (the first word; blank lines skipped);
    an id must name files inside the dataset's folders."""
    ids = []
    for n, line in enumerate(read_text_lines(list_file, "a split's list of image ids")):
        if not line.strip():
            continue
        image_id = line.split()[0]
        try:
            check_id(image_id)
        except ValueError:
            raise ValueError(f"{list_file}: line {n + 1}: {image_id!r} cannot be an image id "
                             "(ids name files inside the dataset's folders)") from None
        ids.append(image_id)
    return ids


def _check_classes(objects, class_names, xml):
    for k, (name, _, _) in enumerate(objects):
        if name not in class_names:
            raise ValueError(f"{xml}: object {k}: unknown class {name!r}; the classes are "
                             f"{list(class_names)}")


def read_voc_split(root, split="trainval", class_names=None):
    """Read a VOC split's annotations and find its image files, reading only each image's header.

    Args:
        root: folder holding ImageSets/, Annotations/ and JPEGImages/ (e.g. VOCdevkit/VOC2007).
        split: name of the list file ImageSets/Main/{split}.txt.
        class_names: the classes in label order (label = index + 1); an object of another class
            is an error naming the file and the class.  None: the names found in the split's
            annotations, sorted.
    Returns:
        (records, class_names): one dict per image, in the list file's order: id, file_name,
        path (the image file), size ((H, W) as shown, from the file's header, which the XML's
        <size> must match), boxes (G, 4) float32 continuous, labels (G,) int64, difficult (G,) bool.
    Raises:
        FileNotFoundError naming the missing file (list, annotation or image); ValueError naming
        the file and the field (malformed XML, unknown class or an empty <name>, bad or outside
        box, a size that is not a whole number or not the image's, a <filename> or id that
        leaves the dataset's folders, a list file that is not UTF-8, an empty split).
    """
    list_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"split list not found: {list_file}")
    ids = _split_ids(list_file)
    if not ids:
        raise ValueError(f"{list_file}: the split lists no image")
    parsed = []
    images = os.path.join(root, "JPEGImages")
    for image_id in ids:
        xml = os.path.join(root, "Annotations", f"{image_id}.xml")
        filename, hw, objects = _parse_annotation(xml)
        if class_names is not None:
            _check_classes(objects, class_names, xml)
        paths = ([inside_folder(images, filename, f"{xml}: <filename>")] if filename else []) + \
            [os.path.join(images, c) for c in (f"{image_id}.jpg", f"{image_id}.png")]
        found = [p for p in paths if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"{xml}: image for {image_id!r} not found; tried {', '.join(paths)}")
        size = check_declared_size(hw, image_header(found[0]), f"{xml}: <size>", found[0])
        if hw is None or 0 in hw:                    # boxes not yet checked against a size
            for k, (name, box, _) in enumerate(objects):
                check_inside(box, size, f"{xml}: object {k} ({name!r}) bndbox")
        parsed.append((image_id, xml, found[0], size, objects))
    if class_names is None:
        class_names = sorted({name for *_, objects in parsed for name, _, _ in objects})
    class_names = tuple(class_names)
    records = []
    for image_id, xml, path, hw, objects in parsed:
        _check_classes(objects, class_names, xml)
        records.append(dict(
            id=image_id, file_name=os.path.basename(path), path=path, size=hw,
            boxes=np.array([b for _, b, _ in objects], np.float32).reshape(-1, 4),
            labels=np.array([class_names.index(n) + 1 for n, _, _ in objects], np.int64),
            difficult=np.array([d for _, _, d in objects], bool)))
    return records, class_names


def load_voc(root, split="trainval", class_names=VOC_CLASSES):
    """Load a PASCAL VOC split as a list of samples (every image decoded; read_voc_split reads the
    annotations alone, frcnn_scratch.data.dataset decodes lazily).

    Args:
        root: folder holding ImageSets/, Annotations/ and JPEGImages/ (e.g. VOCdevkit/VOC2007).
        split: name of the list file ImageSets/Main/{split}.txt ("train", "val", "trainval", "test").
        class_names: the classes, in label order (label = index + 1); an object of another class is
            an error (pass the dataset's own class list; None: the names found, sorted).
    Returns:
        list of samples dict(image (H, W, 3) float32 in [0, 1], boxes (G, 4) float32 xyxy continuous,
        labels (G,) int64, difficult (G,) bool, id str), in the order of the list file.
    Raises:
        FileNotFoundError naming the missing file; ValueError for an unknown class or a bad box.
    """
    records, _ = read_voc_split(root, split, class_names)
    samples = []
    for r in records:
        image = read_image(r["path"])                                  # (H, W, 3)
        check_size(image, r["size"], r["path"])
        samples.append(dict(image=image, boxes=r["boxes"], labels=r["labels"],
                            difficult=r["difficult"], id=r["id"]))
    return samples


# ---- writing ------------------------------------------------------------------------------------------

def _number(v):
    """Text for a coordinate: an int when whole (VOC's usual form), else a float that reads back exactly."""
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def write_voc(root, samples, class_names, split="trainval", image_format="png"):
    """Write samples in VOC layout so that load_voc(root, split, class_names) reads them back.

    Args:
        root: output folder (created if needed).
        samples: list of sample dicts (image (H, W, 3) or grey (H, W), boxes, labels, optional
            difficult, id, and optional format "png" / "jpg" for this sample's image file).
        class_names: names in label order (label = index + 1).
        split: name of the list file to write, ImageSets/Main/{split}.txt (overwritten).
        image_format: "png" (lossless) or "jpg" (JPEG, lossy), for samples without a format.
    Returns:
        list of the ids written.
    """
    class_names = tuple(class_names)
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = []
    for n, sample in enumerate(samples):
        image_id = check_id(sample.get("id", f"{n:06d}"))
        if image_id in ids:
            raise ValueError(f"samples[{n}]: duplicate id {image_id!r} (its files would be overwritten)")
        image, boxes, labels, difficult = check_sample(sample, n, class_names)
        ext = sample_image_format(sample, image_format)

        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = os.path.basename(os.path.abspath(root))
        ET.SubElement(ann, "filename").text = f"{image_id}.{ext}"
        size = ET.SubElement(ann, "size")
        ET.SubElement(size, "width").text = str(image.shape[1])
        ET.SubElement(size, "height").text = str(image.shape[0])
        ET.SubElement(size, "depth").text = "1" if image.ndim == 2 else "3"
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
        write_image(os.path.join(root, "JPEGImages", f"{image_id}.{ext}"), image, ext)
        ids.append(image_id)
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in ids))
    return ids
