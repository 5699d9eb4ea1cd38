"""The dataset behind `frcnn train / eval / detect --data`: shapes, Pascal VOC or COCO, read lazily.

    open_dataset("shapes", num_images=1000, seed=0)        the synthetic shapes, drawn when used
    open_dataset("shapes-hard", ...)                       the harder mode (shapes.SHAPES_HARD)
    open_dataset("voc:ROOT", split="trainval")             a VOCdevkit-style folder (voc.py)
    open_dataset("coco:ANNOTATIONS.json:IMAGE_DIR")        a COCO JSON file and its images (coco.py)

Opening reads and checks every annotation, finds every image file and reads its header (so a bad
file, or a size the annotation gets wrong, is reported before training starts, by name).  An image
is decoded when it is used, shrunk by whole blocks while still integers when it is much bigger
than the model's scale, and resized by the paper's rule (shorter side `min_size`, longer side at
most `max_size`; transforms.resize).  An image used a second time is kept (up to CACHE_BYTES):
training, which comes back to its images, decodes each file at most twice, while an evaluation or
a detection run, which uses each image once, keeps none, and its memory stays flat however many
files there are.  The cache holds 8-bit pixels, the precision of the files themselves, so a
128 x 170 image costs 65 KB.

An item, dataset[i], is a training / inference sample at the model's scale: dict(image (h, w, 3)
float32 in [0, 1], boxes (G, 4) float32, labels (G,) int64 in 1..C, difficult (G,) bool, id,
image_id, scale).  dataset.ground_truth(i) gives the boxes in the original image's pixels, where
detections are scored: a detection on the resized image maps back as boxes / scale.

Difficult (VOC) and crowd (COCO) objects are marked `difficult`: the training loop leaves them out
of the targets, and the metrics ignore them (VOC AP) or treat them as crowd regions (COCO AP).
"""
import hashlib
import os
from collections.abc import Sequence

import numpy as np

from ..rescale import compute_scale, resize_image
from .coco import read_coco_annotations
from .images import check_size, image_header, read_image, read_image_reduced, read_image_reduced_by
from .shapes import SHAPE_CLASSES, SHAPES_HARD, make_shapes_sample
from .voc import read_voc_split


CACHE_BYTES = 1 << 30   # decoded images kept in memory at most (8-bit pixels at the model's scale)


