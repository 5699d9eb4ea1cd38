"""Image files: read any common format as float32 RGB in [0, 1], write 8-bit PNG or JPEG.

Shared by the VOC and COCO loaders and writers (voc.py, coco.py), the lazy dataset (dataset.py)
and `frcnn detect`.  The format is read from a file's content, not its name.  Three readers:

    read_image(path)                 (H, W, 3) float32, the whole picture at its own size
    read_image_reduced(path, side)   a camera photo decoded at about `side` pixels (detect)
    read_image_reduced_by(path, f)   the picture shrunk by a whole factor f (the datasets)

What every reader does alike:

* EXIF orientation is applied as image viewers apply it: a phone photo taken upright is read
  upright, and every size reported (image_header) is the size it is shown at.
* 16-bit and big pictures are reduced while still integers (mean of f x f blocks, or a JPEG's own
  1/2, 1/4, 1/8 decoding) and only then made float: a float32 copy of a 9000 x 9000 photo is
  never made to be shrunk.  Grey pictures stay one channel until the caller needs three.
* A JPEG whose data ends before its picture does is refused by name.  Pillow refuses a file cut
  short, but not one cut short and then closed with an end-of-image marker (libjpeg fills the
  rest with grey and only warns): such a file is decoded a second time with filler bytes before
  its end marker; a complete picture never reads them, a truncated one does, and differs.
"""
import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

# EXIF orientation -> the flips that show the stored pixels upright (Pillow's exif_transpose)
_ORIENT = {
    2: lambda a: a[:, ::-1],                          # mirrored left-right
    3: lambda a: a[::-1, ::-1],                       # upside down
    4: lambda a: a[::-1],                             # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),                    # transposed
    6: lambda a: np.rot90(a, -1),                     # stored turned left: turn right
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),        # transversed
    8: lambda a: np.rot90(a, 1),                      # stored turned right: turn left
}
_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_FILLER = bytes((37 * i + 11) % 255 for i in range(256))   # no 0xFF: never read as a marker
_STRIP_PIXELS = 1 << 19        # pixels a block reduction converts to an array at once


# ---- the file and its header -------------------------------------------------------------------

