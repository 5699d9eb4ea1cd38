"""The columns of a convolution, one band of output rows at a time, in three layouts.

nn.Conv2d builds every column of the image at once (`nn.im2col`): kh*kw times the input, 44 MB for
16 channels at 240 x 320.  fast.Conv2d builds the columns of a band of output rows (a few MB, still
in cache when the product reads them) in one of three layouts; each equals `nn.im2col`'s columns of
those rows, which tests/test_fast.py checks.

- banded im2col (`band_im2col`, `band_col2im_add`): nn.im2col restricted to rows [row0, row1).
- flat (`flat_im2col`, `flat_col2im_add`), for stride 1: each channel of the padded image stored as
  one flat row, image row r at r * Wp, and the output pixels numbered the same way, q = i*Wp + j.
  The value under output pixel q at kernel offset (u, v) is then flat[q + u*Wp + v]:

      cols[(c, u, v), q] = flat[c, q + u*Wp + v]

  so every block (u, v) of the columns is one contiguous slice of the image, a copy at memory speed
  where im2col gathers Wo-long pieces of rows.  The price: output rows are Wp wide.  Their last
  Wp - Wo values (j >= Wo) read across the end of an image row; they are junk, never returned, and
  their gradient is set to 0 so that they add nothing.  Each flat channel ends with kw - 1 zeros,
  where the junk of the last row reads (so the junk stays finite).
- polyphase (`polyphase_split`, `polyphase_im2col`), for a 3 x 3 convolution under a 2 x 2 max pool:
  the padded input split into four planes by row and column parity, X[p, q][a, b] = xp[2a+p, 2b+q].
  Output pixel (2a + pi, 2b + pj) at offset (u, v) reads

      xp[2a + pi + u, 2b + pj + v] = X[r % 2, s % 2][a + r // 2, b + s // 2],  r = pi + u, s = pj + v

  so each block (u, v, pi, pj) is again one contiguous slice of a plane, and the product makes the
  four phases y[2a + pi, 2b + pj] of every pool window side by side: the pool is then the max of
  four contiguous planes instead of four strided views.  Each plane row has Wq = (Wp + 1) // 2
  values, those past Wo // 2 junk, and each plane one zero after its last row.

Why each layout pays, and where it does not (a layer that sends a gradient back loses more in the
polyphase adjoint than the pool gains): docs/performance.md, "The backbone's convolutions".
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view


def pad_into(xp, x, ph, pw):
    """xp[..., ph:-ph, pw:-pw] = x with a border of zeros: each value written once (np.pad is
    slower)."""
    h, w = x.shape[-2:]
    xp[..., :ph, :] = 0
    xp[..., ph + h:, :] = 0
    xp[..., ph:ph + h, :pw] = 0
    xp[..., ph:ph + h, pw + w:] = 0
    xp[..., ph:ph + h, pw:pw + w] = x


# ---- banded im2col -------------------------------------------------------------------------------

def band_im2col(xp, kh, kw, sh, sw, row0, row1, out=None):
    """Columns of output rows [row0, row1) of one padded image: (C*kh*kw, (row1-row0)*Wo).

    xp: (C, Hp, Wp) one zero-padded image.  Column (i, j) holds every value of the window under
    output pixel (i, j), ordered (c, u, v): the same order as W.reshape(O, C*kh*kw).
    """
    c, hp, wp = xp.shape
    wo = (wp - kw) // sw + 1
    rows = xp[:, row0 * sh:(row1 - 1) * sh + kh]                       # the input rows they read
    win = sliding_window_view(rows, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # (C, bh, Wo, kh, kw)
    shape = (c, kh, kw, row1 - row0, wo)
    if out is None:
        return np.ascontiguousarray(win.transpose(0, 3, 4, 1, 2)).reshape(c * kh * kw, -1)
    cols = out[:int(np.prod(shape))].reshape(shape)
    np.copyto(cols, win.transpose(0, 3, 4, 1, 2))                      # one copy, into the buffer
    return cols.reshape(c * kh * kw, -1)                               # (K, bh*Wo)


def band_col2im_add(dxp, dcols, kh, kw, sh, sw, row0, row1):
    """The adjoint of band_im2col: add the column gradients back onto the pixels they came from.

    dxp: (C, Hp, Wp) gradient of one padded image, added to in place.  dcols: (C*kh*kw, bh*Wo).
    """
    c = dxp.shape[0]
    bh = row1 - row0
    wo = dcols.shape[1] // bh
    dcols = dcols.reshape(c, kh, kw, bh, wo)
    for u in range(kh):
        for v in range(kw):
            r = row0 * sh + u
            dxp[:, r:r + sh * bh:sh, v:v + sw * wo:sw] += dcols[:, u, v]


# ---- the flat layout (stride 1) ------------------------------------------------------------------

def flat_im2col(xp, kh, kw, wp, row0, row1, out=None):
    """Columns of output rows [row0, row1) of one flat padded image: (C*kh*kw, (row1-row0)*Wp).

    xp: (C, Hp*Wp + kw - 1), each channel's padded image row after row (see the module's notes).
    Column q of the band is output pixel (row0 + q // Wp, q % Wp); rows ordered (c, u, v) like
    im2col's.  A 1x1 kernel's columns are the image itself: a view, no copy.
    """
    c = xp.shape[0]
    q = (row1 - row0) * wp                                             # the band's pixels
    if kh == kw == 1:
        return xp[:, row0 * wp:row0 * wp + q]                          # (C, bh*Wp), a view
    cols = np.empty((c, kh, kw, q), xp.dtype) if out is None else \
        out[:c * kh * kw * q].reshape(c, kh, kw, q)
    # cols[:, u, v] = xp[:, start:start + q], start = (row0 + u) * Wp + v: the kh * kw shifted slices
    # are one strided view of xp, [c, u, v, t] = xp[c, start + t], copied in one call
    step = xp.strides[1]
    shifted = as_strided(xp[:, row0 * wp:], shape=(c, kh, kw, q),
                         strides=(xp.strides[0], wp * step, step, step), writeable=False)
    np.copyto(cols, shifted)
    return cols.reshape(c * kh * kw, q)                                # (K, bh*Wp)


def flat_col2im_add(dxp, dcols, kh, kw, wp, row0, row1):
    """The adjoint of flat_im2col: add each block (u, v) of column gradients back onto the slice
    of the flat image it was copied from.  dxp: (C, Hp*Wp + kw - 1), added to in place;
    dcols: (C*kh*kw, bh*Wp), zero in the junk columns."""
    c, q = dxp.shape[0], dcols.shape[1]
    dcols = dcols.reshape(c, kh, kw, q)
    for u in range(kh):
        for v in range(kw):
            start = (row0 + u) * wp + v
            dxp[:, start:start + q] += dcols[:, u, v]


def ones_below(buffer, k, q):
    """buffer[:k*q] holds the columns (K, q) of a band: write a row of ones under them and return
    the (K+1, q) matrix.  The bias is then one more weight, of an input that is always 1:
        y = W2 @ cols + b = [W2 | b] @ [cols; 1],   and   [dW2 | db] = dy @ [cols; 1]^T,
    one product each way instead of a product and a pass over y (or dy) for the bias."""
    buffer[k * q:(k + 1) * q] = 1
    return buffer[:(k + 1) * q].reshape(k + 1, q)


# ---- the polyphase layout (a first 3 x 3 convolution under a 2 x 2 max pool) ---------------------

def polyphase_split(x, out, ph, pw):
    """out (2, 2, C, Hq*Wq + 1) = the polyphase planes of x (C, H, W) zero-padded by (ph, pw):
    out[p, q, :, a*Wq + b] = xp[:, 2a + p, 2b + q], zero outside x and after the last row."""
    c, h, w = x.shape
    hq, wq = plane_size(out, c, h + 2 * ph, w + 2 * pw)
    out.fill(0)
    for p in range(2):
        rows = _phase(p, ph, h, hq)
        for q in range(2):
            cols = _phase(q, pw, w, wq)
            plane = out[p, q, :, :hq * wq].reshape(c, hq, wq)
            plane[:, rows[0], cols[0]] = x[:, rows[1], cols[1]]        # every 2nd row, column
    return out


def plane_size(planes, c, hp, wp):
    """(Hq, Wq) of the planes of a (c, hp, wp) padded image, checked against their shape."""
    hq, wq = (hp + 1) // 2, (wp + 1) // 2
    if planes.shape != (2, 2, c, hq * wq + 1):
        raise ValueError(f"polyphase planes: expected shape {(2, 2, c, hq * wq + 1)}, "
                         f"got {planes.shape}")
    return hq, wq


def _phase(p, pad, n, n_plane):
    """(plane slice, image slice): the plane positions a of phase p whose padded index 2a + p
    falls inside the image (n values after `pad` zeros), and the image indices 2a + p - pad."""
    first = max(0, -(-(pad - p) // 2))                                  # ceil((pad - p) / 2)
    last = min(n_plane, (n - 1 + pad - p) // 2 + 1)
    last = max(first, last)                                             # none inside: empty
    start = 2 * first + p - pad
    return slice(first, last), slice(start, start + 2 * (last - first), 2)


def polyphase_im2col(planes, kh, kw, wq, row0, row1, out=None):
    """Columns of window rows [row0, row1) from the polyphase planes of one padded image:
    (C*kh*kw, 4*q), q = (row1-row0)*Wq.  Rows ordered (c, u, v) like im2col's; columns (pi, pj,
    t): phase (pi, pj) of window t = (row0 + t // Wq, t % Wq)."""
    c = planes.shape[2]
    q = (row1 - row0) * wq
    cols = np.empty((c, kh, kw, 2, 2, q), planes.dtype) if out is None else \
        out[:c * kh * kw * 4 * q].reshape(c, kh, kw, 2, 2, q)
    # cols[:, u, v, pi, pj] = planes[r % 2, s % 2, :, start:start + q] with r, s = pi + u, pj + v and
    # start = (row0 + r // 2) * Wq + s // 2.  Two values of pi are always a step in memory (plane
    # row r to r + 1), and so are two of pj: the four slices of one (u, v) are one strided array
    # over the planes' memory, copied in one call.
    planes = np.ascontiguousarray(planes)                               # (one buffer: it is)
    b = planes.strides                                                  # bytes: (p, q, c, pixel)
    for u in range(kh):
        for v in range(kw):
            first = (u % 2) * b[0] + (v % 2) * b[1] + ((row0 + u // 2) * wq + v // 2) * b[3]
            down = ((u + 1) % 2 - u % 2) * b[0] + ((u + 1) // 2 - u // 2) * wq * b[3]  # pi: 0 -> 1
            right = ((v + 1) % 2 - v % 2) * b[1] + ((v + 1) // 2 - v // 2) * b[3]     # pj: 0 -> 1
            cols[:, u, v] = np.ndarray((c, 2, 2, q), planes.dtype, buffer=planes, offset=first,
                                       strides=(b[2], down, right, b[3]))  # (bounds checked)
    return cols.reshape(c * kh * kw, 4 * q)


# ---- the weight gradient of a band ---------------------------------------------------------------

# A product with few outputs over a long inner dimension runs at a fraction of OpenBLAS's speed, and
# NumPy holds the GIL through a product of few outputs; a batch of shorter products, summed in
# order, is faster and releases it (docs/performance.md, "Weight gradients").  Pixels per product
# of the batch, and the most outputs (O * K) it is used for:
WEIGHT_GRAD_PIXELS = 1024
SMALL_PRODUCT_OUTPUTS = 1024


def weight_grad(dy_band, cols):
    """dW2 = dy_band @ cols^T, (O, P) x (K, P) -> (O, K), computed as the transpose of
    cols @ dy_band^T (K, O): the same sum over the P pixels, in the order OpenBLAS runs faster for
    these shapes.

    Where O * K is small (SMALL_PRODUCT_OUTPUTS) and P long, the P pixels are cut into B runs of
    near WEIGHT_GRAD_PIXELS, multiplied as one batch of products (views, no copy), and the B
    results added in order, then the last few pixels: a fixed order that depends on the sizes
    only, so the same bits on any number of threads.
    """
    o, p = dy_band.shape
    k = cols.shape[0]
    runs = p // WEIGHT_GRAD_PIXELS
    if o * k > SMALL_PRODUCT_OUTPUTS or runs < 2:
        return (cols @ dy_band.T).T
    run = p // runs                                                     # pixels per product
    main = runs * run
    parts = np.matmul(cols[:, :main].reshape(k, runs, run).transpose(1, 0, 2),    # (B, K, run)
                      dy_band[:, :main].reshape(o, runs, run).transpose(1, 2, 0))  # (B, run, O)
    total = parts.sum(axis=0)                                           # (K, O)
    if main < p:                                                        # the last p - main
        total += cols[:, main:] @ dy_band[:, main:].T
    return total.T
