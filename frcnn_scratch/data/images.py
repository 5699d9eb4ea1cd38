"""Image files: read any common format as float32 RGB in [0, 1], write 8-bit PNG or JPEG.

Shared by the VOC and COCO loaders and writers (voc.py, coco.py), the lazy dataset (dataset.py)
and `frcnn detect` (read_image_reduced: a camera photo decoded at about the size it is used at).
Pixels are (H, W, 3) float32 in [0, 1]; the format is read from a file's content, not its name.
"""
import os

import numpy as np
from PIL import Image, UnidentifiedImageError


def read_image(path):
    """Read an image file as (H, W, 3) float32 RGB in [0, 1], whatever its name says.

    The format is read from the content (a JPEG named .png is a JPEG).  8-bit images (grey,
    palette, RGB, RGBA: alpha dropped) are divided by 255, 16-bit ones by 65535; a float image
    must already hold values in [0, 1]; anything else (32-bit integers, float outside [0, 1]) is
    refused with a line saying so, never silently clipped to white or black.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"image {path!r} is a folder, not an image file")
    if not os.path.isfile(path):                  # a FIFO or device would block or never end
        raise ValueError(f"image {path!r} is not a regular file")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                pixels = np.asarray(im, dtype=np.float32) / np.float32(65535.0)
            elif mode == "I":                     # 32-bit ints: 16-bit PNGs load so in old Pillows
                raw = np.asarray(im)
                if raw.size and (raw.min() < 0 or raw.max() > 65535):
                    raise ValueError(f"image {path!r}: 32-bit integer pixels from {raw.min()} to "
                                     f"{raw.max()}; convert it to an 8- or 16-bit image")
                pixels = raw.astype(np.float32) / np.float32(65535.0)
            elif mode == "F":
                pixels = np.asarray(im, dtype=np.float32)
                if pixels.size and not (np.all(np.isfinite(pixels)) and pixels.min() >= 0
                                        and pixels.max() <= 1):
                    raise ValueError(f"image {path!r}: float pixels outside [0, 1]; scale it to "
                                     "[0, 1] or save it as an 8-bit image")
            else:
                pixels = _unit_float(np.asarray(im.convert("RGB")))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path!r} could not be read ({type(e).__name__}: {e})") from None
    if pixels.ndim == 2:                           # grey: the same value in R, G and B
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _unit_float(pixels_uint8):
    """uint8 -> float32 / 255 without a second float-sized temporary (a camera photo is 288 MB
    as float32)."""
    out = pixels_uint8.astype(np.float32)
    out *= np.float32(1 / 255.0)
    return out


def read_image_reduced(path, max_side):
    """An image file decoded at about `max_side` pixels on its longer side when it is larger:
    (image (h, w, 3) float32 in [0, 1], (fy, fx) original pixels per returned pixel).

    For a detector that rescales to a few hundred pixels anyway, a 6000 x 4000 photo need not be
    held at full size: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (the DCT's own reduction, fast),
    then resized bilinearly in 8 bits to max_side; other formats are decoded, then resized.  Files
    at most max_side (and 16-bit / float ones) are read by read_image, at full size.
    """
    path = os.fspath(path)
    image = None
    try:
        if os.path.isfile(path):
            with Image.open(path) as im:
                width, height = im.size
                if max(width, height) > max_side and im.mode in ("RGB", "L", "RGBA", "P", "CMYK",
                                                                  "YCbCr", "LA", "1"):
                    im.draft("RGB", (max(1, width * max_side // max(width, height)),
                                     max(1, height * max_side // max(width, height))))
                    if im.mode != "RGB":
                        im = im.convert("RGB")
                    if max(im.size) > max_side:       # the rest of the way, still in 8 bits
                        k = max_side / max(im.size)
                        im = im.resize((max(1, round(im.size[0] * k)), max(1, round(im.size[1] * k))),
                                       Image.BILINEAR)
                    image = _unit_float(np.asarray(im))
    except Exception:           # anything odd: read_image decides, with its clear message
        image = None
    if image is None:
        image = read_image(path)
        return image, (1.0, 1.0)
    return image, (height / image.shape[0], width / image.shape[1])


IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}  # file extension -> Pillow's format name


def write_image(path, image, image_format="png"):
    """Write an (H, W, 3) colour or (H, W) grey float image in [0, 1] as an 8-bit PNG or JPEG
    (values rounded to k / 255; JPEG at quality 95, so lossy)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image: expected shape (H, W, 3) or (H, W), got {image.shape}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format: expected one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB").save(
        path, format=IMAGE_FORMATS[image_format], **({"quality": 95} if image_format == "jpg" else {}))


def sample_image_format(sample, default):
    """The file format a writer uses for a sample: its "format" key ("png" / "jpg"), else default."""
    return sample.get("format", default)


def check_size(image, hw, path):
    """The decoded image must have the (H, W) its annotation gives (when it gives one)."""
    if hw is not None and 0 not in hw and tuple(hw) != image.shape[:2]:
        raise ValueError(f"{path}: image is {image.shape[:2]} (H, W) but its annotation says {tuple(hw)}")