def regular_file(path):
    """The path as a string, if it names a regular file; a clear error otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"image {path!r} is a folder, not an image file")
    if not os.path.isfile(path):                  # a FIFO or device would block or never end
        raise ValueError(f"image {path!r} is not a regular file")
    return path


def _unreadable(path, e):
    return ValueError(f"image {path!r} could not be read ({type(e).__name__}: {e})")


def _orientation(im):
    """The EXIF orientation (1..8) in the file's header; 1 when there is none.  Read from the
    header only (a PNG's eXIf chunk after its pixels is not looked for), so that the size known
    when a dataset is opened is the size decoded later."""
    try:
        if im.format == "TIFF":
            value = im.getexif().get(0x0112, 1)
        elif "exif" in im.info:
            exif = Image.Exif()
            exif.load(im.info["exif"])
            value = exif.get(0x0112, 1)
        else:
            return 1
    except Exception:              # malformed EXIF: shown as stored, as most viewers do
        return 1
    return value if value in _ORIENT else 1


def image_header(path):
    """What a file's header says, without decoding it: dict(size (H, W) as shown, i.e. after
    the EXIF orientation; stored (H, W) as stored; orientation 1..8).

    Raises FileNotFoundError, or ValueError naming the file (not an image, a decompression bomb).
    """
    path = regular_file(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = _orientation(im)
    except _ERRORS as e:
        raise _unreadable(path, e) from None
    shown = (width, height) if orientation >= 5 else (height, width)
    return dict(size=shown, stored=(height, width), orientation=orientation)


# ---- JPEG completeness ---------------------------------------------------------------------------

def _ceil_div(a, b):
    return -(-a // b)


def _jpeg_layout(data):
    """Walk a JPEG's markers: (entropy-coded bytes, 8 x 8 blocks of its frame (None if unknown),
    offset of the end-of-image marker ending the first picture (None if there is none)).
    None when this is not a JPEG this walk understands (Pillow then decides)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, n, coded, blocks = 2, len(data), 0, None
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:                                   # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:                                   # end of image
            return coded, blocks, pos
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:         # markers without a length
            pos += 2
            continue
        if pos + 4 > n:
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2) and pos + 10 <= n:  # a Huffman-coded frame
            blocks = _frame_blocks(data[pos + 4:pos + 2 + length])
        pos += 2 + length
        if marker == 0xDA:                                   # a scan: coded data to the next marker
            start = pos
            while True:
                k = data.find(b"\xff", pos)
                if k < 0 or k + 1 >= n:
                    return coded + n - start, blocks, None
                following = data[k + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:   # a stuffed 0xFF, a restart
                    pos = k + 2
                elif following == 0xFF:
                    pos = k + 1
                else:
                    coded += k - start
                    pos = k
                    break
    return coded, blocks, None


def _frame_blocks(frame):
    """The 8 x 8 blocks a start-of-frame segment declares (precision, height, width, then each
    component's sampling factors), or None when it declares no height (a DNL marker does)."""
    height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
    parts = frame[6:6 + 3 * frame[5]] if len(frame) > 5 else b""
    sampling = [(parts[k + 1] >> 4, parts[k + 1] & 15) for k in range(0, len(parts) - 2, 3)]
    if not height or not sampling or not all(h and v for h, v in sampling):
        return None
    hmax, vmax = max(h for h, _ in sampling), max(v for _, v in sampling)
    return sum(_ceil_div(_ceil_div(width * h, hmax), 8) * _ceil_div(_ceil_div(height * v, vmax), 8)
               for h, v in sampling)


def _truncated(path, detail=""):
    return ValueError(f"image {path!r} is a truncated JPEG: its data ends before its picture "
                      f"does{detail}")


def _check_jpeg_length(path, layout):
    """Every 8 x 8 block of a Huffman-coded JPEG takes a bit of coded data at least."""
    if layout is not None and layout[1] is not None and 8 * layout[0] < layout[1]:
        raise _truncated(path, f" ({layout[0]} bytes of picture data for {layout[1]} blocks)")


def _check_jpeg_end(path, data, layout, decode, pixels):
    """Refuse a JPEG whose decoded pixels change when filler bytes stand before its end marker:
    a complete picture never reads them, a truncated one does."""
    if layout is None or layout[2] is None:
        return                                           # no end marker: Pillow refused it already
    end = layout[2]
    try:
        with Image.open(io.BytesIO(data[:end] + _FILLER + data[end:])) as im:
            again = decode(im)
    except _ERRORS:
        raise _truncated(path) from None
    if again.shape != pixels.shape or not np.array_equal(again, pixels):
        raise _truncated(path)


def _decode(path, decode):
    """decode(opened image) -> array, for the file at path; then the JPEG checks and the EXIF
    orientation.  Pillow's errors become one ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(3)
        if head == b"\xff\xd8\xff":                      # a JPEG (whatever its name says)
            with open(path, "rb") as f:
                data = f.read()
            layout = _jpeg_layout(data)
            _check_jpeg_length(path, layout)             # before decoding a bomb of grey
            with Image.open(io.BytesIO(data)) as im:
                orientation = _orientation(im)
                pixels = decode(im)
            _check_jpeg_end(path, data, layout, decode, pixels)
        else:
            with Image.open(path) as im:
                orientation = _orientation(im)
                pixels = decode(im)
    except _ERRORS as e:
        if isinstance(e, ValueError) and str(e).startswith(f"image {path!r}"):
            raise
        raise _unreadable(path, e) from None
    if orientation != 1:
        pixels = _ORIENT[orientation](pixels)
    return np.ascontiguousarray(pixels)


# ---- pixels as stored --------------------------------------------------------------------------

def _as_array(im, path):
    """The pixels of an open image as integers or floats: (H, W) grey or (H, W, 3) RGB, uint8;
    (H, W) uint16 for 16-bit images; (H, W) float32 in [0, 1] for float images.  32-bit integers
    beyond 16 bits and floats outside [0, 1] are refused, never clipped to white or black."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":                               # 32-bit ints: 16-bit PNGs load so in old Pillows
        raw = np.asarray(im)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise ValueError(f"image {path!r}: 32-bit integer pixels from {raw.min()} to "
                             f"{raw.max()}; convert it to an 8- or 16-bit image")
        return raw.astype(np.uint16)
    if mode == "F":
        pixels = np.asarray(im, dtype=np.float32)
        if pixels.size and not (np.all(np.isfinite(pixels)) and pixels.min() >= 0
                                and pixels.max() <= 1):
            raise ValueError(f"image {path!r}: float pixels outside [0, 1]; scale it to "
                             "[0, 1] or save it as an 8-bit image")
        return pixels
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode in ("1", "LA", "La"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))          # palette, RGBA (alpha dropped), CMYK, ...


def _unit_float(pixels_uint8):
    """uint8 -> float32 / 255 without a second float-sized temporary (a camera photo is 288 MB
    as float32)."""
    out = pixels_uint8.astype(np.float32)
    out *= np.float32(1 / 255.0)
    return out


def _to_unit(pixels):
    """An array from _as_array as float32 in [0, 1] (8 bits / 255, 16 bits / 65535)."""
    if pixels.dtype == np.uint8:
        return _unit_float(pixels)
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / np.float32(65535.0)
    return pixels.astype(np.float32, copy=False)


_DEPTH = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.float32): 1.0}


