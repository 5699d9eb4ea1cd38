"""A synthetic detection dataset: filled shapes on noisy backgrounds, with exact boxes.

Made for learning: it needs no download, it is generated in a fraction of a second, and a small
Faster R-CNN can learn it on a laptop CPU. Every image holds 1..4 shapes (circle, square,
triangle, cross) of random size, colour and position on a smooth random background with pixel
noise. Each box is computed from the shape's own pixel mask, so it is tight: a shape covering
columns c0..c1 (inclusive) gets x1 = c0 and x2 = c1 + 1 (continuous coordinates, width = x2 - x1).

Shapes never share a pixel (no occlusion, so every box sees its whole shape) and a placement whose
box overlaps an earlier box with IoU > max_iou is rejected, so labels are unambiguous.

SHAPES_HARD is a harder mode (`--data shapes-hard`): small shapes, many per image, allowed to
overlap and hide part of each other (occlude=True: a box still spans its whole shape, as a
person's box spans the part behind a car), unlabelled rings as clutter, more noise.  Choices that
make no difference on the easy mode (pooler, anchors, lambda) show there.

    >>> from frcnn_scratch.data.shapes import make_shapes_dataset, SHAPE_CLASSES
    >>> samples = make_shapes_dataset(100, seed=0)
    >>> samples[0]["boxes"].shape, SHAPE_CLASSES[samples[0]["labels"][0] - 1]   # doctest: +SKIP
"""
import numpy as np

from ..boxes import box_iou
from ..rescale import bilinear_matrix

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")  # label = index + 1 (0 is background)

# the harder mode: small, many, occluding shapes among unlabelled rings, on noisier backgrounds
SHAPES_HARD = dict(image_size=(128, 192), shape_size=(8, 40), num_objects=(4, 8), max_iou=0.5,
                   noise=0.08, occlude=True, clutter=(2, 5))


# ---- one mask per shape, on its own s x s window (pixel centres at i + 0.5) ----------------------

def _circle_mask(size):
    """Disc of diameter `size` inscribed in the window."""
    y, x = np.ogrid[:size, :size]
    r = size / 2.0
    return (x + 0.5 - r) ** 2 + (y + 0.5 - r) ** 2 <= r * r        # (size, size) bool


def _square_mask(size):
    """The whole window."""
    return np.ones((size, size), dtype=bool)


def _triangle_mask(size):
    """Upward isosceles triangle: apex at the top centre, base along the bottom row."""
    y, x = np.ogrid[:size, :size]
    yc, xc = y + 0.5, x + 0.5
    half = size / 2.0
    # inside when the distance from the centre line is at most half the base, scaled by depth
    return np.abs(xc - half) <= half * yc / size                     # (size, size) bool


def _cross_mask(size):
    """A plus sign whose arms are a third of the window wide."""
    y, x = np.ogrid[:size, :size]
    lo, hi = size / 3.0, 2.0 * size / 3.0
    vertical = (x + 0.5 >= lo) & (x + 0.5 <= hi)
    horizontal = (y + 0.5 >= lo) & (y + 0.5 <= hi)
    return vertical | horizontal                                      # (size, size) bool


_MASKS = {"circle": _circle_mask, "square": _square_mask, "triangle": _triangle_mask,
          "cross": _cross_mask}


def _ring_mask(size):
    """A ring (a disc minus its inner half): the clutter of the hard mode, never a class."""
    c = (np.arange(size) + 0.5 - size / 2) / (size / 2)
    r = np.hypot(c[:, None], c[None, :])
    return (r <= 1.0) & (r >= 0.55)


def shape_mask(name, size):
    """The (size, size) bool mask of shape `name` (one of SHAPE_CLASSES)."""
    if name not in _MASKS:
        raise ValueError(f"name: unknown shape {name!r}; choose one of {', '.join(SHAPE_CLASSES)}")
    return _MASKS[name](int(size))