class Dataset(Sequence):
    """Images with their annotations; items resized when used, and kept once used twice
    (module docstring).

    Args:
        records: one dict per image: image_id (int), id (str), path (an image file) or image (an
            (H, W, 3) float32 array in memory), size ((H, W) as shown, or None: read from the
            file's header), boxes (G, 4), labels (G,), difficult (G,), optional area (G,) (COCO's
            annotated area), optional file_name (the name a results file gives the image).
        class_names: the C class names, label k = class_names[k - 1].
        category_ids: the id a results file gives label k (COCO's category ids; default 1..C).
        min_size, max_size: the resize rule; 0 / None keeps images at their own size.
        spec: what was opened ("voc:ROOT" ...), for messages and checkpoints.
        cache_bytes: the most bytes of pixels kept.
    """

    def __init__(self, records, class_names, category_ids=None, min_size=None, max_size=None,
                 spec="data", cache_bytes=CACHE_BYTES):
        self.records = list(records)
        self.class_names = tuple(class_names)
        self.category_ids = tuple(category_ids or range(1, len(self.class_names) + 1))
        self.min_size = float(min_size or 0)
        self.max_size = float(max_size or 0)
        if (self.min_size > 0) != (self.max_size > 0):
            raise ValueError(f"min_size, max_size: give both or neither, got {min_size!r}, {max_size!r}")
        self.spec = spec
        self.cache_bytes = int(cache_bytes)
        self._cache = {}            # index -> (record, pixels, scale): images used twice or more
        self._seen = set()          # indices used once, not (yet) kept
        self._cached_bytes = 0

    def __len__(self):
        return len(self.records)

    def record(self, i):
        """Image i's annotation record (see the class docstring)."""
        return self.records[i]

    @property
    def image_ids(self):
        return [self.record(i)["image_id"] for i in range(len(self))]

    @property
    def file_names(self):
        """The file name of each image (None for an image held in memory): what a results file
        written by `frcnn detect FILE...` names its images by."""
        return [self.record(i).get("file_name") for i in range(len(self))]

    def fingerprint(self):
        """A short hash of what the images and their objects are (for checkpoints: a resume on
        other data is refused)."""
        digest = hashlib.sha256()
        for i in range(len(self)):
            r = self.record(i)
            digest.update(f"{r.get('id')}:{len(r['labels'])}:".encode())
            digest.update(np.asarray(r["boxes"], np.float32).tobytes())
        return digest.hexdigest()[:16]

    def original_image(self, i):
        """Image i as stored (H, W, 3) float32 in [0, 1], decoded anew (not cached)."""
        r = self.record(i)
        if r.get("image") is not None:
            return np.asarray(r["image"], np.float32)
        image = read_image(r["path"])
        check_size(image, r.get("size"), r["path"])
        return image

    def picture(self, i, max_side):
        """Image i at about max_side pixels on its longer side, for drawing: (image (h, w, 3)
        float32, (fy, fx) original pixels per pixel of it); a file is decoded reduced
        (images.read_image_reduced), an image in memory is returned as it is."""
        r = self.record(i)
        if r.get("image") is not None:
            return np.asarray(r["image"], np.float32), (1.0, 1.0)
        return read_image_reduced(r["path"], max_side)

    def _load(self, r):
        """Record r's image at the model's scale: (pixels, scale).  Pixels from a file are 8-bit
        (h, w) grey or (h, w, 3) colour, as precise as the files themselves and 4x smaller than
        float32; a big file is shrunk by whole blocks while it is decoded (reduce_factor), then
        resized to the exact size.  An in-memory image at its own size is kept as it is."""
        if r.get("image") is not None:
            image = np.asarray(r["image"], np.float32)
            scale = 1.0
            if self.min_size > 0:
                scale, h, w = compute_scale(*image.shape[:2], self.min_size, self.max_size)
                if (h, w) != image.shape[:2]:
                    image = resize_image(image, h, w)
            if scale == 1.0:
                return image, scale
            return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), scale
        path = r["path"]
        height, width = r.get("size") or image_header(path)["size"]
        scale, h, w = 1.0, height, width
        if self.min_size > 0:
            scale, h, w = compute_scale(height, width, self.min_size, self.max_size)
        image, used = read_image_reduced_by(path, reduce_factor((height, width), (h, w)))
        want = (-(-height // used), -(-width // used))
        if image.shape[:2] != want:
            raise ValueError(f"{path}: image is {image.shape[:2]} (H, W) but it was {want} "
                             "when the data was opened; has the file changed?")
        if (h, w) != image.shape[:2] or used > 1:
            image = resize_image(image, h, w, extent=(height / used, width / used))
        return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), scale

    def _item(self, i):
        """(record, pixels, scale) of image i: from the cache, or decoded; an image used a
        second time is kept while the cache holds less than cache_bytes.  Images used once (an
        evaluation, a detection run) are never kept, so memory stays flat however many there
        are; training, which comes back to its images, decodes each at most twice."""
        if i in self._cache:
            return self._cache[i]
        r = self.record(i)
        pixels, scale = self._load(r)
        if i not in self._seen:
            self._seen.add(i)
        elif self._cached_bytes + pixels.nbytes <= self.cache_bytes:
            self._seen.discard(i)
            self._cache[i] = (r, pixels, scale)
            self._cached_bytes += pixels.nbytes
        return r, pixels, scale

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of a dataset of {len(self)}")
        i = i % len(self)
        r, pixels, scale = self._item(i)
        image = pixels if pixels.dtype == np.float32 else pixels.astype(np.float32) / np.float32(255)
        if image.ndim == 2:                                          # grey: the same value in
            image = np.repeat(image[:, :, None], 3, axis=2)          # R, G and B
        h, w = image.shape[:2]
        boxes = np.asarray(r["boxes"], np.float32) * np.float32(scale)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)               # within the slack the
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)               # loaders allow
        return dict(image=image, boxes=boxes, labels=np.asarray(r["labels"], np.int64),
                    difficult=np.asarray(r["difficult"], bool), id=r["id"],
                    image_id=r["image_id"], scale=scale)

    def ground_truth(self, i):
        """Image i's objects in its original pixels: dict(boxes, labels, difficult, crowd, area)."""
        r = self.record(i)
        boxes = np.asarray(r["boxes"], np.float32)
        area = r.get("area")
        return dict(boxes=boxes, labels=np.asarray(r["labels"], np.int64),
                    difficult=np.asarray(r["difficult"], bool),
                    crowd=np.asarray(r["difficult"], bool),
                    area=None if area is None else np.asarray(area, np.float64))


