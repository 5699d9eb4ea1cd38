"""The convolution one band of output rows at a time, and the fused conv -> max pool -> ReLU.

fast.Conv2d computes nn.Conv2d's y = W2 @ cols + b and its backward (dW2 = dy @ cols^T,
db = sum of dy, dx = col2im(W2^T @ dy)), with four changes that leave the sums as they are (or
change only their order: float32 rounding):

1. Bands.  The columns of a band of output rows (at most BAND_BYTES) are built and multiplied
   while they are in cache, and rebuilt from the padded input in the backward pass, instead of
   keeping kh*kw times the input.  The bands depend on the sizes only, never on the thread count.
2. Layouts.  A stride-1 layer keeps its padded input flat (columns.flat_im2col); a first layer
   under a 2 x 2 pool keeps it as four polyphase planes (columns.polyphase_im2col).
3. The bias as one more column of the weights over a row of ones (columns.ones_below).
4. Threads.  The bands are shared out over the thread team; in the backward pass the bands'
   input-gradient adds (neighbours touch the same rows) run in two rounds, even bands then odd
   ones, and their weight-gradient sums are added in a fixed order: the same bits on any number
   of threads.

ConvPoolReLU is a Conv2d, a MaxPool2d whose windows tile its input, and a ReLU as one layer: each
band is pooled and rectified as soon as it is made, and the pool's gradient is unpooled band by
band in the backward pass, so the conv's full output and its full gradient are never stored.

Measurements behind each choice: docs/performance.md, "The backbone's convolutions".
"""
import numpy as np

from .. import nn
from . import threads
from .blocks import MaxPool2d, PooledGradient, by_channels, relu_into
from .columns import (band_col2im_add, band_im2col, flat_col2im_add, flat_im2col, ones_below,
                      pad_into, polyphase_im2col, polyphase_split, weight_grad)

# Bytes of im2col columns built at a time (one band of output rows): a band's columns are
# multiplied while still in cache.  With 4 MB every convolution at the demo's sizes is one band.
BAND_BYTES = 4 << 20
# A forward pass of a single band is worked as two halves of its rows from this many bytes of
# columns on, so that two threads share it.  The halves depend on the sizes only.
SPLIT_BYTES = 3 << 20


