"""Checks that the VOC and COCO formats share: a sample to write, its id as a file name, a box
inside its image; and the values read from annotation files (numbers, ids, sizes, class names,
file names that must stay inside their folder), each refused with one line naming the file,
the entry and the field."""
import json
import os

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


def check_declared_size(declared, header, where, path):
    """The (H, W) an annotation declares must be the size its image file is shown at (EXIF
    orientation applied, as viewers show it); None or a 0 side means not declared.  Returns the
    file's (H, W) as shown."""
    shown, stored = header["size"], header["stored"]
    if declared is None or 0 in declared or tuple(declared) == shown:
        return shown
    (h, w), (dh, dw) = shown, declared
    if tuple(declared) == stored:
        raise ValueError(f"{where}: declares {dw} x {dh} (width x height), the size {path} is "
                         f"stored at, but its EXIF orientation ({header['orientation']}) shows it "
                         f"turned, as {w} x {h}; annotate the picture as viewers show it")
    raise ValueError(f"{where}: declares {dw} x {dh} (width x height) but {path} is {w} x {h}")


def check_id(image_id):
    """A sample's id as the stem of its files' names: no separator, no space, not "." or ".."."""
    image_id = str(image_id)
    if not image_id or any(c in image_id for c in "/\\ \t\n") or image_id in (".", ".."):
        raise ValueError(f"sample id: {image_id!r} cannot be used as a file name")
    return image_id


# ---- values read from annotation files: each checked, errors naming the file, entry and field ----

def _kind(value):
    """A short description of a JSON value for messages: 'a list', "the string '12'", ..."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def is_number(value):
    """A JSON number (int or float; not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(value, where, minimum=None):
    """A finite JSON number (>= minimum when given) as a float; else a ValueError at `where`."""
    if not is_number(value) or not np.isfinite(value) or (minimum is not None and value < minimum):
        want = "a finite number" + ("" if minimum is None else f" >= {minimum:g}")
        raise ValueError(f"{where}: expected {want}, got {_kind(value)}")
    return float(value)


MAX_SIDE = 1 << 20   # the most pixels an image side may declare (Pillow's own limit is 2**31)


def image_side(value, where):
    """An image side (height or width): a whole number of pixels, 0..MAX_SIDE (0: not given, as
    some tools write).  A fraction is refused, not truncated."""
    if not (is_number(value) and np.isfinite(value) and float(value).is_integer()
            and 0 <= value <= MAX_SIDE):
        raise ValueError(f"{where}: expected a whole number of pixels (0 to {MAX_SIDE}), "
                         f"got {_kind(value)}")
    return int(value)


def an_id(value, where):
    """An image or category id: an int or a string (not a bool, a float, a list...)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: expected an int (or a string) id, got {_kind(value)}")
    return value


def a_list(value, where):
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {_kind(value)}")
    return value


def an_object(value, where):
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {_kind(value)}")
    return value


def class_name(value, where):
    """A class name: a non-empty string, not only spaces."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a non-empty class name, got {_kind(value)}")
    return value


def unique_names(names, wheres):
    """Class names must be unique: a repeat is named with both of its places."""
    first = {}
    for name, where in zip(names, wheres):
        if name in first:
            raise ValueError(f"{where}: class name {name!r} repeats {first[name]}'s; class "
                             "names must be unique")
        first[name] = where


def inside_folder(folder, name, where):
    """folder/name for a file name an annotation gives, which must stay inside the folder: no
    absolute path, no '..' that climbs out of it, no NUL."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: expected a file name, got {_kind(name)}")
    parts = name.replace("\\", "/").split("/")
    if (os.path.isabs(name) or name.startswith(("/", "\\")) or "\0" in name
            or os.path.normpath(name).replace("\\", "/").split("/")[0] == ".."
            or (len(parts[0]) == 2 and parts[0][1] == ":")):
        raise ValueError(f"{where}: file name {name!r} leaves the image folder {folder}; "
                         "give a name relative to it")
    return os.path.join(folder, name)


def read_text_lines(path, what):
    """The lines of a UTF-8 text file (a byte-order mark is dropped); an error naming the file
    and the line when it is not UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({what})") from None
    return text.splitlines()


def read_json(path, what):
    """The JSON content of a file; a missing file, malformed JSON, text that is not UTF-8 or
    nesting too deep to read is one error naming it.  A UTF-8 byte-order mark is allowed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text at byte {e.start}") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deep to read)") from None
    except ValueError as e:                  # JSONDecodeError, and ints too long to convert
        raise ValueError(f"{path}: not valid JSON ({str(e)[:200]})") from None