def _block_sums(a, factor, axis):
    """Sums of consecutive groups of `factor` entries along axis 0 or 1 of a (the last group
    may be shorter), in float64, without a float64 copy of a (NumPy casts in small buffers)."""
    n = a.shape[axis]
    full = n // factor * factor
    head = a[:full] if axis == 0 else a[:, :full]
    shape = head.shape[:axis] + (n // factor, factor) + head.shape[axis + 1:]
    sums = [head.reshape(shape).sum(axis=axis + 1, dtype=np.float64)]
    if full < n:                                               # the partial last group
        tail = a[full:] if axis == 0 else a[:, full:]
        sums.append(tail.sum(axis=axis, dtype=np.float64, keepdims=True))
    return np.concatenate(sums, axis=axis)


def _block_mean(im, factor, path):
    """The mean of every factor x factor block of an open image (the last row and column of
    blocks may be partial), as float32 in [0, 1]: converted a strip of rows at a time, so
    that no full-size array is made."""
    width, height = im.size
    rows = factor * max(1, _STRIP_PIXELS // max(1, width * factor))     # rows a strip
    col_counts = np.minimum(factor, width - np.arange(0, width, factor))
    strips = []
    for y0 in range(0, height, rows):
        a = _as_array(im.crop((0, y0, width, min(height, y0 + rows))), path)   # (r, W[, 3])
        sums = _block_sums(_block_sums(a, factor, 0), factor, 1)            # (r / f, W / f[, 3])
        row_counts = np.minimum(factor, a.shape[0] - np.arange(0, a.shape[0], factor))
        counts = row_counts[:, None] * col_counts[None, :] * _DEPTH[a.dtype]
        strips.append((sums / counts.reshape(counts.shape + (1,) * (a.ndim - 2))).astype(np.float32))
    return np.concatenate(strips)


# ---- the readers -------------------------------------------------------------------------------

def read_image(path):
    """Read an image file as (H, W, 3) float32 RGB in [0, 1], shown as viewers show it.

    The format is read from the content (a JPEG named .png is a JPEG); the EXIF orientation is
    applied.  8-bit images (grey, palette, RGB, RGBA: alpha dropped) are divided by 255, 16-bit
    ones by 65535; a float image must already hold values in [0, 1]; anything else (32-bit
    integers, float outside [0, 1]) is refused with a line saying so, never silently clipped.
    A truncated file is refused by name.
    """
    path = regular_file(path)
    pixels = _decode(path, lambda im: _as_array(im, path))
    return _three_channels(_to_unit(pixels))


def _three_channels(pixels):
    """(H, W) grey -> (H, W, 3), the same value in R, G and B; (H, W, 3) unchanged."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _draft(im, factor):
    """Let a JPEG decode itself at 1/2, 1/4 or 1/8 of its size (at most 1/factor): the scale it
    took (1 for other formats)."""
    if im.format not in ("JPEG", "MPO") or factor < 2:
        return 1
    width, height = im.size
    want = next(s for s in (8, 4, 2) if s <= factor)
    taken = im.draft(im.mode, (max(1, width // want), max(1, height // want)))
    return 1 if taken is None else int(round(width / taken[1][2]))


def read_image_reduced_by(path, factor):
    """An image file shrunk by a whole factor before any float copy is made: (pixels, used).

    pixels are float32 in [0, 1], (h, w) for grey files and (h, w, 3) for colour ones, shown as
    viewers show them (EXIF orientation); each is the mean of a used x used block of the file's
    pixels (a JPEG first decodes itself at 1/2, 1/4 or 1/8), so h = ceil(H / used) and
    w = ceil(W / used), with used <= factor (used = 1: the file as it is).
    """
    path = regular_file(path)
    factor = max(1, int(factor))
    used = []

    def decode(im):
        scale = _draft(im, factor)
        rest = factor // scale
        used[:] = [scale * rest]
        if rest >= 2:
            return _block_mean(im, rest, path)
        return _to_unit(_as_array(im, path))

    pixels = _decode(path, decode)
    return pixels, used[0]


_EIGHT_BIT = ("RGB", "L", "RGBA", "P", "CMYK", "YCbCr", "LA", "1")


def read_image_reduced(path, max_side):
    """An image file decoded at about `max_side` pixels on its longer side when it is larger:
    (image (h, w, 3) float32 in [0, 1], (fy, fx) original pixels per returned pixel).

    For a detector that rescales to a few hundred pixels anyway, a 6000 x 4000 photo need not be
    held at full size: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (the DCT's own reduction, fast),
    then resized bilinearly in 8 bits to max_side; 16-bit and float images are reduced by whole
    blocks (read_image_reduced_by) before they become float.  Sizes and factors are those of the
    picture as shown (EXIF orientation).  Files at most max_side are read by read_image.
    """
    path = regular_file(path)
    height, width = image_header(path)["size"]
    if max(height, width) <= max_side:
        return read_image(path), (1.0, 1.0)

    def decode(im):
        if im.mode not in _EIGHT_BIT:                       # 16-bit, 32-bit, float
            return _block_mean(im, -(-max(im.size) // max_side), path)
        w, h = im.size
        im.draft("RGB", (max(1, w * max_side // max(w, h)), max(1, h * max_side // max(w, h))))
        if im.mode != "RGB":
            im = im.convert("RGB")
        if max(im.size) > max_side:                         # the rest of the way, still in 8 bits
            k = max_side / max(im.size)
            im = im.resize((max(1, round(im.size[0] * k)), max(1, round(im.size[1] * k))),
                           Image.BILINEAR)
        return np.asarray(im)

    pixels = _decode(path, decode)
    image = _three_channels(_unit_float(pixels) if pixels.dtype == np.uint8 else pixels)
    return image, (height / image.shape[0], width / image.shape[1])


# ---- writing -----------------------------------------------------------------------------------

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
