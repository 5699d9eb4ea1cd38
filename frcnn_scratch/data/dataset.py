"""The dataset behind `frcnn train / eval / detect --data`: shapes, Pascal VOC or COCO, read lazily.

    open_dataset("shapes", num_images=1000, seed=0)        the synthetic shapes, drawn when used
    open_dataset("shapes-hard", ...)                       the harder mode (shapes.SHAPES_HARD)
    open_dataset("voc:ROOT", split="trainval")             a VOCdevkit-style folder (voc.py)
    open_dataset("coco:ANNOTATIONS.json:IMAGE_DIR")        a COCO JSON file and its images (coco.py)

Opening reads and checks every annotation and finds every image file (so a bad file is reported
before training starts, by name).  An image is decoded, resized by the paper's rule (shorter side
`min_size`, longer side at most `max_size`; transforms.resize) and cached the first time it is
used: training decodes each file once, not on every step.  The cache holds 8-bit pixels, the
precision of the files themselves, so a 128 x 170 image costs 65 KB.

An item, dataset[i], is a training / inference sample at the model's scale: dict(image (h, w, 3)
float32 in [0, 1], boxes (G, 4) float32, labels (G,) int64 in 1..C, difficult (G,) bool, id,
image_id, scale).  dataset.ground_truth(i) gives the boxes in the original image's pixels, where
detections are scored: a detection on the resized image maps back as boxes / scale.

Difficult (VOC) and crowd (COCO) objects are marked `difficult`: the training loop leaves them out
of the targets, and the metrics ignore them (VOC AP) or treat them as crowd regions (COCO AP).
"""
import hashlib
from collections.abc import Sequence

import numpy as np

from ..rescale import compute_scale, resize_image
from .coco import read_coco_annotations
from .images import check_size, read_image
from .shapes import SHAPE_CLASSES, SHAPES_HARD, make_shapes_sample
from .voc import read_voc_split


CACHE_BYTES = 1 << 30   # decoded images kept in memory at most (8-bit pixels at the model's scale)


class Dataset(Sequence):
    """Images with their annotations; items resized and cached on first use (module docstring).

    Args:
        records: one dict per image: image_id (int), id (str), path (an image file) or image (an
            (H, W, 3) float32 array in memory), size ((H, W) or None), boxes (G, 4), labels (G,),
            difficult (G,), optional area (G,) (COCO's annotated area).
        class_names: the C class names, label k = class_names[k - 1].
        category_ids: the id a results file gives label k (COCO's category ids; default 1..C).
        min_size, max_size: the resize rule; 0 / None keeps images at their own size.
        spec: what was opened ("voc:ROOT" ...), for messages and checkpoints.
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
        self._cache = {}                                  # index -> (pixels, scale)
        self._cached_bytes = 0

    def __len__(self):
        return len(self.records)

    def record(self, i):
        """Image i's annotation record (see the class docstring)."""
        return self.records[i]

    @property
    def image_ids(self):
        return [self.record(i)["image_id"] for i in range(len(self))]

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

    def _pixels(self, i):
        """Image i at the model's scale, and that scale: decoded and resized once, then kept while
        the cache holds less than cache_bytes (beyond, images are decoded again when used)."""
        if i in self._cache:
            return self._cache[i]
        r = self.record(i)
        image = self.original_image(i)
        scale = 1.0
        if self.min_size > 0:
            scale, h, w = compute_scale(*image.shape[:2], self.min_size, self.max_size)
            if (h, w) != image.shape[:2]:
                image = resize_image(image, h, w)
        in_memory = r.get("image") is not None
        # files are 8-bit: keep 8 bits (4x less memory); in-memory images as they are
        pixels = image if in_memory and scale == 1.0 else \
            np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        if self._cached_bytes + pixels.nbytes <= self.cache_bytes:
            self._cache[i] = (pixels, scale)
            self._cached_bytes += pixels.nbytes
        return pixels, scale

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of a dataset of {len(self)}")
        i = i % len(self)
        r = self.record(i)
        pixels, scale = self._pixels(i)
        image = pixels if pixels.dtype == np.float32 else pixels.astype(np.float32) / np.float32(255)
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