class Conv2d(nn.Conv2d):
    """nn.Conv2d, computed in bands of output rows on the thread team (see the module's notes).

    Args (beyond nn.Conv2d's):
        need_input_grad: False -> backward fills grads but returns None instead of dx.  For a
            network's first layer, whose input is the image: nothing learns from dL/d(image).
        band_bytes: bytes of columns per band (BAND_BYTES); None: the whole image in one band.
    Memory: forward keeps the padded input (not the columns) for the backward pass.
    Values are trusted (no scan for NaN / Inf): the detector checks its input and gradients.
    """

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, rng=None, std=None,
                 need_input_grad=True, band_bytes=BAND_BYTES):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, rng=rng, std=std)
        self.need_input_grad = bool(need_input_grad)
        if band_bytes is not None and int(band_bytes) < 1:
            raise ValueError(f"band_bytes: expected a positive int or None, got {band_bytes!r}")
        self.band_bytes = None if band_bytes is None else int(band_bytes)

    def bands(self, ho, wo, itemsize, multiple=1, groups=2):
        """[(row0, row1), ...] covering the Ho output rows, each band's columns <= band_bytes, and
        never fewer than kh rows.  Several bands are made a multiple of `groups` near-equal ones
        where the rows allow (their rows differ by one window's at most), so that two threads share
        them evenly (the backward's two rounds of half the bands each ask for groups=4).  They
        depend on the sizes only, never on the number of threads.  multiple: every band but the
        last starts and ends on a multiple of this many rows (whole windows of the pool that
        forward_pooled feeds)."""
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
        # one of 5 (whose round would leave one of two threads waiting)
        bounds = [min(ho, units * j // count * multiple) for j in range(count + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def _columns_are_x(self):
        """Whether a band's columns are a view of the flat input itself (a 1 x 1 kernel): no copy,
        and so no row of ones under them; the bias is then added on its own."""
        return self._flat() and self.kernel_size == (1, 1)

    def _flat(self):
        """Whether this layer works in the flat layout: banded and stride 1."""
        return self.band_bytes is not None and self.stride == (1, 1)

    def _polyphase(self, pool):
        """Whether forward_pooled works in the polyphase layout: a banded 3 x 3 convolution of
        stride 1 and padding 1 under a 2 x 2 max pool of stride 2, with no input gradient to
        make (the backbone's first layer, whose input is the image)."""
        return (pool is not None and self._flat() and self.kernel_size == (3, 3) and
                self.padding == (1, 1) and pool.kernel_size == (2, 2) and pool.tiles() and
                not self.need_input_grad)

    def forward(self, x):
        """x (N, in_ch, H, W) -> y (N, out_ch, Ho, Wo)."""
        return self.forward_pooled(x, None)

    def forward_pooled(self, x, pool, relu=False):
        """pool.forward(self.forward(x)) (then ReLU, if relu) for a fast.MaxPool2d whose windows
        tile its input, worked band by band: each band of output rows is pooled as soon as it is
        made, and y itself is never stored.  pool keeps what its backward needs.  relu folds the
        ReLU's gradient into the pool's argmax (see ConvPoolReLU).  pool None: the plain forward.
        A pool whose windows do not tile its input (stride != kernel) runs after the plain
        forward, on the whole output."""
        if pool is not None and not pool.tiles():
            return _pool_after(pool, self.forward_pooled(x, None), relu)
        w, b = self.params["weight"], self.params["bias"]  # (O, C, kh, kw), (O,)
        x = nn.as_input(x, "Conv2d x", w.dtype, ndim=4, channels=self.in_ch, finite=False)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, c, h, wd = x.shape
        if h + 2 * ph < kh or wd + 2 * pw < kw:
            raise ValueError(f"Conv2d x: padded input {(h + 2 * ph, wd + 2 * pw)} is smaller than "
                             f"the kernel {(kh, kw)}; got x of shape {x.shape}")
        hp, wp = h + 2 * ph, wd + 2 * pw
        ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
        layout = "polyphase" if self._polyphase(pool) and ho >= 2 and wo >= 2 else \
            "flat" if self._flat() else "im2col"
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

        def pad(part):
            if layout == "polyphase":
                channels = part[1] if len(part) > 1 else slice(None)
                for i in range(n):
                    polyphase_split(x[i, channels], xp[i, :, :, channels], ph, pw)
            else:
                pad_into(padded[part], x[part], ph, pw)
            if layout == "flat":
                xp[part][..., hp * wp:] = 0                           # where the junk reads

        by_channels(pad, x)
        w2 = w.reshape(self.out_ch, -1)                               # (O, K)  K = C*kh*kw
        k = w2.shape[1]
        view = self._columns_are_x()
        if not view:
            w2 = np.concatenate([w2, b[:, None]], axis=1)             # [W2 | b] (O, K+1)
        if pool is None:
            y = np.empty((n, self.out_ch, ho, width), dtype=x.dtype)  # (N, O, Ho, Wp | Wo)
        else:                                                         # pool's output instead
            pooled = pool.start((n, self.out_ch, ho, wo), x.dtype)

        def band(task):                                               # one band of one image
            i, (row0, row1) = task
            q = (row1 - row0) * width                                 # the band's pixels
            buffer = None if view else threads.scratch((k + 1) * q, x.dtype)
            if layout == "polyphase":
                cols = polyphase_im2col(xp[i], kh, kw, wq, row0, row1, out=buffer)
            elif layout == "flat":
                cols = flat_im2col(xp[i], kh, kw, wp, row0, row1, out=buffer)
            else:
                cols = band_im2col(xp[i], kh, kw, sh, sw, row0, row1, out=buffer)
            if not view:
                cols = ones_below(buffer, k, q)                       # [cols; 1] (K+1, q)
            if pool is None:
                y_band = y[i, :, row0:row1].reshape(self.out_ch, -1)  # (O, bh*width), a view of y
            else:                                                     # a buffer, pooled at once
                y_band = threads.scratch(self.out_ch * q, x.dtype, slot="y").reshape(self.out_ch, -1)
            np.matmul(w2, cols, out=y_band)                           # y = W2 @ cols + b
            if view:
                y_band += b[:, None]
            if layout == "polyphase":                                 # (O, 4, rows, Wq)
                planes = y_band.reshape(self.out_ch, 4, row1 - row0, wq)
                pool.pool_planes(planes, i, row0, pooled, relu)
            elif pool is not None:
                rows = y_band.reshape(self.out_ch, row1 - row0, width)[..., :wo]
                pool.pool_rows(rows, i, row0, pooled, relu)

        multiple = 1 if pool is None else pool.kernel_size[0]         # bands of whole windows
        if layout == "polyphase":                                     # bands of window rows
            bands, multiple = self.bands(ho // 2, 2 * wo, x.itemsize), 1
            rows = ho // 2
        else:
            bands, rows = self.bands(ho, wo, x.itemsize, multiple), ho
        half = rows // 2 // multiple * multiple
        if n == 1 and len(bands) == 1 and half >= kh and \
                k * ho * wo * x.itemsize >= SPLIT_BYTES:                    # see SPLIT_BYTES
            bands = [(0, half), (half, rows)]
        threads.parallel(band, [(i, rows) for i in range(n) for rows in bands])
        self._cache = (xp, (n, self.out_ch, ho, wo), layout) if nn.grad_enabled() else None
        if pool is not None:
            return pool.finish(pooled)
        return y[..., :wo]                                            # without the junk columns

    def backward(self, dy):
        """dy (N, out_ch, Ho, Wo) -> dx (N, in_ch, H, W), or None if not need_input_grad;
        fills grads weight, bias.  dy may be the PooledGradient of a max pool above
        (ConvPoolReLU passes one): each band's rows of it are then unpooled into a buffer, not
        read.  After a forward in the polyphase layout the conv's output fed the pool alone: a
        row or column no window covers (odd sizes) has no gradient."""
        w = self.params["weight"]
        xp, y_shape, layout = self._cache or (None, None, None)
        pooled = isinstance(dy, PooledGradient)        # dy from the max pool above, unpooled
        if pooled:                                     # band by band below
            if y_shape is None or dy.shape != y_shape:
                nn.as_grad(np.empty(dy.shape, w.dtype), y_shape, w.dtype, "Conv2d", finite=False)
        else:
            dy = nn.as_grad(dy, y_shape, w.dtype, "Conv2d", finite=False)
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
            bands = self.bands(ho // 2, 2 * wo, xp.itemsize, groups=4)
        else:
            bands = self.bands(ho, wo, xp.itemsize, groups=4)        # two rounds, each even

        # In the flat and polyphase layouts both parts read the band's dy `width` wide (its junk
        # columns 0) and the weight part multiplies it by the columns of the padded input: the
        # junk columns add 0 * (a finite junk value) = 0 to dW2.
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
            return band_im2col(padded[i], kh, kw, sh, sw, row0, row1, out=out)

        def weight_part(task, dy_band=None):                          # -> this band's dW2, db
            i, (row0, row1) = task
            if dy_band is None:
                dy_band = dy_rows(i, row0, row1)                      # (O, bh*width)
            k, q = w2.shape[1], dy_band.shape[1]
            view = self._columns_are_x()
            buffer = None if view else threads.scratch((k + 1) * q, xp.dtype)
            cols = columns(i, row0, row1, buffer)                     # (K, q)
            if view:                                                  # cols is x itself
                return weight_grad(dy_band, cols), dy_band.sum(axis=1)
            both = weight_grad(dy_band, ones_below(buffer, k, q))     # [dW2 | db]
            return both[:, :k], both[:, k]                            # (O, K), (O,)

        def input_part(task, dy_band=None):                           # dcols, added into dxp
            i, (row0, row1) = task
            if dy_band is None:
                dy_band = dy_rows(i, row0, row1)                      # (O, bh*width)
            size = w2.shape[1] * dy_band.shape[1]
            dcols = np.matmul(w2.T, dy_band, out=threads.scratch(size, dy.dtype).reshape(
                w2.shape[1], -1))                                     # dcols = W2^T @ dy
            if layout == "flat":
                flat_col2im_add(dxp[i], dcols, kh, kw, wp, row0, row1)
            else:
                band_col2im_add(dxp[i], dcols, kh, kw, sh, sw, row0, row1)

        def both_parts(task):                                         # -> this band's dW2, db
            """The band's dy made `width` wide once (unpooled, or copied) for both parts."""
            i, (row0, row1) = task
            wide = dy_rows(i, row0, row1)                             # (O, bh*width)
            input_part(task, wide)
            return weight_part(task, wide)

        # Neighbouring bands add into the same few input rows (a window spans kh rows): the even
        # bands' input parts run in a first round and the odd ones' in a second, so no two running
        # bands share a row and the adds come in a fixed order.  The weight parts share nothing:
        # the odd bands' run in the first round, the even bands' in the second, one part per band
        # a round; their sums are added in a fixed order (even bands, then odd ones).  A first
        # layer adds nothing into its input: weight parts only, in one round.  One band of one
        # image: its two parts in one round.  In the flat and polyphase layouts a band's dy is made
        # `width` wide once, for both parts, which then run as one piece of work, unless dy comes
        # as an array and a round has fewer than two bands a thread (smaller pieces share better).
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
        else:
            first = threads.parallel(run, [(input_part, t) for t in even] +
                                     [(weight_part, t) for t in odd])
            second = threads.parallel(run, [(input_part, t) for t in odd] +
                                      [(weight_part, t) for t in even])
            parts = second[len(odd):] + first[len(even):]             # even bands', odd bands'
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


def _pool_after(pool, y, relu):
    """pool.forward(y) (then ReLU, its gradient folded into the argmax as forward_pooled folds it)
    for a pool whose windows do not tile y: the two passes one after the other."""
    y = pool.forward(y)
    if relu:
        argmax = None if pool._cache is None else pool._cache[0]
        if argmax is not None:                                    # ReLU's gradient is 0 where
            kh, kw = pool.kernel_size                             # the max is <= 0: an offset
            code = np.multiply(y <= 0, argmax.dtype.type(kh * kw))   # no value has
            np.bitwise_or(argmax, code, out=argmax)
        relu_into(y, y)
    return y


class ConvPoolReLU(nn.Module):
    """Conv2d -> MaxPool2d (windows that tile, stride = kernel) -> ReLU as one layer, band by band.

    The same values as the three layers one after the other (nn.Conv2d, nn.MaxPool2d, nn.ReLU),
    without storing the conv's full output or its full gradient: each band of the conv's output
    rows is pooled and rectified while it is in cache, and in the backward pass the pool's
    gradient (a PooledGradient: dy and the argmax) is unpooled band by band inside the conv.

    The ReLU's gradient, dy where the pooled value is > 0 and 0 elsewhere, is folded into the
    pool's argmax: a window whose max is <= 0 gets an offset no value has (its offset OR kh*kw),
    so the unpooling sends it nothing and the ReLU keeps no mask.

    Pooling before the ReLU equals VGG's ReLU before pooling (ReLU keeps order: the max of ReLUs is
    the ReLU of the max; a window whose max is <= 0 passes no gradient either way), and the ReLU
    then touches a quarter of the values.

    Args: as Conv2d's, plus pool (the kernel = stride of the max pool, 2).  params and grads are
    the conv's.  `stands_for` = 3: the textbook layers it replaces (fast.Sequential names the
    parameters by the textbook index, so that a checkpoint is the same either way).
    """
    stands_for = 3

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, rng=None, std=None,
                 need_input_grad=True, pool=2, band_bytes=BAND_BYTES):
        self.conv = Conv2d(in_ch, out_ch, kernel_size, stride, padding, rng=rng, std=std,
                           need_input_grad=need_input_grad, band_bytes=band_bytes)
        self.pool = MaxPool2d(pool, pool)
        self.params, self.grads = self.conv.params, self.conv.grads

    def astype(self, dtype):
        self.conv.astype(dtype)
        self.params, self.grads = self.conv.params, self.conv.grads
        return self

    def forward(self, x):
        """x (N, in_ch, H, W) -> ReLU(max pool(conv(x))) (N, out_ch, Ho // k, Wo // k)."""
        return self.conv.forward_pooled(x, self.pool, relu=True)

    def backward(self, dy):
        """dy of the ReLU's output -> dx of the conv's input (None without need_input_grad)."""
        dx = self.conv.backward(self.pool.pooled_gradient(dy))
        self.grads = self.conv.grads
        return dx

    def __repr__(self):
        return f"ConvPoolReLU({self.conv!r}, pool {self.pool.kernel_size})"


class Sequential(nn.Sequential):
    """nn.Sequential whose layers may stand for several textbook layers (ConvPoolReLU for a conv,
    a pool and a ReLU): each layer's parameters are named by the index of the first textbook layer
    it stands for, so that the names (and a checkpoint) are those of the textbook network.

    backward stops where a layer returns no input gradient (a first conv with need_input_grad
    False) and returns None.
    """

    def _names(self):
        index = 0
        for layer in self.layers:
            yield index, layer
            index += getattr(layer, "stands_for", 1)

    @property
    def params(self):
        return {f"{i}.{k}": v for i, layer in self._names() for k, v in layer.params.items()}

    @property
    def grads(self):
        return {f"{i}.{k}": v for i, layer in self._names() for k, v in layer.grads.items()}

    def backward(self, dy):
        """dL/d(output) -> dL/d(input), or None when a layer returned no dx."""
        for i in reversed(range(len(self.layers))):
            dy = self.layers[i].backward(dy)
            if dy is None:
                if any(layer.params for layer in self.layers[:i]):
                    raise ValueError(f"layers[{i}] returned no input gradient (need_input_grad="
                                     f"False), but layers before it have parameters to train")
                return None
        return dy
