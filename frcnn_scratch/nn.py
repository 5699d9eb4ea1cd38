"""The layers of the backbone and heads, each with its backward written right beside its forward.

Faster R-CNN's network is ordinary: 3x3 convolutions with ReLU, 2x2 max pooling, fully connected
layers.  Here each layer is a small class in the style of micrograd:

    y = layer.forward(x)      # caches what backward needs
    dx = layer.backward(dy)   # dy = dL/dy; returns dL/dx and fills layer.grads (same keys as params)

`layer.params` maps a name ("weight", "bias") to a NumPy array; SGD updates those arrays in place,
so the layer sees the new values on its next forward.  Arrays are float32.  A layer computes in
the dtype of its parameters, so `layer.astype(np.float64)` switches it to float64 for gradient
checks; layers without parameters keep float64 inputs as float64 and make everything else float32.

    net = Sequential(Conv2d(3, 16, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2),
                     Flatten(), Linear(16 * 16 * 16, 10, rng=rng))
    opt = SGD(net.params, lr=0.01)
    y = net.forward(x)                    # (N, 3, 32, 32) -> (N, 10)
    net.backward(dL_dy)
    opt.step(net.grads)

backward overwrites `grads` (it does not accumulate): call each layer once per step, and
backward after the forward whose cache it uses.  Under `with no_grad():` (inference) a forward
keeps nothing for a backward pass, and skips what only the backward needs: max pooling's argmax,
ReLU's mask.
"""
import contextlib
import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from . import threads


# ----------------------------------------------------------------------------- initialisation

def he_normal(shape, fan_in, rng=None):
    """He et al. 2015 ("Delving Deep into Rectifiers", eq. 10): w ~ N(0, 2 / fan_in).

    Args:
        shape: shape of the weight array, e.g. (out, in, kh, kw).
        fan_in: inputs feeding one output unit (in * kh * kw for a conv, in for a linear layer).
        rng: np.random.Generator (or an int seed, or None for fresh entropy).
    Returns:
        float32 array of `shape`.
    """
    fan_in = int(fan_in)
    if fan_in <= 0:
        raise ValueError(f"fan_in: expected a positive int, got {fan_in}")
    rng = np.random.default_rng(rng)
    std = np.sqrt(2.0 / fan_in)
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _init_weight(shape, fan_in, rng, std):
    """std None -> he_normal; else N(0, std^2) (the paper code's "gaussian" filler)."""
    if std is None:
        return he_normal(shape, fan_in, rng)
    std = float(std)
    if not np.isfinite(std) or std < 0:
        raise ValueError(f"std: expected a finite number >= 0 or None, got {std}")
    return (np.random.default_rng(rng).standard_normal(shape) * std).astype(np.float32)


# ----------------------------------------------------------------------------- no_grad

_state = threading.local()          # per thread: whether forward passes keep a cache, whether
                                    # layers scan for NaN / Inf


@contextlib.contextmanager
def _switched_off(flag):
    """Set this thread's `flag` False inside the block; restore it after (errors included)."""
    previous = getattr(_state, flag, True)
    setattr(_state, flag, False)
    try:
        yield
    finally:
        setattr(_state, flag, previous)


def no_grad():
    """Forward passes inside this block (on this thread) keep nothing for a backward pass, as
    torch.no_grad: for inference.  Max pooling then finds only the max, not which offset held it,
    ReLU writes no mask, and each layer drops the cache of any earlier forward, so that a
    backward after it is refused instead of using stale values."""
    return _switched_off("grad")


def grad_enabled():
    """False inside no_grad (on this thread), else True."""
    return getattr(_state, "grad", True)


def no_finite_checks():
    """Layers called inside this block (on this thread) skip their scans of x and dy for NaN and
    Inf; shapes and dtypes are still checked.  For a caller that checks its own input and
    results: FasterRCNN checks the image, the feature map and every gradient of a step, so that a
    NaN still stops it, without a pass over each layer's arrays on the way (those scans took
    8-17 ms of a 190 ms training step at 480 x 640 on one thread of a 2-core Xeon)."""
    return _switched_off("finite_checks")


def finite_checks_enabled():
    """False inside no_finite_checks (on this thread), else True."""
    return getattr(_state, "finite_checks", True)


# ----------------------------------------------------------------------------- input checks