class ShapesDataset(Dataset):
    """The synthetic shapes, drawn when used: image i comes from its own generator
    (make_shapes_sample with np.random.default_rng([seed, i]), exactly as make_shapes_dataset
    draws it), so a million images cost no memory until used, and the cache keeps what fits."""

    def __init__(self, num_images, seed, min_size=None, max_size=None, cache_bytes=CACHE_BYTES,
                 **options):
        super().__init__([], SHAPE_CLASSES, None, min_size, max_size, spec="shapes",
                         cache_bytes=cache_bytes)
        self.num_images, self.seed, self.options = int(num_images), int(seed), options
        self._drawn = {}                                  # index -> sample, while it fits

    def __len__(self):
        return self.num_images

    def record(self, i):
        if i in self._drawn:
            return self._drawn[i]
        s = make_shapes_sample(np.random.default_rng([self.seed, i]),
                               sample_id=f"shapes-{self.seed}-{i:06d}", **self.options)
        r = dict(image_id=i + 1, id=s["id"], image=s["image"], size=None, boxes=s["boxes"],
                 labels=s["labels"], difficult=s["difficult"])
        if self._cached_bytes + s["image"].nbytes <= self.cache_bytes:
            self._drawn[i] = r
            self._cached_bytes += s["image"].nbytes
        return r

    @property
    def image_ids(self):
        return list(range(1, self.num_images + 1))

    def fingerprint(self):
        text = f"shapes:{self.seed}:{self.num_images}:{sorted(self.options.items())}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_spec(spec):
    """'shapes' | 'voc:ROOT' | 'coco:ANNOTATIONS.json:IMAGE_DIR' -> (kind, arguments)."""
    text = str(spec)
    kind, _, rest = text.partition(":")
    if kind in ("shapes", "shapes-hard") and not rest:
        return "shapes", (kind,)
    if kind == "voc" and rest:
        return "voc", (rest,)
    if kind == "coco":
        ann, sep, images = rest.partition(":")
        if ann and sep and images:
            return "coco", (ann, images)
    raise ValueError(f"--data: expected shapes, shapes-hard, voc:ROOT or "
                     f"coco:ANNOTATIONS.json:IMAGE_DIR, got {text!r}")


def _relabel(records, data_names, model_names, spec):
    """Map the data's labels onto the model's classes by name; the data may not add a class."""
    extra = [n for n in data_names if n not in model_names]
    if extra:
        raise ValueError(f"{spec}: classes {extra} are not among the model's {list(model_names)}; "
                         "evaluate on data with the classes the model was trained on")
    to_model = np.array([0] + [model_names.index(n) + 1 for n in data_names], np.int64)
    for r in records:
        r["labels"] = to_model[np.asarray(r["labels"], np.int64)]
    return records


def open_dataset(spec="shapes", split=None, class_names=None, min_size=None, max_size=None,
                 num_images=1000, seed=0):
    """Open a dataset (module docstring).

    Args:
        spec: "shapes", "voc:ROOT" or "coco:ANNOTATIONS.json:IMAGE_DIR".
        split: VOC's list file (ImageSets/Main/<split>.txt; default trainval); unused otherwise.
        class_names: a trained model's classes: the data's labels are mapped onto them by name,
            and data with another class is refused, naming it.  None: the data's own classes
            (VOC: the names in the split's annotations, sorted; COCO: its categories by id).
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
        data = ShapesDataset(num_images, seed, min_size, max_size, **options)
        data.spec = args[0]
        if class_names is not None and tuple(class_names) != SHAPE_CLASSES:
            raise ValueError(f"shapes: the model's classes {list(class_names)} are not the "
                             f"shapes' {list(SHAPE_CLASSES)}")
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