def _mask_box(mask, top, left):
    """Tight continuous box (x1, y1, x2, y2) of a window mask placed at (top, left)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1],
                    dtype=np.float32)


# ---- background ------------------------------------------------------------------------------------

def _background(rng, height, width, noise):
    """Smooth colour noise (a 4 x 4 random grid, upsampled bilinearly), a linear gradient, pixel noise."""
    grid = rng.uniform(0.15, 0.85, size=(4, 4, 3)).astype(np.float32)
    # bilinear upsampling is separable: smooth = A_y @ grid @ A_x.T per channel
    rows = np.tensordot(bilinear_matrix(height, 4), grid, axes=(1, 0))         # (H, 4, 3)
    smooth = np.tensordot(rows, bilinear_matrix(width, 4), axes=(1, 1))          # (H, 3, W)
    smooth = smooth.transpose(0, 2, 1)                                           # (H, W, 3)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-12
    ramp_y = (direction[0] * np.arange(height) / height).astype(np.float32)[:, None, None]  # (H, 1, 1)
    ramp_x = (direction[1] * np.arange(width) / width).astype(np.float32)[None, :, None]    # (1, W, 1)
    image = smooth + 0.15 * (ramp_y + ramp_x)
    # uniform pixel noise with standard deviation `noise` (uniform draws are cheaper than Gaussian)
    image += (2 * np.sqrt(3) * noise) * (rng.random(size=image.shape, dtype=np.float32) - 0.5)
    return image


def _contrasting_colour(rng, background_patch, min_distance=0.35, tries=20):
    """A random RGB colour at least `min_distance` (max over channels) from the patch's mean colour."""
    mean = background_patch.reshape(-1, 3).mean(axis=0)
    for _ in range(tries):
        colour = rng.uniform(0.0, 1.0, size=3)
        if np.max(np.abs(colour - mean)) >= min_distance:
            return colour.astype(np.float32)
    return np.where(mean > 0.5, 0.0, 1.0).astype(np.float32)          # fall back to the opposite extreme


# ---- one image -----------------------------------------------------------------------------------