def _int_pair(value, name, minimum):
    """An int or (h, w) of ints >= minimum -> (h, w)."""
    if np.isscalar(value):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
        whole = all(int(v) == v for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an int or (h, w), got {value!r}") from None
    if not whole or h < minimum or w < minimum:
        raise ValueError(f"{name}: expected ints >= {minimum}, got {value!r}")
    return h, w


def _float_dtype(x):
    """The dtype a layer without parameters computes in: float64 stays float64, all else float32."""
    return np.float64 if x.dtype == np.float64 else np.float32


def _as_input(x, name, dtype, ndim=None, channels=None, layer="", finite=True):
    """`x` as a `dtype` array of `ndim` dims (and `channels` at axis 1), finite; else ValueError.

    finite=False leaves the NaN / Inf check to the caller, which does it block by block while the
    block is in cache (`_blocks_finite`) instead of in a pass of its own.
    """
    where = f"{layer} {name}" if layer else name
    try:
        x = np.asarray(x)
        x = x.astype(dtype, copy=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected an array of numbers ({e})") from None
    if ndim is not None and x.ndim != ndim:
        want = {4: f"(N, {channels if channels is not None else 'C'}, H, W)",
                2: f"(N, {channels if channels is not None else 'F'})"}.get(ndim, f"{ndim}-D")
        raise ValueError(f"{where}: expected shape {want}, got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        want = f"(N, {channels}, H, W)" if x.ndim == 4 else f"(N, {channels})"
        raise ValueError(f"{where}: expected shape {want}, got {tuple(x.shape)}")
    if finite and finite_checks_enabled() and not _all_finite(x):
        raise ValueError(f"{where}: contains NaN or Inf")
    return x


def _finite(x):
    """No NaN or Inf in x (one thread)."""
    return bool(np.isfinite(x).all())


def _unchecked(x):
    """_finite's stand-in inside no_finite_checks: says yes without looking."""
    return True


def _finite_check():
    """The check that the blocks of a layer call on this thread's behalf (they may run on other
    threads, which do not see its no_finite_checks): _finite, or _unchecked inside it."""
    return _finite if finite_checks_enabled() else _unchecked


# np.maximum(x, 0) runs 4x slower than np.maximum(x, zeros) with an array of zeros (numpy 2.4:
# 51 against 11 us on 154k float32 values; the comparison with a scalar is not vectorised in
# maximum, where it is in greater).  ReLU reads such an array: a view of one shared buffer of
# zeros (read-only), for blocks up to this many values (past them, the scalar: no big buffer).
_ZEROS_MAX = 1 << 22
_zero_buffers = {}                   # dtype -> the largest zeros made so far


def relu_into(x, out):
    """out = max(x, 0), element by element (out may be x)."""
    if x.size > _ZEROS_MAX:
        return np.maximum(x, x.dtype.type(0), out=out)
    zeros = _zero_buffers.get(x.dtype)
    if zeros is None or zeros.size < x.size:
        zeros = np.zeros(max(x.size, 1 << 16), x.dtype)
        zeros.setflags(write=False)
        _zero_buffers[x.dtype] = zeros                            # (a race makes two: both zeros)
    return np.maximum(x, zeros[:x.size].reshape(x.shape), out=out)


def _all_finite(x):
    """np.isfinite(x).all(), by blocks of channels on threads for large 4-D arrays."""
    return all(_by_channels(lambda part: _finite(x[part]), x))


def _as_grad(dy, cache_shape, dtype, layer, finite=True):
    """Check the incoming gradient dL/dy against the shape of the cached forward output."""
    if cache_shape is None:
        raise RuntimeError(f"{layer}.backward called before forward (or after a forward under "
                           f"nn.no_grad, which keeps nothing for it)")
    dy = _as_input(dy, "dy", dtype, layer=layer + ".backward", finite=finite)
    if dy.shape != cache_shape:
        raise ValueError(f"{layer}.backward dy: expected the forward output's shape {cache_shape}, "
                         f"got {tuple(dy.shape)}")
    return dy


# Element-wise layers (ReLU, max pooling) work on blocks of channels of about this many elements
# (1 MB of float32), on one thread too: a block's temporaries stay in cache between the passes
# over it (a 2 x 2 max pool of a 16 x 600 x 1000 map: 23 ms forward and 12.5 backward as one
# block, 8.4 and 8.0 in blocks).  The blocks are shared out over the threads.
BLOCK_SIZE = 1 << 18


# A convolution's band, pooled as soon as it is made (Conv2d.forward_pooled), is pooled in blocks of
# about this many input values: it is already in cache, and fewer, larger passes over it take
# the GIL less often (the first layer's forward at 480 x 640 on two threads of a 2-core EPYC:
# 7.7-8.5 -> 7.0 ms against blocks of BLOCK_SIZE; one thread: the same).
BAND_POOL_SIZE = 1 << 20


def _blocks_finite(flags, where):
    """Raise the NaN / Inf error of _as_input unless every block's check passed."""
    if not all(flags):
        raise ValueError(f"{where}: contains NaN or Inf")


# ... and an array of at least this many elements is cut into one block per thread at least
# (the backbone's last ReLU, 64 x 60 x 80 at 480 x 640, was one block: one of two threads waited;
# from 32k elements on, a 240 x 400 prediction on two threads was 7% slower: the pieces were too
# small to pay for waking a thread).  The blocks' work is element by element: their number
# changes no result.
SHARED_SIZE = 1 << 17


def _by_channels(fn, x):
    """[fn(part), ...] for blocks of channels of x (N, C, ...) of about BLOCK_SIZE elements (and
    at least one a thread above SHARED_SIZE), on threads.parallel, part an index
    (slice(None), slice(c0, c1)); one call with everything for small or non-4-D arrays."""
    pieces = 1
    if x.ndim == 4:
        pieces = max(x.size // BLOCK_SIZE, min(threads.workers(), x.size // SHARED_SIZE))
    if pieces <= 1:
        return threads.parallel(fn, [(Ellipsis,)])
    blocks = threads.chunks(x.shape[1], pieces)                       # [(c0, c1), ...]
    return threads.parallel(fn, [(slice(None), slice(c0, c1)) for c0, c1 in blocks])


# ----------------------------------------------------------------------------- base class

class Module:
    """A layer: forward(x) -> y, backward(dy) -> dx; params / grads dicts of arrays."""

    def __init__(self):
        self.params = {}
        self.grads = {}

    def __call__(self, x):
        return self.forward(x)

    def astype(self, dtype):
        """Cast the parameters (e.g. to float64 for gradient checks); returns self.

        Makes new arrays: build the optimizer after calling this, not before.
        """
        for k in self.params:
            self.params[k] = self.params[k].astype(dtype)
        self.grads = {}
        return self

    def __repr__(self):
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.params.items())
        return f"{type(self).__name__}({shapes})"


# ----------------------------------------------------------------------------- Conv2d

# Bytes of im2col columns the convolution builds at a time (one band of output rows): a band's
# columns are multiplied while still in cache (L2 / L3), never 9x the input at once.  Measured on
# whole training steps (2-core EPYC, 240 x 400 to 600 x 1000): 2 MB and 4 MB bands within 2% on
# one thread, 2 MB 1-8% faster on two, 1 MB 4-7% slower on one.  The bands set the order of the
# sums, so 4 MB stays: with it every convolution at the demo's and the hard shapes' sizes is one
# band, summed as the textbook whole-image product is.
BAND_BYTES = 4 << 20
# A forward pass of a single band is worked as two halves of its rows when it has at least this
# many bytes of columns, so that two threads share it (the 64-channel layers at 240 x 400: a
# prediction there 12.1 -> 11.4 ms on two threads; no layer at the demo's 96 x 160).  The halves
# depend on the sizes only, so the results do not depend on the thread count.
SPLIT_BYTES = 3 << 20


def im2col(xp, kh, kw, sh, sw, row0, row1, out=None):
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


def col2im_add(dxp, dcols, kh, kw, sh, sw, row0, row1):
    """The adjoint of im2col: add the column gradients back onto the input pixels they came from.

    dxp: (C, Hp, Wp) gradient of one padded image, added to in place.  dcols: (C*kh*kw, bh*Wo).
    Kernel offset (u, v) took x[.., i*s + u, j*s + v] into column (u, v, i, j); the loop adds
    through the same strided slices (windows overlap, so a pixel gets several adds).
    """
    c = dxp.shape[0]
    bh = row1 - row0
    wo = dcols.shape[1] // bh
    dcols = dcols.reshape(c, kh, kw, bh, wo)
    for u in range(kh):
        for v in range(kw):
            r = row0 * sh + u
            dxp[:, r:r + sh * bh:sh, v:v + sw * wo:sw] += dcols[:, u, v]


# ---- the flat layout of a stride-1 convolution
#
# A stride-1 convolution reads, for kernel offset (u, v), the padded image shifted by u rows and v
# columns.  Store each channel of the padded image as one flat row of Hp * Wp values (image row r
# starts at r * Wp) and number the output pixels the same way, q = i * Wp + j: the value under
# output pixel q at offset (u, v) is then flat[q + u * Wp + v], so a shift is an offset,
#     cols[(c, u, v), q] = flat[c, q + u * Wp + v],
# and each block (u, v) of the columns is one contiguous slice of the image: a copy at memory
# speed, where im2col gathers Wo-long pieces of rows.  The adjoint adds contiguous slices back.
# The price: output rows are Wp wide, not Wo.  Their last Wp - Wo values (j >= Wo) read across the
# end of an image row; they are junk, never returned, and their gradient is set to 0 before the
# backward's products, so that they add nothing.  Each flat channel has kw - 1 zeros after its
# last row, where the junk of the last output row reads (so that the junk is finite).  (One
# thread of a 2-core Xeon, the detector at 480 x 640: conv2, 16 -> 32 channels at 240 x 320,
# forward 17.1 -> 14.0 ms and backward 32.8 -> 29.0 against im2col.)

def flat_im2col(xp, kh, kw, wp, row0, row1, out=None):
    """Columns of output rows [row0, row1) of one flat padded image: (C*kh*kw, (row1-row0)*Wp).

    xp: (C, Hp*Wp + kw - 1), each channel's padded image row after row (see above).  Column q of
    the band is output pixel (row0 + q // Wp, q % Wp); rows ordered (c, u, v) like im2col's.
    A 1x1 kernel's columns are the image itself: a view, no copy.
    """
    c = xp.shape[0]
    q = (row1 - row0) * wp                                             # the band's pixels
    if kh == kw == 1:
        return xp[:, row0 * wp:row0 * wp + q]                          # (C, bh*Wp), a view
    cols = np.empty((c, kh, kw, q), xp.dtype) if out is None else \
        out[:c * kh * kw * q].reshape(c, kh, kw, q)
    # cols[:, u, v] = xp[:, start:start + q] with start = (row0 + u) * Wp + v, for every (u, v):
    # the kh * kw shifted slices as one strided view of xp, [c, u, v, t] = xp[c, start + t], and
    # one copy (kh * kw copies took the GIL kh * kw times: on two threads a band's copies were 2x
    # slower than on one)
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
    one product each way instead of a product and a pass over y (or dy) for the bias.  (One
    thread of a 2-core Xeon, a band of each of the detector's 3 x 3 layers at 480 x 640: the
    forward 10-25% faster, the weight gradient 5-17%.)"""
    buffer[k * q:(k + 1) * q] = 1
    return buffer[:(k + 1) * q].reshape(k + 1, q)


# ---- the polyphase layout of a first convolution under a 2 x 2 max pool
#
# A 2 x 2 max pool of stride 2 takes, for window (a, b), the max of y[2a + pi, 2b + pj] over the
# four phases (pi, pj) in {0, 1}^2.  Split y into its four polyphase components, the planes
# Y[pi, pj][a, b] = y[2a + pi, 2b + pj], and the pool is the element-wise max of four contiguous
# planes: 3x faster than over y's strided views, which is how it reads the flat layout.  A 3 x 3
# convolution can make those planes directly: split its padded input the same way,
# X[p, q][a, b] = xp[2a + p, 2b + q]; output pixel (2a + pi, 2b + pj) at kernel offset (u, v) reads
#     xp[2a + pi + u, 2b + pj + v] = X[r % 2, s % 2][a + r // 2, b + s // 2],  r = pi + u, s = pj + v,
# so in each plane stored flat (row a starts at a * Wq) every block (u, v, pi, pj) of the columns is
# again one contiguous slice, shifted by (r // 2) * Wq + s // 2: the flat layout's trick, on planes
# a quarter of the size.  The columns hold the four phases side by side, and the product gives y's
# four planes (O, 2, 2, rows, Wq) at once; a pooled gradient unpools into four planes the same way.
# Only the pixels under a window are made (a row or column no window covers, at odd sizes, is
# dropped by the pool and gets no gradient); each plane row has Wq = (Wp + 1) // 2 values, those
# past Wo // 2 junk, and each plane one zero after its last row, where the junk of the last row
# reads.  The price: 36 copies of a quarter of a block per band where the flat layout makes 9, and
# a strided pass to split the input.  For the image (3 channels) that is cheap; for a layer that
# also sends a gradient back, the adjoint (36 adds per band, then the planes put back together)
# cost more than the pool saved (480 x 640, one thread of a 2-core EPYC: the pool and unpooling
# 14.6 -> 9.5 ms, the copies and adds 9.1 -> 17.7), so only a first layer works this way
# (Conv2d._polyphase).  The first layer at 480 x 640: a training step 116.5 -> 113.8 ms.

def polyphase_split(x, out, ph, pw):
    """out (2, 2, C, Hq*Wq + 1) = the polyphase planes of x (C, H, W) zero-padded by (ph, pw):
    out[p, q, :, a*Wq + b] = xp[:, 2a + p, 2b + q], zero outside x and after the last row."""
    c, h, w = x.shape
    hq, wq = _plane_size(out, c, h + 2 * ph, w + 2 * pw)
    out.fill(0)
    for p in range(2):
        rows = _phase(p, ph, h, hq)
        for q in range(2):
            cols = _phase(q, pw, w, wq)
            plane = out[p, q, :, :hq * wq].reshape(c, hq, wq)
            plane[:, rows[0], cols[0]] = x[:, rows[1], cols[1]]        # every 2nd row, column
    return out


def _plane_size(planes, c, hp, wp):
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
    # start = (row0 + r // 2) * Wq + s // 2 (a shift in plane (r % 2, s % 2)), for the four phases
    # (pi, pj).  Two values of pi are always a step in memory (from plane row r to r + 1), and so are
    # two of pj: the four slices of one (u, v) are one strided array over the planes' memory,
    # copied in one call (36 calls took the GIL 36 times; on two threads they ran 2x slower).
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


# NumPy releases the GIL during a matrix product only when the product has more than this many
# outputs; a smaller one (the first layer's weight gradient, 16 x 28) holds it throughout, and the
# bands on other threads wait.  A batch of products releases it.
_GIL_FREE_OUTPUTS = 500
# A product with few outputs over a long inner dimension (a weight gradient sums over every pixel
# of a band) runs at a third of OpenBLAS's speed once that dimension is long: 16 x 28 outputs over
# a band of 38,520 pixels (the first layer at 480 x 640) at 30-33 GFLOP/s on one core of an
# EPYC with AVX-512 kernels, against 70-80 as a batch of products over 963 pixels each, summed.
# Products of more outputs (the deeper layers, 32 x 145 and up) lose a little as a batch, so they
# stay one product.  Pixels per product of the batch, and the most outputs it is used for:
WEIGHT_GRAD_PIXELS = 1024
SMALL_PRODUCT_OUTPUTS = 1024


def _weight_grad(dy_band, cols):
    """dW2 = dy_band @ cols^T, (O, P) x (K, P) -> (O, K), returned as the transpose of
    cols @ dy_band^T (K, O): the same sum over the P pixels, but OpenBLAS runs this order faster
    for these shapes (few outputs, a long inner dimension): 1.3-1.7x with its AVX-512 kernels,
    1.04-1.08x with AVX2 (the backbone's whole backward at 480 x 640: 1.18x with AVX-512).

    Where O * K is small (SMALL_PRODUCT_OUTPUTS) and P long, the P pixels are cut into B runs of
    near WEIGHT_GRAD_PIXELS, multiplied as one batch of products (views, no copy), and the B
    results added in order, then the last few pixels that the equal runs leave: the same sum in a
    fixed order that depends on the sizes only (so on any number of threads the same bits), 2.3x
    faster there, and a batch lets NumPy release the GIL (see _GIL_FREE_OUTPUTS).
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


def _pad_into(xp, x, ph, pw):
    """xp[..., ph:-ph, pw:-pw] = x with a border of zeros: each value written once."""
    h, w = x.shape[-2:]
    xp[..., :ph, :] = 0
    xp[..., ph + h:, :] = 0
    xp[..., ph:ph + h, :pw] = 0
    xp[..., ph:ph + h, pw + w:] = 0
    xp[..., ph:ph + h, pw:pw + w] = x


class Conv2d(Module):
    """2-D convolution (cross-correlation, as every framework computes it) by im2col.

    y[n, o, i, j] = b[o] + sum_{c, u, v} W[o, c, u, v] * xp[n, c, i*s + u, j*s + v]
    where xp is x zero-padded by `padding`.  Output size: Ho = (H + 2p - kh) // s + 1.

    im2col gathers every (c, u, v) window value into one column per output pixel, so the sum is
    one matrix product:  y = W2 @ cols,  W2 (out, C*kh*kw), cols (C*kh*kw, Ho*Wo) per image.
    The bias joins the product as one more column of W2, over a row of ones (`ones_below`).

    The columns are 9x the input for a 3x3 kernel (44 MB for 16 channels at 240 x 320), so the
    layer builds them one band of output rows at a time (`band_bytes`, a few MB): a band's
    columns are multiplied while still in cache, and the backward pass rebuilds them from the
    padded input instead of keeping them.  Each band is the same product on fewer columns:
    band_bytes=None does the whole image at once, the textbook form (tests check they agree).
    A banded stride-1 convolution (every one of the detector's) keeps its padded input in the
    flat layout (`flat_im2col`): the columns are then contiguous slices of the image, and its
    output rows are computed Wp wide and returned as a view of their first Wo values.
    Under a max pool (conv -> pool in a Sequential) each band is pooled as soon as it is made
    (`forward_pooled`) and the pool's gradient is unpooled band by band in the backward pass
    (`PooledGradient`): the conv's full output and its full gradient are never stored.

    Args:
        in_ch, out_ch: channels in and out.
        kernel_size, stride, padding: an int or (h, w).
        rng: np.random.Generator (or int seed) for the init of `weight`; bias starts at 0.
        std: None -> He-normal (std = sqrt(2 / (in_ch*kh*kw))); a number -> N(0, std^2), as the
            paper code initialises the RPN's conv layers (0.01).
        need_input_grad: False -> backward fills grads but returns None instead of dx.  For a
            network's first layer, whose input is the image: nothing learns from dL/d(image),
            and skipping it saves the dcols product and the col2im loop.
        band_bytes: bytes of columns per band (BAND_BYTES); None: the whole image in one band.
    Params:
        weight (out_ch, in_ch, kh, kw), bias (out_ch,).
    Memory: forward keeps the padded input (not the columns) for the backward pass.
    """

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, rng=None, std=None,
                 need_input_grad=True, band_bytes=BAND_BYTES):
        super().__init__()
        self.need_input_grad = bool(need_input_grad)
        self.in_ch = _int_pair(in_ch, "in_ch", 1)[0]
        self.out_ch = _int_pair(out_ch, "out_ch", 1)[0]
        self.kernel_size = _int_pair(kernel_size, "kernel_size", 1)
        self.stride = _int_pair(stride, "stride", 1)
        self.padding = _int_pair(padding, "padding", 0)
        if band_bytes is not None and int(band_bytes) < 1:
            raise ValueError(f"band_bytes: expected a positive int or None, got {band_bytes!r}")
        self.band_bytes = None if band_bytes is None else int(band_bytes)
        kh, kw = self.kernel_size
        fan_in = self.in_ch * kh * kw
        self.params["weight"] = _init_weight((self.out_ch, self.in_ch, kh, kw), fan_in, rng, std)
        self.params["bias"] = np.zeros(self.out_ch, dtype=np.float32)
        self._cache = None

    def _bands(self, ho, wo, itemsize, multiple=1, groups=2):
        """[(row0, row1), ...] covering the Ho output rows, each band's columns <= band_bytes, and
        never fewer than kh rows (see backward).  Several bands are made a multiple of `groups`
        near-equal ones where the rows allow (their rows differ by one window's at most), so that
        two threads share them evenly (11 bands of 22 rows, the last of 20, at 240 x 320 became
        12 of 20: a 480 x 640 step 2-3% faster on two threads; the backward's two rounds of half
        the bands each ask for groups=4).
        The bands depend on the sizes only, never on the number of threads: the sums, and so the
        results, are the same on any number.  multiple: every band but the last starts and ends
        on a multiple of this many rows (whole windows of the pool that forward_pooled feeds)."""
        kh, kw = self.kernel_size
        row_bytes = self.in_ch * kh * kw * wo * itemsize
        rows = ho if self.band_bytes is None else max(kh, min(ho, self.band_bytes // row_bytes))
        count = -(-ho // rows)                                        # ceil(Ho / rows)
        units = -(-ho // multiple)                                    # rows of whole windows
        if count > 1:
            count = -(-count // groups) * groups                      # a multiple of groups
            if units // count * multiple < kh:                        # bands of kh rows, the
                rows = -(-kh // multiple) * multiple                  # last one shorter
                return [(r, min(ho, r + rows)) for r in range(0, ho, rows)]
        # near-equal bands of whole windows: 75 rows in 8 bands are 9 or 10 each, not 7 of 10 and
        # one of 5 (whose round left one of two threads waiting: 600 x 1000, two threads)
        bounds = [min(ho, units * j // count * multiple) for j in range(count + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def _columns_are_x(self):
        """Whether a band's columns are a view of the flat input itself (a 1 x 1 kernel): no copy,
        and so no row of ones under them; the bias is then added on its own."""
        return self._flat() and self.kernel_size == (1, 1)

    def _flat(self):
        """Whether this layer works in the flat layout: banded and stride 1 (flat_im2col)."""
        return self.band_bytes is not None and self.stride == (1, 1)

    def forward(self, x):
        """x (N, in_ch, H, W) -> y (N, out_ch, Ho, Wo)."""
        return self._forward(x, None)

    def forward_pooled(self, x, pool, relu=None):
        """pool.forward(self.forward(x)) for a MaxPool2d whose windows tile its input (stride =
        kernel), worked band by band: each band of output rows is pooled as soon as it is made,
        while in cache, and y itself is never stored (Sequential does this for conv -> pool).
        The same values as the two layers' own forward passes; pool keeps what its backward
        needs, as after its own forward.

        relu: a ReLU after the pool (conv -> pool -> ReLU), applied to each band too.  Its
        gradient, dy where the pooled value is > 0 and 0 elsewhere, is folded into the pool's
        argmax: a window whose max is <= 0 gets an offset no value has (its offset OR kh * kw,
        which is at least kh * kw), so the pool's backward sends it nothing.  The ReLU's own
        backward is then skipped (it keeps no mask; Sequential knows)."""
        if not pool.tiles():
            y = pool.forward(self.forward(x))
            return y if relu is None else relu.forward(y)
        if relu is not None:
            relu._mask = None                        # its backward is the pool's now
        return self._forward(x, pool, relu is not None)

    def _polyphase(self, pool):
        """Whether forward_pooled works in the polyphase layout: a banded 3 x 3 convolution of
        stride 1 and padding 1 under a 2 x 2 max pool of stride 2, with no input gradient to
        make (the backbone's first layer, whose input is the image; see the layout's notes)."""
        return (pool is not None and self._flat() and self.kernel_size == (3, 3) and
                self.padding == (1, 1) and pool.kernel_size == (2, 2) and pool.tiles() and
                not self.need_input_grad)

    def _forward(self, x, pool, relu=False):
        w, b = self.params["weight"], self.params["bias"]  # (O, C, kh, kw), (O,)
        x = _as_input(x, "x", w.dtype, ndim=4, channels=self.in_ch, layer="Conv2d", finite=False)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, c, h, wd = x.shape
        if h + 2 * ph < kh or wd + 2 * pw < kw:
            raise ValueError(f"Conv2d x: padded input {(h + 2 * ph, wd + 2 * pw)} is smaller than "
                             f"the kernel {(kh, kw)}; got x of shape {x.shape}")
        hp, wp = h + 2 * ph, wd + 2 * pw
        ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
        layout = "polyphase" if self._polyphase(pool) and ho >= 2 and wo >= 2 else \
            "flat" if self._flat() else "im2col"
        finite = _finite_check()
        # `width`: the product's columns per band row: Wp pixels (flat), Wo (im2col), or in the
        # polyphase layout a row of windows, four planes of Wq
        if layout == "polyphase":                  # (N, 2, 2, C, Hq*Wq + 1): four planes each
            hq, wq = (hp + 1) // 2, (wp + 1) // 2
            xp = np.empty((n, 2, 2, c, hq * wq + 1), dtype=x.dtype)
            width = 4 * wq
        elif layout == "flat":                     # (N, C, Hp*Wp + kw - 1): rows end to end
            xp = np.empty((n, c, hp * wp + kw - 1), dtype=x.dtype)
            padded = xp[..., :hp * wp].reshape(n, c, hp, wp)            # a view of xp
            width = wp
        else:
            xp = padded = np.empty((n, c, hp, wp), dtype=x.dtype)       # (N, C, Hp, Wp)
            width = wo

        def pad(part):                                                # (np.pad: slower)
            if layout == "polyphase":
                channels = part[1] if len(part) > 1 else slice(None)
                for i in range(n):
                    polyphase_split(x[i, channels], xp[i, :, :, channels], ph, pw)
            else:
                _pad_into(padded[part], x[part], ph, pw)
            if layout == "flat":
                xp[part][..., hp * wp:] = 0                           # where the junk reads
            return finite(x[part])                                # checked while in cache

        _blocks_finite(_by_channels(pad, x), "Conv2d x")
        w2 = w.reshape(self.out_ch, -1)                               # (O, K)  K = C*kh*kw
        k = w2.shape[1]
        view = self._columns_are_x()
        if not view:
            w2 = np.concatenate([w2, b[:, None]], axis=1)             # [W2 | b] (O, K+1)
        if pool is None:
            y = np.empty((n, self.out_ch, ho, width), dtype=x.dtype)  # (N, O, Ho, Wp | Wo)
        else:                                                         # pool's output instead
            pooled = pool._start((n, self.out_ch, ho, wo), x.dtype)

        def band(task):                                               # one band of one image
            i, (row0, row1) = task
            q = (row1 - row0) * width                                 # the band's pixels
            buffer = None if view else threads.scratch((k + 1) * q, x.dtype)
            if layout == "polyphase":
                cols = polyphase_im2col(xp[i], kh, kw, wq, row0, row1, out=buffer)
            elif layout == "flat":
                cols = flat_im2col(xp[i], kh, kw, wp, row0, row1, out=buffer)
            else:
                cols = im2col(xp[i], kh, kw, sh, sw, row0, row1, out=buffer)
            if not view:
                cols = ones_below(buffer, k, q)                       # [cols; 1] (K+1, q)
            if pool is None:
                y_band = y[i, :, row0:row1].reshape(self.out_ch, -1)  # (O, bh*width), a view of y
            else:                                                     # a buffer, pooled at once
                y_band = threads.scratch(self.out_ch * q, x.dtype, slot="y").reshape(self.out_ch, -1)
            np.matmul(w2, cols, out=y_band)                           # y = W2 @ cols + b
            if view:
                y_band += b[:, None]
            if layout == "polyphase":                                 # (O, 4, rows, Wo // 2)
                planes = y_band.reshape(self.out_ch, 4, row1 - row0, wq)      # rows Wq wide
                return pool._pool_planes(planes, i, row0, pooled, finite, relu)
            if pool is not None:
                rows = y_band.reshape(self.out_ch, row1 - row0, width)[..., :wo]
                return pool._pool_rows(rows, i, row0, pooled, finite, relu)
            return True

        multiple = 1 if pool is None else pool.kernel_size[0]         # bands of whole windows
        if layout == "polyphase":                                     # bands of window rows
            bands, multiple = self._bands(ho // 2, 2 * wo, x.itemsize), 1
            rows = ho // 2
        else:
            bands, rows = self._bands(ho, wo, x.itemsize, multiple), ho
        half = rows // 2 // multiple * multiple
        if n == 1 and len(bands) == 1 and half >= kh and \
                k * ho * wo * x.itemsize >= SPLIT_BYTES:                    # see SPLIT_BYTES
            bands = [(0, half), (half, rows)]
        done = threads.parallel(band, [(i, rows) for i in range(n) for rows in bands])
        self._cache = (xp, (n, self.out_ch, ho, wo), layout) if grad_enabled() else None
        if pool is not None:
            _blocks_finite(done, "MaxPool2d x")
            return pool._finish(pooled)
        return y[..., :wo]                                            # without the junk columns

    def backward(self, dy):
        """dy (N, out_ch, Ho, Wo) -> dx (N, in_ch, H, W), or None if not need_input_grad;
        fills grads weight, bias.  dy may be the PooledGradient of a max pool above (Sequential
        passes one): each band's rows of it are then unpooled into a buffer, not read.  After a
        forward in the polyphase layout the conv's output fed the pool alone: a row or column no
        window covers (odd sizes) has no gradient, and a dy array's values there are not read."""
        w = self.params["weight"]
        xp, y_shape, layout = self._cache if self._cache is not None else (None, None, None)
        pooled = isinstance(dy, PooledGradient)        # dy from the max pool above, unpooled
        if pooled:                                     # band by band below (checked there)
            if y_shape is None or dy.shape != y_shape:
                _as_grad(np.empty(dy.shape, w.dtype), y_shape, w.dtype, "Conv2d", finite=False)
        else:
            dy = _as_grad(dy, y_shape, w.dtype, "Conv2d", finite=False)
        finite = _finite_check() if not pooled else _unchecked
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, o, ho, wo = y_shape
        if layout == "im2col":
            hp, wp = xp.shape[2:]
        else:                                      # stride 1: the forward's padded size
            hp, wp = ho + kh - 1, wo + kw - 1
        if layout == "flat":
            padded = xp[..., :hp * wp].reshape(xp.shape[:2] + (hp, wp))  # (N, C, Hp, Wp)
        elif layout == "im2col":
            padded = xp
        wq, wa = (wp + 1) // 2, wo // 2            # polyphase: a plane's row, the windows in it
        width = {"polyphase": 4 * wq, "flat": wp, "im2col": wo}[layout]   # as in the forward
        w2 = w.reshape(o, -1)                                         # (O, K)
        # y = W2 @ cols + b   =>   dW2 = sum over images and bands of dy @ cols^T,
        #                          db = sum of dy (both in one product: ones_below),
        #                          dcols = W2^T @ dy, then col2im
        dxp = np.zeros(xp.shape, dtype=w.dtype) if self.need_input_grad else None
        if layout == "polyphase":                                     # bands of window rows
            bands = self._bands(ho // 2, 2 * wo, xp.itemsize, groups=4)
        else:
            bands = self._bands(ho, wo, xp.itemsize, groups=4)       # two rounds, each even

        # In the flat layout both parts read the band's dy Wp wide (its junk columns 0) and the
        # weight part multiplies it by the flat columns of the padded image: the junk columns add
        # 0 * (a finite junk value) = 0 to dW2, and the copies are contiguous slices (im2col's
        # gather was 11 ms of a 480 x 640 step).  The polyphase layout does the same on its four
        # planes.  Otherwise the weight part reads dy as it comes and im2col's columns.
        def dy_rows(i, row0, row1):                                   # (O, bh*width)
            """Rows [row0, row1) of image i's dy as the band's product has them: `width` wide,
            its junk columns 0 (in the polyphase layout, window rows: four planes each)."""
            rows = threads.scratch(o * (row1 - row0) * width, w.dtype, slot="dy")
            if layout == "polyphase":
                planes = rows.reshape(o, 2, 2, row1 - row0, wq)
                if pooled:
                    dy.planes(i, row0, row1, planes)
                else:                                                 # phase (pi, pj) of y
                    for pi in range(2):
                        for pj in range(2):
                            planes[:, pi, pj, :, :wa] = \
                                dy[i, :, 2 * row0 + pi:2 * row1:2, pj:2 * wa:2]
                    planes[..., wa:] = 0                              # the junk adds nothing
                return rows.reshape(o, -1)
            if pooled:
                return dy.rows(i, row0, row1, rows.reshape(o, row1 - row0, width)).reshape(o, -1)
            if layout == "im2col":
                return dy[i, :, row0:row1].reshape(o, -1)             # dy as it comes
            rows = rows.reshape(o, row1 - row0, wp)
            rows[:, :, :wo] = dy[i, :, row0:row1]
            rows[:, :, wo:] = 0                                       # the junk adds nothing
            return rows.reshape(o, -1)

        def columns(i, row0, row1, out):                              # (K, bh*width)
            if layout == "polyphase":
                return polyphase_im2col(xp[i], kh, kw, wq, row0, row1, out=out)
            if layout == "flat":
                return flat_im2col(xp[i], kh, kw, wp, row0, row1, out=out)
            return im2col(padded[i], kh, kw, sh, sw, row0, row1, out=out)

        def weight_part(task, dy_band=None):                          # -> this band's dW2, db
            i, (row0, row1) = task
            if dy_band is None:
                dy_band = dy_rows(i, row0, row1)                      # (O, bh*width)
            if not finite(dy_band):                                   # the bands cover dy
                return None
            k, q = w2.shape[1], dy_band.shape[1]
            view = self._columns_are_x()
            buffer = None if view else threads.scratch((k + 1) * q, xp.dtype)
            cols = columns(i, row0, row1, buffer)                     # (K, q)
            if view:                                                  # cols is x itself
                return _weight_grad(dy_band, cols), dy_band.sum(axis=1)
            both = _weight_grad(dy_band, ones_below(buffer, k, q))              # [dW2 | db]
            return both[:, :k], both[:, k]                            # (O, K), (O,)

        def input_part(task, dy_band=None):                           # dcols, added into dxp
            i, (row0, row1) = task
            if dy_band is None:
                dy_band = dy_rows(i, row0, row1)                      # (O, bh*width)
            if finite(dy_band):                                       # (else weight_part says so)
                size = w2.shape[1] * dy_band.shape[1]
                dcols = np.matmul(w2.T, dy_band, out=threads.scratch(size, dy.dtype).reshape(
                    w2.shape[1], -1))                                 # dcols = W2^T @ dy
                if layout == "flat":
                    flat_col2im_add(dxp[i], dcols, kh, kw, wp, row0, row1)
                else:
                    col2im_add(dxp[i], dcols, kh, kw, sh, sw, row0, row1)

        def both_parts(task):                                         # -> this band's dW2, db
            """The band's dy made `width` wide once (unpooled, or copied) for both parts."""
            i, (row0, row1) = task
            wide = dy_rows(i, row0, row1)                             # (O, bh*width)
            input_part(task, wide)
            return weight_part(task, wide)

        # Neighbouring bands add into the same few input rows (a window spans kh rows), so the even
        # bands' input parts run in a first round and the odd ones' in a second: no two running
        # bands share a row, the adds come in a fixed order, and so do the sums, however many
        # threads run them.  The weight parts share nothing: the odd bands' run in the first round,
        # the even bands' in the second, so that each round has one part per band to share out.
        # Their sums are added in a fixed order too (even bands, then odd ones).  A first layer
        # adds nothing into its input: it has weight parts only, all in one round.
        # One band of one image has no neighbour: its two parts run together, in one round.
        # In the flat and polyphase layouts a band's dy is made `width` wide once, for both parts,
        # which then run in one piece of work: the even bands in a first round, the odd ones in a
        # second (the bands come in a multiple of 4: each round shares out evenly between two
        # threads).  Unless dy comes as an array (a copy, not an unpooling) and a round has fewer
        # than two bands a thread: the parts then run apart, as above, four pieces a round where
        # two long ones left a thread waiting (the last conv and the RPN's at 480 x 640: 4 bands).
        # Either way the parts' sums come in the same order: the results are the same.
        tasks = [(i, rows) for i in range(n) for rows in bands]
        even, odd = tasks[0::2], tasks[1::2]
        run = lambda job: job[0](job[1])                              # noqa: E731
        if not tasks:                                                 # an empty batch: zeros
            parts = []
        elif dxp is None:
            parts = threads.parallel(weight_part, tasks)
            parts = parts[0::2] + parts[1::2]
        elif not odd:
            parts = threads.parallel(run, [(weight_part, even[0]), (input_part, even[0])])[:1]
        elif layout != "im2col" and (pooled or len(even) >= 2 * threads.workers()):
            parts = threads.parallel(both_parts, even) + threads.parallel(both_parts, odd)
        else:                        # (fewer bands than two a thread: smaller pieces share better)
            first = threads.parallel(run, [(input_part, t) for t in even] +
                                     [(weight_part, t) for t in odd])
            second = threads.parallel(run, [(input_part, t) for t in odd] +
                                      [(weight_part, t) for t in even])
            parts = second[len(odd):] + first[len(even):]             # even bands', odd bands'
        _blocks_finite([part is not None for part in parts], "Conv2d.backward dy")
        dw, db = np.zeros(w2.shape, dtype=w.dtype), np.zeros(o, dtype=w.dtype)
        for dw_part, db_part in parts:                                # a fixed order of sums
            dw += dw_part
            db += db_part
        self.grads["weight"] = dw.reshape(w.shape)                    # (O, C, kh, kw)
        self.grads["bias"] = db                                       # (O,) = sum of dy
        if dxp is None:
            return None                                               # the input is the image
        if layout == "flat":
            dxp = dxp[..., :hp * wp].reshape(xp.shape[:2] + (hp, wp))  # (N, C, Hp, Wp), a view
        return dxp[:, :, ph:hp - ph, pw:wp - pw]                      # (N, C, H, W)


# ----------------------------------------------------------------------------- ReLU

class ReLU(Module):
    """y = max(x, 0); dy/dx = 1 where x > 0, else 0 (0 at x = 0, as torch).

    Args:
        inplace: write y over x and dx over dy (torch's nn.ReLU(inplace=True)): no new arrays, for
            a network where nothing else reads the layer's input or the incoming gradient (the
            backbone: each conv's output feeds its ReLU only).
    """

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = bool(inplace)
        self._mask = None

    def forward(self, x):
        """x (any shape) -> y (same shape)."""
        x = _as_input(x, "x", _float_dtype(np.asarray(x)), layer="ReLU", finite=False)
        mask = np.empty(x.shape, dtype=bool) if grad_enabled() else None   # for backward only
        y = x if self.inplace else np.empty_like(x)
        finite = _finite_check()

        def block(part):                                              # a block of channels
            if not finite(x[part]):
                return False
            if mask is not None:
                np.greater(x[part], 0, out=mask[part])                # (same shape) bool
            relu_into(x[part], y[part])
            return True

        _blocks_finite(_by_channels(block, x), "ReLU x")
        self._mask = mask
        return y

    def backward(self, dy):
        """dy (same shape as x) -> dx = dy * [x > 0]."""
        shape = None if self._mask is None else self._mask.shape
        dy = _as_grad(dy, shape, _float_dtype(np.asarray(dy)), "ReLU", finite=False)
        dx = dy if self.inplace else np.empty_like(dy)
        finite = _finite_check()

        def block(part):                                              # a block of channels
            if not finite(dy[part]):
                return False
            np.multiply(dy[part], self._mask[part], out=dx[part])     # (np.where is slower)
            return True

        _blocks_finite(_by_channels(block, dy), "ReLU.backward dy")
        return dx


# ----------------------------------------------------------------------------- MaxPool2d

class MaxPool2d(Module):
    """Max over k x k windows taken every `stride` pixels (no padding).

    Output size is floored as in torch: Ho = (H - k) // s + 1; rows/cols that do not fill a window
    are dropped.  Backward routes each dy to the input that was the max of its window (on ties, the
    first max in row-major window order); windows that overlap (s < k) add their gradients.

    The forward pass remembers, for each window, which offset (u, v) held its max: one byte per
    output, as torch keeps its indices; the backward pass sends dy there without looking at x.

    Args:
        kernel_size, stride: an int or (h, w); stride defaults to 2 (the VGG 2x2/2 pool).
    """

    def __init__(self, kernel_size=2, stride=2):
        super().__init__()
        self.kernel_size = _int_pair(kernel_size, "kernel_size", 1)
        self.stride = _int_pair(stride, "stride", 1)
        self._cache = None

    def forward(self, x):
        """x (N, C, H, W) -> y (N, C, Ho, Wo)."""
        x = _as_input(x, "x", _float_dtype(np.asarray(x)), ndim=4, layer="MaxPool2d", finite=False)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        n, c, h, w = x.shape
        if h < kh or w < kw:
            raise ValueError(f"MaxPool2d x: spatial size {(h, w)} is smaller than the kernel {(kh, kw)}")
        ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
        y = np.empty((n, c, ho, wo), dtype=x.dtype)                    # (N, C, Ho, Wo)
        argmax = np.zeros(y.shape, dtype=np.uint8 if kh * kw < 256 else np.int64) \
            if grad_enabled() else None                                # for backward only
        finite = _finite_check()

        def block(part):                                               # a block of channels
            if not finite(x[part]):
                return False
            self._pool(x[part], y[part], None if argmax is None else argmax[part])
            return True

        _blocks_finite(_by_channels(block, x), "MaxPool2d x")
        self._cache = None if argmax is None else (x.shape, argmax)    # not x: one byte per window
        return y

    def _pool(self, x, y, argmax):
        """y = the max of each window of x (.., H, W), y (.., Ho, Wo); argmax (None, or zeros
        like y) = the offset of the first max (row-major) in each window."""
        self._pool_views(self._offset_views(x, *y.shape[-2:]), y, argmax)

    @staticmethod
    def _pool_views(views, y, argmax):
        """The same from views[offset] (.., Ho, Wo): every window's value at each offset."""
        y[...] = views[0]
        for offset, value in enumerate(views[1:], start=1):
            if argmax is not None:
                larger = np.greater(value, y)                          # strictly: ties keep the first
                if offset > 1:                                         # offset where larger, else 0
                    larger = np.multiply(larger, argmax.dtype.type(offset))
                np.maximum(argmax, larger, out=argmax)                 # = offset where larger (the
            np.maximum(y, value, out=y)                                # offsets rise: a max)

    def _offset_views(self, x, ho, wo):
        """For each window offset (u, v), row-major, the (.., Ho, Wo) strided view of x that
        holds every window's value at that offset: x[.., i*s + u, j*s + v] for window (i, j)."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return [x[..., u:u + sh * ho:sh, v:v + sw * wo:sw] for u in range(kh) for v in range(kw)]

    # -- fed band by band by Conv2d.forward_pooled --

    def tiles(self):
        """Whether the windows tile the input (stride = kernel): each value in one window."""
        return self.stride == self.kernel_size

    def _start(self, x_shape, dtype):
        """The output (and argmax) that _pool_rows fills, for an input of x_shape."""
        (kh, kw), (n, c, h, w) = self.kernel_size, x_shape
        if h < kh or w < kw:
            raise ValueError(f"MaxPool2d x: spatial size {(h, w)} is smaller than the kernel {(kh, kw)}")
        y = np.empty((n, c, h // kh, w // kw), dtype)
        argmax = np.zeros(y.shape, np.uint8 if kh * kw < 256 else np.int64) \
            if grad_enabled() else None
        return x_shape, y, argmax

    def _pool_rows(self, rows, i, row0, pooled, finite, relu=False):
        """Pool rows [row0, row0 + bh) of image i's input, rows (C, bh, W), row0 a multiple of
        kh, into the output rows of the windows they fill; channel block by channel block (a
        block's temporaries stay in cache).  relu: rectify them too, and give the windows whose
        max is <= 0 an offset no value has (see Conv2d.forward_pooled).  -> finite(rows)."""
        if not finite(rows):
            return False
        kh, y = self.kernel_size[0], pooled[1]
        first = row0 // kh
        last = min(y.shape[2], first + rows.shape[1] // kh)
        self._pool_blocks(lambda part: self._offset_views(rows[part], last - first, y.shape[3]),
                          i, first, last, pooled, relu, rows[0].size)
        return True

    def _pool_planes(self, planes, i, row0, pooled, finite, relu=False):
        """The same for window rows [row0, row0 + bh) of image i given as planes (C, kh*kw, bh,
        Wq), Wq >= Wo: planes[:, offset, :, :Wo] holds every window's value at that offset
        (Conv2d's polyphase layout; the values past Wo are junk).  Whole rows of a plane are
        contiguous, so the planes are pooled Wq wide, in passes over long runs of memory, and the
        first Wo values of each row kept (the first layer's pooling at 480 x 640: 2x faster than
        over its Wo-wide rows, which numpy walked one 320-value row at a time).
        -> finite(the planes' first Wo values)."""
        wo = pooled[1].shape[3]
        if not finite(planes[..., :wo]):
            return False
        last = min(pooled[1].shape[2], row0 + planes.shape[2])
        self._pool_blocks(lambda part: [p[:, :last - row0] for p in planes[part].swapaxes(0, 1)],
                          i, row0, last, pooled, relu, planes[0].size)
        return True

    def _pool_blocks(self, views_of, i, first, last, pooled, relu, channel_size):
        """Output rows [first, last) of image i from views_of(channels) (a block's views, one per
        window offset, Wo wide, or wider: then pooled whole into a buffer and their first Wo
        values kept), block by block of channels of about BAND_POOL_SIZE input values
        (channel_size each); relu as in _pool_rows."""
        (kh, kw), (_, y, argmax) = self.kernel_size, pooled
        if last <= first:
            return
        step = max(1, BAND_POOL_SIZE // channel_size)                  # channels per block
        for c in range(0, y.shape[1], step):
            part = slice(c, c + step)
            y_part = y[i, part, first:last]
            a_part = None if argmax is None else argmax[i, part, first:last]
            views = views_of(part)
            wide = views[0].shape[-1] > y.shape[3]
            if wide:                                                   # pooled Wq wide, in buffers
                y_out, a_out = y_part, a_part
                y_part = threads.scratch(views[0].size, y.dtype, slot="pooled").reshape(
                    views[0].shape)
                if a_out is not None:
                    a_part = threads.scratch(views[0].size, argmax.dtype, slot="argmax").reshape(
                        views[0].shape)
                    a_part.fill(0)
            self._pool_views(views, y_part, a_part)
            if relu:
                if a_part is not None:                                 # ReLU's gradient is 0
                    code = np.multiply(y_part <= 0, a_part.dtype.type(kh * kw))   # there:
                    np.bitwise_or(a_part, code, out=a_part)           # an offset >= kh * kw
                relu_into(y_part, y_part)
            if wide:                                                   # the first Wo of each row
                y_out[...] = y_part[..., :y.shape[3]]
                if a_out is not None:
                    a_out[...] = a_part[..., :y.shape[3]]

    def _finish(self, pooled):
        x_shape, y, argmax = pooled
        self._cache = None if argmax is None else (x_shape, argmax)
        return y

    def backward(self, dy):
        """dy (N, C, Ho, Wo) -> dx (N, C, H, W), dy sent to each window's first max."""
        x_shape, argmax = self._cache if self._cache is not None else (None, None)
        dy = _as_grad(dy, None if argmax is None else argmax.shape,
                      _float_dtype(np.asarray(dy)), "MaxPool2d", finite=False)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ho, wo = argmax.shape[2:]
        tiled = (sh, sw) == (kh, kw)               # the windows tile the input: each value once
        dx = (np.empty if tiled else np.zeros)(x_shape, dtype=dy.dtype)  # (N, C, H, W)
        finite = _finite_check()

        def block(part):                                               # a block of channels
            dyb, ab, dxb = dy[part], argmax[part], dx[part]
            if not finite(dyb):
                return False
            for offset, dx_view in enumerate(self._offset_views(dxb, ho, wo)):
                if tiled:
                    np.multiply(dyb, ab == offset, out=dx_view)        # one window each
                else:
                    dx_view += dyb * (ab == offset)                    # overlaps or gaps: add
            if tiled:
                dxb[:, :, ho * sh:] = 0                                # rows, columns no window
                dxb[:, :, :, wo * sw:] = 0                             # covers (odd sizes)
            return True

        _blocks_finite(_by_channels(block, dx), "MaxPool2d.backward dy")
        return dx

    def backward_pooled(self, dy):
        """backward's dx for a Conv2d below this pool, as a PooledGradient: dy and the argmax,
        which the conv unpools band by band (see there).  A pool whose windows do not tile the
        input (stride != kernel) returns backward's array."""
        x_shape, argmax = self._cache if self._cache is not None else (None, None)
        if self.stride != self.kernel_size:
            return self.backward(dy)
        dy = _as_grad(dy, None if argmax is None else argmax.shape,
                      _float_dtype(np.asarray(dy)), "MaxPool2d", finite=True)
        return PooledGradient(dy, argmax, self.kernel_size, x_shape)


class PooledGradient:
    """The gradient dx that a max pool whose windows tile its input (stride = kernel) sends back,
    kept as what makes it: dy (N, C, Ho, Wo) and each window's argmax.  dx is dy at the max of
    each window and 0 elsewhere (3 of 4 values for a 2 x 2 pool).

    A Conv2d below the pool takes it as its dy and unpools it band by band (`rows`) into a buffer
    that stays in cache, instead of reading a full-size dx that was first written out to memory
    (38 MB for the first conv's 16 channels at 600 x 1000; a training step there 350 -> 332 ms
    on one thread of a 2-core Xeon).  np.asarray() of it is MaxPool2d.backward's dx.
    """

    def __init__(self, dy, argmax, kernel_size, x_shape):
        self.dy, self.argmax, self.kernel_size = dy, argmax, kernel_size
        self.shape, self.dtype = tuple(x_shape), dy.dtype

    def rows(self, i, row0, row1, out):
        """out[:, :, :W] = dx[i, :, row0:row1] and out[:, :, W:] = 0, for out (C, row1-row0,
        width >= W) (a conv's band in the flat layout is Wp wide); returns out."""
        (kh, kw), (ho, wo) = self.kernel_size, self.argmax.shape[2:]
        out[:, :, wo * kw:] = 0                                        # no window's columns
        for u in range(kh):                                            # the band's rows at
            rows = range(row0 + (u - row0) % kh, min(row1, ho * kh), kh)   # offset u of a window
            if not rows:
                continue
            i0 = rows[0] // kh                                         # their windows' row
            target = out[:, rows[0] - row0:rows[-1] - row0 + 1:kh]     # (C, len(rows), width)
            dy, argmax = self.dy[i, :, i0:i0 + len(rows)], self.argmax[i, :, i0:i0 + len(rows)]
            for v in range(kw):
                np.multiply(dy, argmax == u * kw + v, out=target[:, :, v:v + kw * wo:kw])
        out[:, max(0, ho * kh - row0):] = 0                            # no window's rows
        return out

    def planes(self, i, row0, row1, out):
        """out[:, u, v, :, :Wo] = dx[i, :, 2a + u, 2b + v] for window rows a in [row0, row1)
        (a 2 x 2 pool: the polyphase planes of dx, Conv2d's layout) and out[..., Wo:] = 0, for
        out (C, 2, 2, row1-row0, width >= Wo); returns out."""
        wo = self.argmax.shape[3]
        dy, argmax = self.dy[i, :, row0:row1], self.argmax[i, :, row0:row1]
        for u in range(2):
            for v in range(2):                                         # contiguous rows
                np.multiply(dy, argmax == u * 2 + v, out=out[:, u, v, :, :wo])
        out[..., wo:] = 0                                              # the junk adds nothing
        return out

    def __array__(self, dtype=None, copy=None):
        dx = np.empty(self.shape, self.dtype)                          # (N, C, H, W)
        for i in range(self.shape[0]):
            self.rows(i, 0, self.shape[2], dx[i])
        return dx if dtype is None else dx.astype(dtype, copy=False)


# ----------------------------------------------------------------------------- Linear

class Linear(Module):
    """Fully connected layer: y = x @ W^T + b (W stored (out, in) as in torch).

    Args:
        in_features, out_features: sizes.
        rng: np.random.Generator (or int seed) for the init.
        std: None -> He-normal (std = sqrt(2 / in_features)); a number -> N(0, std^2), as the paper
            code initialises the Fast R-CNN cls_score (0.01) and bbox_pred (0.001) layers.
    Params:
        weight (out_features, in_features), bias (out_features,) starting at 0.
    """

    def __init__(self, in_features, out_features, rng=None, std=None):
        super().__init__()
        self.in_features = _int_pair(in_features, "in_features", 1)[0]
        self.out_features = _int_pair(out_features, "out_features", 1)[0]
        shape = (self.out_features, self.in_features)
        self.params["weight"] = _init_weight(shape, self.in_features, rng, std)
        self.params["bias"] = np.zeros(self.out_features, dtype=np.float32)
        self._x = None

    def forward(self, x):
        """x (N, in_features) -> y (N, out_features)."""
        w, b = self.params["weight"], self.params["bias"]             # (O, I), (O,)
        x = _as_input(x, "x", w.dtype, ndim=2, channels=self.in_features, layer="Linear")
        self._x = x if grad_enabled() else None
        return x @ w.T + b                                            # (N, O)

    def backward(self, dy):
        """dy (N, out_features) -> dx (N, in_features); fills grads weight, bias."""
        w = self.params["weight"]
        shape = None if self._x is None else (self._x.shape[0], self.out_features)
        dy = _as_grad(dy, shape, w.dtype, "Linear")
        self.grads["weight"] = dy.T @ self._x                          # (O, I)
        self.grads["bias"] = dy.sum(axis=0)                            # (O,)
        return dy @ w                                                  # (N, I)


# ----------------------------------------------------------------------------- Flatten

class Flatten(Module):
    """(N, C, H, W) (or any (N, ...)) -> (N, C*H*W), C-order as torch.flatten(x, 1)."""

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x):
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"Flatten x: expected shape (N, ...), got {tuple(x.shape)}")
        x = _as_input(x, "x", _float_dtype(x), layer="Flatten")
        self._shape = x.shape if grad_enabled() else None
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        shape = None if self._shape is None else (self._shape[0], int(np.prod(self._shape[1:])))
        dy = _as_grad(dy, shape, _float_dtype(np.asarray(dy)), "Flatten")
        return dy.reshape(self._shape)


# ----------------------------------------------------------------------------- Sequential

class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    A Conv2d followed by a max pool whose windows tile its input (and by a ReLU, if one comes
    next) runs as one band-by-band pass, `Conv2d.forward_pooled`, and the backward hands the
    conv the pool's `PooledGradient`: the same numbers as the layers one by one, without
    storing the conv's whole output or its whole gradient.

    params / grads gather the layers' arrays under "<index>.<name>" ("0.weight", "0.bias",
    "3.weight", ...), like torch's nn.Sequential.  They are built on each access and hold the
    layers' own arrays, so an optimizer given `net.params` updates the layers in place.
    """

    def __init__(self, *layers):
        self.layers = list(layers)
        self._folded = set()                         # see forward
        for i, layer in enumerate(self.layers):
            if not hasattr(layer, "forward") or not hasattr(layer, "backward"):
                raise ValueError(f"layers[{i}]: expected a layer with forward/backward, "
                                 f"got {type(layer).__name__}")

    @property
    def params(self):
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.params.items()}

    @property
    def grads(self):
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.grads.items()}

    def astype(self, dtype):
        for layer in self.layers:
            layer.astype(dtype)
        return self

    def forward(self, x):
        self._folded = set()                         # ReLUs whose gradient the pool applies
        i, layers = 0, self.layers + [None, None]
        while i < len(self.layers):
            layer, above, then = layers[i:i + 3]
            if isinstance(layer, Conv2d) and isinstance(above, MaxPool2d) and above.tiles():
                relu = then if isinstance(then, ReLU) else None
                x = layer.forward_pooled(x, above, relu)   # each band pooled while in cache
                if relu is not None:
                    self._folded.add(i + 2)
                i += 2 if relu is None else 3
            else:
                x = layer.forward(x)
                i += 1
        return x

    def backward(self, dy):
        """dL/d(output) -> dL/d(input), or None when a layer returned no dx (need_input_grad=False)."""
        for i in reversed(range(len(self.layers))):
            layer, below = self.layers[i], self.layers[i - 1] if i else None
            if i in self._folded:
                continue                             # its gradient is in the pool's argmax
            if isinstance(layer, MaxPool2d) and isinstance(below, Conv2d):
                dy = layer.backward_pooled(dy)       # the conv unpools it band by band
            else:
                dy = layer.backward(dy)
            if dy is None:                           # no dx: the layers before it get no gradient
                if any(layer.params for layer in self.layers[:i]):
                    raise ValueError(f"layers[{i}] returned no input gradient (need_input_grad="
                                     f"False), but layers before it have parameters to train")
                return None
        return dy

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


# ----------------------------------------------------------------------------- SGD

class SGD:
    """Stochastic gradient descent with momentum and weight decay (torch.optim.SGD's update).

    For each parameter p with gradient g:
        g = g + weight_decay * p          (L2 decay; skipped for names ending in "bias")
        v = momentum * v + g              (v starts at 0)
        p = p - lr * v                    (in place: the layers see the new values)
    The paper's Caffe solver keeps lr inside v (v = m v + lr g); both agree while lr is constant.

    Args:
        params: dict name -> np.ndarray (e.g. net.params); these arrays are updated in place.
        lr: learning rate >= 0; change it with set_lr for a schedule.
        momentum: in [0, 1).  weight_decay: >= 0.
        decay_bias: also decay parameters whose name ends in "bias" (default False).
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-4, decay_bias=False):
        if not isinstance(params, dict) or not params:
            raise ValueError(f"params: expected a non-empty dict name -> array, got {type(params).__name__}")
        for k, p in params.items():
            if not isinstance(p, np.ndarray) or not np.issubdtype(p.dtype, np.floating):
                raise ValueError(f"params[{k!r}]: expected a float np.ndarray (updated in place)")
        self.params = params
        self.set_lr(lr)
        self.momentum = float(momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum}")
        self.weight_decay = float(weight_decay)
        if not np.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay}")
        self.decay_bias = bool(decay_bias)
        self.velocity = {k: np.zeros_like(p) for k, p in params.items()}
        self.steps = 0

    def set_lr(self, lr):
        lr = float(lr)
        if not np.isfinite(lr) or lr < 0:
            raise ValueError(f"lr: expected a finite number >= 0, got {lr}")
        self.lr = lr

    def _decays(self, name):
        return self.weight_decay > 0 and (self.decay_bias or not name.endswith("bias"))

    def step(self, grads, names=None):
        """Update parameters in place from grads (dict with the same keys and shapes).

        names: update only these parameters (the others, and their velocities, stay as they are:
            frozen layers); None updates all.
        """
        chosen = self.params if names is None else {k: self.params[k] for k in names}
        for k, p in chosen.items():
            if k not in grads:
                raise ValueError(f"grads: missing gradient for parameter {k!r}")
            g = np.asarray(grads[k])
            if g.shape != p.shape:
                raise ValueError(f"grads[{k!r}]: expected shape {p.shape}, got {g.shape}")
            if not np.isfinite(g).all():
                raise ValueError(f"grads[{k!r}]: contains NaN or Inf")
            v = self.velocity[k]
            if self._decays(k):
                g = g + self.weight_decay * p
            v *= self.momentum
            v += g
            p -= self.lr * v
        self.steps += 1

    def state_dict(self):
        """Flat dict of arrays (np.savez-friendly): lr, momentum, weight_decay, decay_bias, steps,
        and "velocity.<name>" for each parameter (copies)."""
        state = {"lr": np.array(self.lr), "momentum": np.array(self.momentum),
                 "weight_decay": np.array(self.weight_decay), "decay_bias": np.array(self.decay_bias),
                 "steps": np.array(self.steps, dtype=np.int64)}
        for k, v in self.velocity.items():
            state[f"velocity.{k}"] = v.copy()
        return state

    def load_state_dict(self, state):
        """Restore what state_dict saved; velocities must match this optimizer's parameters."""
        for k in ("lr", "momentum", "weight_decay", "steps"):
            if k not in state:
                raise ValueError(f"state: missing {k!r}")
        for k, p in self.params.items():
            key = f"velocity.{k}"
            if key not in state:
                raise ValueError(f"state: missing {key!r}")
            if np.shape(state[key]) != p.shape:
                raise ValueError(f"state[{key!r}]: expected shape {p.shape}, got {np.shape(state[key])}")
        self.set_lr(state["lr"])
        self.momentum = float(state["momentum"])
        self.weight_decay = float(state["weight_decay"])
        self.decay_bias = bool(state.get("decay_bias", self.decay_bias))
        self.steps = int(state["steps"])
        for k, p in self.params.items():
            self.velocity[k] = np.array(state[f"velocity.{k}"], dtype=p.dtype)