def reduce_factor(size, target):
    """The whole factor a picture of `size` (H, W) may be shrunk by, in blocks, before it is
    resized to `target` (h, w): half the ratio, so that the bilinear resize still has two
    pixels or more for each of its own; 1 (no shrinking) below a ratio of 4."""
    return max(1, int(min(size[0] / target[0], size[1] / target[1]) // 2))


class ShapesDataset(Dataset):
    """The synthetic shapes, drawn when used: image i comes from its own generator
    (make_shapes_sample with np.random.default_rng([seed, i]), exactly as make_shapes_dataset
    draws it), so a million images cost no memory until used, and the cache keeps those used
    twice, while they fit.  class_names: a model's classes, onto which the shapes' labels are
    mapped by name (None: the shapes' own order)."""

    def __init__(self, num_images, seed, min_size=None, max_size=None, cache_bytes=CACHE_BYTES,
                 class_names=None, **options):
        names = SHAPE_CLASSES if class_names is None else tuple(class_names)
        super().__init__([], names, None, min_size, max_size, spec="shapes",
                         cache_bytes=cache_bytes)
        self.num_images, self.seed, self.options = int(num_images), int(seed), options
        self._to_model = label_map(SHAPE_CLASSES, names, "shapes")

    def __len__(self):
        return self.num_images

    def record(self, i):
        if i in self._cache:
            return self._cache[i][0]
        s = make_shapes_sample(np.random.default_rng([self.seed, i]),
                               sample_id=f"shapes-{self.seed}-{i:06d}", **self.options)
        return dict(image_id=i + 1, id=s["id"], image=s["image"], size=None, boxes=s["boxes"],
                    labels=self._to_model[s["labels"]], difficult=s["difficult"])

    @property
    def image_ids(self):
        return list(range(1, self.num_images + 1))

    @property
    def file_names(self):
        return [None] * self.num_images

    def fingerprint(self):
        text = f"shapes:{self.seed}:{self.num_images}:{sorted(self.options.items())}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _split_coco(rest):
    """ANNOTATIONS.json:IMAGE_DIR -> (annotations, image_dir), split at the last colon that leaves
    an existing file before it (a path may hold colons); else at the first colon."""
    colons = [k for k, c in enumerate(rest) if c == ":" and 0 < k < len(rest) - 1]
    for k in reversed(colons):
        if os.path.isfile(rest[:k]):
            return rest[:k], rest[k + 1:]
    return (rest[:colons[0]], rest[colons[0] + 1:]) if colons else None


def parse_spec(spec):
    """'shapes' | 'voc:ROOT' | 'coco:ANNOTATIONS.json:IMAGE_DIR' -> (kind, arguments)."""
    text = str(spec)
    kind, _, rest = text.partition(":")
    if kind in ("shapes", "shapes-hard") and not rest:
        return "shapes", (kind,)
    if kind == "voc" and rest:
        return "voc", (rest,)
    if kind == "coco":
        parts = _split_coco(rest)
        if parts:
            return "coco", parts
    raise ValueError(f"--data: expected shapes, shapes-hard, voc:ROOT or "
                     f"coco:ANNOTATIONS.json:IMAGE_DIR, got {text!r}")


def label_map(data_names, model_names, spec):
    """(1 + len(data_names),) int64: data label k -> the model's label of the same class name
    (0 -> 0, background).  The data may lack some of the model's classes, never add one."""
    extra = [n for n in data_names if n not in model_names]
    if extra:
        raise ValueError(f"{spec}: classes {extra} are not among the model's {list(model_names)}; "
                         "evaluate on data with the classes the model was trained on")
    return np.array([0] + [list(model_names).index(n) + 1 for n in data_names], np.int64)


def _relabel(records, data_names, model_names, spec):
    """Map the data's labels onto the model's classes by name (label_map)."""
    to_model = label_map(data_names, model_names, spec)
    for r in records:
        r["labels"] = to_model[np.asarray(r["labels"], np.int64)]
    return records


def open_dataset(spec="shapes", split=None, class_names=None, min_size=None, max_size=None,
                 num_images=1000, seed=0):
    """Open a dataset (module docstring).

    Args:
        spec: "shapes", "voc:ROOT" or "coco:ANNOTATIONS.json:IMAGE_DIR" (a colon inside the
            annotation file's path is fine: the spec is split after the existing file).
        split: VOC's list file (ImageSets/Main/<split>.txt; default trainval); unused otherwise.
        class_names: a trained model's classes: the data's labels are mapped onto them by name
            (the shapes' too), and data with another class is refused, naming it.  None: the
            data's own classes (VOC: the names in the split's annotations, sorted; COCO: its
            categories by id; the shapes: SHAPE_CLASSES).
        min_size, max_size: the resize rule (None: images at their own size).
        num_images, seed: the shapes dataset's size and seed.
    Returns:
        a Dataset.
    """
    kind, args = parse_spec(spec)
    category_ids = None
    if kind == "shapes":
        if int(num_images) <= 0:
            raise ValueError(f"num_images: expected a positive number of images, got {num_images}")
        options = SHAPES_HARD if args[0] == "shapes-hard" else {}
        data = ShapesDataset(num_images, seed, min_size, max_size, class_names=class_names,
                             **options)
        data.spec = args[0]
        return data
    if kind == "voc":          # with a model's classes, an unknown name is an error naming its file
        records, names = read_voc_split(args[0], split or "trainval", class_names)
        for n, r in enumerate(records):
            r["image_id"] = n + 1                            # a results file's image ids: 1..N
    else:
        records, names, category_ids = read_coco_annotations(*args)
    if class_names is not None:
        class_names = tuple(class_names)
        if tuple(names) != class_names:
            records = _relabel(records, tuple(names), class_names, spec)
            if category_ids is not None:                     # keep COCO's ids for the model's labels;
                by_name = dict(zip(names, category_ids))     # a class the data lacks gets an id no
                unused = max(category_ids, default=0) + 1    # annotation uses
                category_ids = [by_name.get(n, unused + k) for k, n in enumerate(class_names)]
            names = class_names
    return Dataset(records, names, category_ids, min_size, max_size, spec=str(spec))