def _pair_range(value, name, minimum=1):
    """An int n -> (n, n); a pair (lo, hi) -> (lo, hi), checked minimum <= lo <= hi."""
    try:
        lo, hi = (value, value) if np.isscalar(value) else tuple(value)
        lo, hi = int(lo), int(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an int or (lo, hi), got {value!r}") from None
    if lo < minimum or hi < lo:
        raise ValueError(f"{name}: expected an int >= {minimum} or (lo, hi) with {minimum} <= lo <= hi, "
                         f"got {value!r}")
    return lo, hi


def make_shapes_sample(rng, image_size=(96, 160), shape_size=(16, 64), num_objects=(1, 4),
                       classes=SHAPE_CLASSES, max_iou=0.3, noise=0.03, sample_id="shapes",
                       with_masks=False, occlude=False, clutter=0):
    """Draw one image of filled shapes with its tight boxes.

    Args:
        rng: np.random.Generator (all randomness comes from it).
        image_size: int or (lo, hi): height and width are drawn independently in [lo, hi].
        shape_size: int or (lo, hi): side of each shape's square window, clipped to the image.
        num_objects: int or (lo, hi): how many shapes to try to place.
        classes: names drawn from SHAPE_CLASSES; label = index in `classes` + 1.
        max_iou: reject a placement whose box has IoU > max_iou with an earlier box.
        noise: standard deviation of the (uniform) pixel noise.
        sample_id: the sample's id.
        with_masks: also return masks (G, H, W) bool, each shape's visible pixels, and hidden
            (G,), how many of its pixels later shapes cover (0 unless occlude).
        occlude: let a shape cover part of earlier ones (their boxes keep the whole shape).
        clutter: int or (lo, hi): unlabelled rings painted first, distractors with no box.
    Returns:
        sample dict(image (H, W, 3) float32 in [0, 1], boxes (G, 4) float32, labels (G,) int64,
        difficult (G,) bool all False, id str). G can be smaller than asked when a shape finds no
        free place after 50 tries (rare with the defaults).
    """
    h_lo, h_hi = _pair_range(image_size, "image_size")
    s_lo, s_hi = _pair_range(shape_size, "shape_size")
    n_lo, n_hi = _pair_range(num_objects, "num_objects", minimum=0)   # 0 allows background-only images
    height, width = (int(v) for v in rng.integers(h_lo, h_hi + 1, size=2))
    image = _background(rng, height, width, noise)                     # (H, W, 3)
    occupied = np.zeros((height, width), dtype=bool)                   # pixels already painted
    if clutter:
        c_lo, c_hi = _pair_range(clutter, "clutter", minimum=0)
        for _ in range(int(rng.integers(c_lo, c_hi + 1))):              # unlabelled rings
            size = min(int(rng.integers(s_lo, s_hi + 1)), height, width)
            top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
            ring = _ring_mask(size)
            window = (slice(top, top + size), slice(left, left + size))
            image[window][ring] = _contrasting_colour(rng, image[window][ring])
    boxes, labels, masks, hidden = [], [], [], []
    for _ in range(int(rng.integers(n_lo, n_hi + 1))):
        label = int(rng.integers(len(classes)))
        for _attempt in range(50):
            size = int(rng.integers(s_lo, s_hi + 1))
            size = min(size, height, width)
            top = int(rng.integers(0, height - size + 1))
            left = int(rng.integers(0, width - size + 1))
            mask = shape_mask(classes[label], size)                    # (size, size)
            window = (slice(top, top + size), slice(left, left + size))
            if not occlude and (mask & occupied[window]).any():        # would hide part of a shape
                continue
            box = _mask_box(mask, top, left)                           # (4,)
            if boxes and box_iou(box[None], np.stack(boxes)).max() > max_iou:
                continue
            colour = _contrasting_colour(rng, image[window][mask])
            image[window][mask] = colour
            occupied[window] |= mask
            boxes.append(box)
            labels.append(label + 1)
            if with_masks:
                full = np.zeros((height, width), dtype=bool)
                full[window] = mask
                for k, earlier in enumerate(masks):                    # now hidden there
                    hidden[k] += int((earlier & full).sum())
                    earlier &= ~full
                masks.append(full)
                hidden.append(0)
            break
    sample = dict(
        image=np.clip(image, 0.0, 1.0).astype(np.float32),
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        difficult=np.zeros(len(labels), dtype=bool),
        id=sample_id,
    )
    if with_masks:
        sample["masks"] = np.array(masks, dtype=bool).reshape(-1, height, width)
        sample["hidden"] = np.array(hidden, dtype=np.int64)         # pixels later shapes cover
    return sample


def make_shapes_dataset(num_images, seed=0, image_size=(96, 160), shape_size=(16, 64),
                        num_objects=(1, 4), classes=SHAPE_CLASSES, max_iou=0.3, noise=0.03,
                        with_masks=False, occlude=False, clutter=0):
    """A list of `num_images` synthetic samples, deterministic from `seed`.

    Image i is drawn from its own generator np.random.default_rng([seed, i]), so the first k images
    are the same whatever num_images is, and two seeds give different datasets (use one seed for
    training and another for held-out evaluation).

    Args:
        num_images: how many images (>= 0).
        seed: int seed.
        image_size, shape_size, num_objects, classes, max_iou, noise, with_masks, occlude,
            clutter: see make_shapes_sample (SHAPES_HARD: the harder mode's values).
    Returns:
        list of sample dicts (see make_shapes_sample); ids are "shapes-{seed}-{i:06d}".
    """
    num_images = int(num_images)
    if num_images < 0:
        raise ValueError(f"num_images: expected an int >= 0, got {num_images}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    classes = tuple(classes)
    if not classes or any(c not in SHAPE_CLASSES for c in classes):
        raise ValueError(f"classes: expected a non-empty subset of {SHAPE_CLASSES}, got {classes!r}")
    return [make_shapes_sample(np.random.default_rng([int(seed), i]), image_size, shape_size,
                               num_objects, classes, max_iou, noise, f"shapes-{int(seed)}-{i:06d}",
                               with_masks, occlude, clutter)
            for i in range(num_images)]
