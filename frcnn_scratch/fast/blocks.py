"""ReLU and max pooling in blocks of channels: the same values as nn.ReLU and nn.MaxPool2d.

An element-wise layer makes several passes over its array (compare, select, write); in blocks of
about BLOCK_SIZE elements a block's temporaries stay in cache between the passes, and the blocks
are shared out over the thread team (`threads.parallel`).  The blocks' work is element by element:
their number changes no result, on any number of threads.

MaxPool2d also pools a convolution's output band by band as it is made (`start`, `pool_rows`,
`pool_planes`, `finish`, fed by fast.conv.Conv2d.forward_pooled for the fused ConvPoolReLU), and
hands its gradient back as a `PooledGradient` that the convolution unpools band by band.

These layers trust the values they are given (no scan for NaN / Inf): the detector checks its
image, its feature map and its gradients instead.  Measurements: docs/performance.md, "Pooling
and ReLU in blocks".
"""
import numpy as np

from .. import nn
from . import threads

# Elements per block of channels (1 MB of float32): a block's temporaries stay in cache.
BLOCK_SIZE = 1 << 18
# An array of at least this many elements is cut into one block per thread at least (smaller
# pieces do not pay for waking a thread).
SHARED_SIZE = 1 << 17
# Input values per block when a convolution's band is pooled as it is made: the band is in cache
# already, and fewer, larger passes take the GIL less often.
BAND_POOL_SIZE = 1 << 20
# np.maximum(x, 0) is not vectorised in numpy 2.4 where np.maximum(x, zeros) is (4x faster): ReLU
# reads a view of one shared read-only buffer of zeros, for blocks up to this many values.
ZEROS_MAX = 1 << 22
_zero_buffers = {}                   # dtype -> the largest zeros made so far


def relu_into(x, out):
    """out = max(x, 0), element by element (out may be x); the same bits as np.maximum(x, 0)."""
    if x.size > ZEROS_MAX:
        return np.maximum(x, x.dtype.type(0), out=out)
    zeros = _zero_buffers.get(x.dtype)
    if zeros is None or zeros.size < x.size:
        zeros = np.zeros(max(x.size, 1 << 16), x.dtype)
        zeros.setflags(write=False)
        _zero_buffers[x.dtype] = zeros                            # (a race makes two: both zeros)
    return np.maximum(x, zeros[:x.size].reshape(x.shape), out=out)


def by_channels(fn, x):
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


# ----------------------------------------------------------------------------- ReLU

class ReLU(nn.ReLU):
    """nn.ReLU in blocks of channels.

    Args:
        inplace: write y over x and dx over dy (torch's nn.ReLU(inplace=True)): no new arrays, for
            a network where nothing else reads the layer's input or the incoming gradient (the
            backbone: each conv's output feeds its ReLU only).
    """

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = bool(inplace)

    def forward(self, x):
        """x (any shape) -> y (same shape)."""
        x = nn.as_input(x, "ReLU x", nn.float_dtype(x), finite=False)
        mask = np.empty(x.shape, dtype=bool) if nn.grad_enabled() else None   # for backward
        y = x if self.inplace else np.empty_like(x)

        def block(part):                                              # a block of channels
            if mask is not None:
                np.greater(x[part], 0, out=mask[part])
            relu_into(x[part], y[part])

        by_channels(block, x)
        self._cache = mask
        return y

    def backward(self, dy):
        """dy (same shape as x) -> dx = dy * [x > 0]."""
        mask = self.cached()
        dy = nn.as_grad(dy, mask.shape, nn.float_dtype(dy), "ReLU", finite=False)
        dx = dy if self.inplace else np.empty_like(dy)
        by_channels(lambda part: np.multiply(dy[part], mask[part], out=dx[part]), dy)
        return dx


# ----------------------------------------------------------------------------- MaxPool2d

class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d in blocks of channels.

    The forward pass remembers, for each window, which offset (u, v) held its max: one byte per
    output (int64 past 255 offsets), as torch keeps its indices; the backward pass sends dy there
    without looking at x.  Under nn.no_grad it finds the max only.
    """

    def forward(self, x):
        """x (N, C, H, W) -> y (N, C, Ho, Wo)."""
        x = nn.as_input(x, "MaxPool2d x", nn.float_dtype(x), ndim=4, finite=False)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        n, c, h, w = x.shape
        if h < kh or w < kw:
            raise ValueError(f"MaxPool2d x: spatial size {(h, w)} is smaller than the kernel "
                             f"{(kh, kw)}")
        ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
        y = np.empty((n, c, ho, wo), dtype=x.dtype)                    # (N, C, Ho, Wo)
        argmax = self._new_argmax(y.shape)

        def block(part):                                               # a block of channels
            views = self.offset_views(x[part], ho, wo)
            pool_views(views, y[part], None if argmax is None else argmax[part])

        by_channels(block, x)
        self._cache = None if argmax is None else (argmax, x.shape)    # not x: a byte a window
        return y

    def _new_argmax(self, shape):
        """Zeros for the argmax of each window (None under no_grad: not needed)."""
        if not nn.grad_enabled():
            return None
        kh, kw = self.kernel_size
        return np.zeros(shape, dtype=np.uint8 if kh * kw < 256 else np.int64)

    def offset_views(self, x, ho, wo):
        """For each window offset (u, v), row-major, the (.., Ho, Wo) strided view of x that
        holds every window's value at that offset: x[.., i*s + u, j*s + v] for window (i, j)."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return [x[..., u:u + sh * ho:sh, v:v + sw * wo:sw] for u in range(kh) for v in range(kw)]

    def backward(self, dy):
        """dy (N, C, Ho, Wo) -> dx (N, C, H, W), dy sent to each window's first max."""
        argmax, x_shape = self._cache or (None, None)
        dy = nn.as_grad(dy, None if argmax is None else argmax.shape, nn.float_dtype(dy),
                        "MaxPool2d", finite=False)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ho, wo = argmax.shape[2:]
        tiled = self.tiles()                       # each value in one window at most
        dx = (np.empty if tiled else np.zeros)(x_shape, dtype=dy.dtype)  # (N, C, H, W)

        def block(part):                                               # a block of channels
            dyb, ab, dxb = dy[part], argmax[part], dx[part]
            for offset, dx_view in enumerate(self.offset_views(dxb, ho, wo)):
                if tiled:
                    np.multiply(dyb, ab == offset, out=dx_view)        # one window each
                else:
                    dx_view += dyb * (ab == offset)                    # overlaps or gaps: add
            if tiled:
                dxb[:, :, ho * sh:] = 0                                # rows, columns no window
                dxb[:, :, :, wo * sw:] = 0                             # covers (odd sizes)

        by_channels(block, dx)
        return dx

    # -- fed band by band by fast.conv.Conv2d.forward_pooled (ConvPoolReLU) --

    def tiles(self):
        """Whether the windows tile the input (stride = kernel): each value in one window."""
        return self.stride == self.kernel_size

    def start(self, x_shape, dtype):
        """The output (and argmax) that pool_rows / pool_planes fill, for an input of x_shape."""
        (kh, kw), (n, c, h, w) = self.kernel_size, x_shape
        if h < kh or w < kw:
            raise ValueError(f"MaxPool2d x: spatial size {(h, w)} is smaller than the kernel "
                             f"{(kh, kw)}")
        y = np.empty((n, c, h // kh, w // kw), dtype)
        return x_shape, y, self._new_argmax(y.shape)

    def pool_rows(self, rows, i, row0, pooled, relu=False):
        """Pool rows [row0, row0 + bh) of image i's input, rows (C, bh, W), row0 a multiple of
        kh, into the output rows of the windows they fill, block of channels by block.
        relu: rectify them too, and give the windows whose max is <= 0 an offset no value has
        (see ConvPoolReLU)."""
        kh, y = self.kernel_size[0], pooled[1]
        first = row0 // kh
        last = min(y.shape[2], first + rows.shape[1] // kh)
        self._pool_blocks(lambda part: self.offset_views(rows[part], last - first, y.shape[3]),
                          i, first, last, pooled, relu, rows[0].size)

    def pool_planes(self, planes, i, row0, pooled, relu=False):
        """The same for window rows [row0, row0 + bh) of image i given as planes (C, kh*kw, bh,
        Wq), Wq >= Wo: planes[:, offset, :, :Wo] holds every window's value at that offset
        (the polyphase layout; the values past Wo are junk).  Whole rows of a plane are
        contiguous, so the planes are pooled Wq wide, in long passes over memory, and the first
        Wo values of each row kept."""
        last = min(pooled[1].shape[2], row0 + planes.shape[2])
        self._pool_blocks(lambda part: [p[:, :last - row0] for p in planes[part].swapaxes(0, 1)],
                          i, row0, last, pooled, relu, planes[0].size)

    def _pool_blocks(self, views_of, i, first, last, pooled, relu, channel_size):
        """Output rows [first, last) of image i from views_of(channels) (a block's views, one per
        window offset, Wo wide, or wider: then pooled whole into a buffer and their first Wo
        values kept), block by block of channels of about BAND_POOL_SIZE input values
        (channel_size each); relu as in pool_rows."""
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
            pool_views(views, y_part, a_part)
            if relu:
                if a_part is not None:                                 # ReLU's gradient is 0
                    code = np.multiply(y_part <= 0, a_part.dtype.type(kh * kw))   # there:
                    np.bitwise_or(a_part, code, out=a_part)           # an offset >= kh * kw
                relu_into(y_part, y_part)
            if wide:                                                   # the first Wo of each row
                y_out[...] = y_part[..., :y.shape[3]]
                if a_out is not None:
                    a_out[...] = a_part[..., :y.shape[3]]

    def finish(self, pooled):
        """The pooled output; the argmax kept for backward, as after forward."""
        x_shape, y, argmax = pooled
        self._cache = None if argmax is None else (argmax, x_shape)
        return y

    def pooled_gradient(self, dy):
        """backward's dx as a PooledGradient (dy and the argmax) for the convolution below, which
        unpools it band by band.  Windows that do not tile the input (stride != kernel): backward's
        array itself."""
        if not self.tiles():
            return self.backward(dy)
        argmax, x_shape = self._cache or (None, None)
        dy = nn.as_grad(dy, None if argmax is None else argmax.shape, nn.float_dtype(dy),
                        "MaxPool2d", finite=False)
        return PooledGradient(dy, argmax, self.kernel_size, x_shape)


def pool_views(views, y, argmax):
    """y = the max over views[offset] (.., Ho, Wo), every window's value at each offset; argmax
    (None, or zeros like y) = the offset of the first max (row-major) of each window."""
    y[...] = views[0]
    for offset, value in enumerate(views[1:], start=1):
        if argmax is not None:
            larger = np.greater(value, y)                          # strictly: ties keep the first
            if offset > 1:                                         # offset where larger, else 0
                larger = np.multiply(larger, argmax.dtype.type(offset))
            np.maximum(argmax, larger, out=argmax)                 # = offset where larger (the
        np.maximum(y, value, out=y)                                # offsets rise: a max)


class PooledGradient:
    """The gradient dx that a max pool whose windows tile its input (stride = kernel) sends back,
    kept as what makes it: dy (N, C, Ho, Wo) and each window's argmax.  dx is dy at the max of
    each window and 0 elsewhere (3 of 4 values for a 2 x 2 pool).

    The convolution below the pool unpools it band by band (`rows`, `planes`) into a buffer that
    stays in cache, instead of reading a full-size dx first written out to memory.
    np.asarray() of it is MaxPool2d.backward's dx.
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
        (a 2 x 2 pool: the polyphase planes of dx) and out[..., Wo:] = 0, for out (C, 2, 2,
        row1-row0, width >= Wo); returns out."""
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
