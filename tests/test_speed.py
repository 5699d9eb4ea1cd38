"""The speed work leaves the numbers alone: banded convolutions equal the whole-image im2col (the
textbook form) to float32 rounding, max pooling by stored index routes exactly as before, the
thread count never changes a result (bit for bit), and the top-N selection equals a full stable
sort.  Also the thread policy, `frcnn bench-model`, and the torch twin of the network."""
import contextlib
import os

import numpy as np
import pytest

from frcnn_scratch import nn
from frcnn_scratch.fast import threads
from frcnn_scratch.tools.bench_model import parse_sizes, sample_at, torch_layers
from frcnn_scratch.cli import main
from frcnn_scratch.config import Config
from frcnn_scratch.model import FasterRCNN
from frcnn_scratch.rpn import top_n

RNG = np.random.default_rng(0)


def set_bands(model, band_bytes):
    """Give every convolution of the model (backbone and RPN) this band size; returns the model."""
    for layer in list(model.backbone.layers) + list(model.rpn.layers.values()):
        if isinstance(layer, nn.Conv2d):
            layer.band_bytes = band_bytes
    return model


SMALL = dict(channels=(4, 8, 8), anchor_scales=(2.0, 4.0), anchor_ratios=(1.0,), rpn_channels=8,
             fc_hidden=16, pooled_size=3, rpn_post_nms_test=10)      # a small network, real sizes


def _conv_pair(c, o, k, s, p, need_input_grad, band_bytes):
    banded = nn.Conv2d(c, o, k, stride=s, padding=p, rng=1, need_input_grad=need_input_grad,
                       band_bytes=band_bytes)
    whole = nn.Conv2d(c, o, k, stride=s, padding=p, rng=1, need_input_grad=need_input_grad,
                      band_bytes=None)
    return banded, whole


@pytest.mark.parametrize("c,o,k,s,p,hw,n", [
    (3, 8, 3, 1, 1, (37, 29), 1), (5, 4, 3, 2, 1, (31, 40), 2), (4, 6, 5, 1, 2, (23, 17), 1),
    (6, 3, 1, 1, 0, (19, 21), 2), (2, 5, 3, 3, 0, (26, 26), 1), (3, 4, (3, 5), (2, 1), (1, 2), (20, 18), 1),
    (3, 4, 2, 3, 0, (25, 23), 1),                                   # stride > kernel: rows no window reads
    (3, 4, (3, 5), 1, (1, 2), (20, 18), 1), (4, 5, 3, 1, 0, (15, 13), 2)])   # flat, no padding too
@pytest.mark.parametrize("workers", [1, 3])
def test_banded_conv_equals_the_whole_image_im2col(c, o, k, s, p, hw, n, workers):
    """Many small bands (a few rows each, the last one short), run on 1 or 3 threads, against
    one band holding the whole image: y, dx, dW and db agree to float32 rounding."""
    banded, whole = _conv_pair(c, o, k, s, p, True, band_bytes=600)
    x = RNG.standard_normal((n, c) + hw).astype(np.float32)
    with threads.using(workers):
        y = banded.forward(x)
    assert len(banded._bands(y.shape[2], y.shape[3], 4)) >= 3, "the case must have several bands"
    y_ref = whole.forward(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = RNG.standard_normal(y.shape).astype(np.float32)
    with threads.using(workers):
        dx = banded.backward(dy)
    dx_ref = whole.backward(dy)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):
        np.testing.assert_allclose(banded.grads[name], whole.grads[name], rtol=1e-5, atol=1e-4,
                                   err_msg=name)


@pytest.mark.parametrize("c,k,ho,wo,band_bytes", [
    (16, 3, 240, 320, 4 << 20), (3, 3, 480, 640, 4 << 20), (64, 3, 60, 80, 4 << 20),
    (64, 3, 75, 125, 4 << 20), (5, 3, 27, 23, 2000), (4, 5, 7, 30, 10), (8, 1, 33, 17, 900),
    (2, 3, 9, 9, None)])
def test_bands_cover_the_rows_in_an_even_number_of_equal_bands(c, k, ho, wo, band_bytes):
    """The rows in order, each band within band_bytes of columns unless kh rows need more, every
    band but the last at least kh rows; more than one band: an even number of near-equal bands
    (rows that differ by one at most: 75 rows in the backward's 8 of 9 or 10), unless kh rows leave
    no way to (the two last cases); bands of whole windows for a pool above."""
    conv = nn.Conv2d(c, 2, k, padding=k // 2, rng=0, band_bytes=band_bytes)
    bands = conv._bands(ho, wo, 4)
    assert bands[0][0] == 0 and bands[-1][1] == ho
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    rows = [r1 - r0 for r0, r1 in bands]
    assert all(r >= k for r in rows[:-1]) and rows[-1] >= 1
    if band_bytes is not None:
        assert all(r <= k or c * k * k * wo * 4 * r <= band_bytes for r in rows)
    if len(bands) > 1 and rows[0] > k:
        assert len(bands) % 2 == 0 and max(rows) - min(rows) <= 1, rows
    if ho == 75:                                              # the backward's: 8 of 9 or 10
        assert sorted({r1 - r0 for r0, r1 in conv._bands(ho, wo, 4, groups=4)}) == [9, 10]
    windows = conv._bands(ho, wo, 4, multiple=2)              # forward_pooled's: whole windows
    assert windows[0][0] == 0 and windows[-1][1] == ho
    assert all(r0 % 2 == 0 for r0, _ in windows) and all(r1 % 2 == 0 for _, r1 in windows[:-1])
    assert all(r1 - r0 >= k for r0, r1 in windows[:-1])
    assert (len(bands) == 1) == (band_bytes is None or c * k * k * wo * 4 * ho <= band_bytes)
    fours = conv._bands(ho, wo, 4, groups=4)                  # the backward's: two even rounds
    assert fours[0][0] == 0 and fours[-1][1] == ho and len(fours) >= len(bands)
    assert all(a[1] == b[0] for a, b in zip(fours, fours[1:]))
    if len(fours) > 1 and fours[0][1] > k:
        assert len(fours) % 4 == 0, fours


@pytest.mark.parametrize("need_input_grad", [True, False])
def test_banded_conv_backward_is_bit_identical_on_any_number_of_threads(need_input_grad):
    """The backward's two rounds (even bands, then odd ones; in this flat layout each band's two
    parts run together), two images of an odd number of forward bands each: y, dx, dW and db
    equal bit for bit on 1, 2, 4 and 7 threads."""
    x = RNG.standard_normal((2, 5, 27, 23)).astype(np.float32)
    dy = None
    out = {}
    for workers in (1, 2, 4, 7):
        conv = nn.Conv2d(5, 6, 3, padding=1, rng=2, need_input_grad=need_input_grad,
                         band_bytes=2000)
        with threads.using(workers):
            y = conv.forward(x)
            assert len(conv._bands(y.shape[2], y.shape[3], 4)) % 2 == 1 and y.shape[2] > 9
            dy = RNG.standard_normal(y.shape).astype(np.float32) if dy is None else dy
            dx = conv.backward(dy)
        out[workers] = (y, dx, conv.grads["weight"], conv.grads["bias"])
    for workers in (2, 4, 7):
        for a, b in zip(out[1], out[workers]):
            if a is None:
                assert b is None
            else:
                np.testing.assert_array_equal(a, b)


@contextlib.contextmanager
def _regions_counted(monkeypatch):
    """Inside: threads.parallel records how many pieces each region it runs has."""
    regions, real = [], threads.parallel
    monkeypatch.setattr(threads, "parallel",
                        lambda fn, items: regions.append(len(list(items))) or real(fn, items))
    try:
        yield regions
    finally:
        monkeypatch.setattr(threads, "parallel", real)


def test_a_conv_of_one_band_runs_its_two_backward_parts_in_one_region(monkeypatch):
    """One band of one image has no neighbour: its weight part and input part run side by side in
    one parallel region (not one after the other, in two); the results are those of one thread."""
    x = RNG.standard_normal((1, 4, 9, 11)).astype(np.float32)
    dy = RNG.standard_normal((1, 5, 9, 11)).astype(np.float32)
    out = {}
    for workers in (1, 2):
        conv = nn.Conv2d(4, 5, 3, padding=1, rng=3, band_bytes=None)
        with threads.using(workers):
            conv.forward(x)
            with _regions_counted(monkeypatch) as regions:
                dx = conv.backward(dy)
        assert regions == [2], regions
        out[workers] = (dx, conv.grads["weight"], conv.grads["bias"])
    for a, b in zip(out[1], out[2]):
        np.testing.assert_array_equal(a, b)


def test_a_large_single_band_forward_is_shared_by_two_threads(monkeypatch):
    """A forward of one band with SPLIT_BYTES of columns or more runs as two halves of its rows
    (two pieces for two threads); y is the same on 1 and 2 threads, bit for bit, and equals the
    unsplit product to float32 rounding."""
    x = RNG.standard_normal((1, 4, 10, 11)).astype(np.float32)
    monkeypatch.setattr(nn, "SPLIT_BYTES", 4 * 9 * 10 * 11 * 4)        # this layer's columns
    out = {}
    for workers in (1, 2):
        conv = nn.Conv2d(4, 5, 3, padding=1, rng=3, band_bytes=None)
        with threads.using(workers), _regions_counted(monkeypatch) as regions:
            out[workers] = conv.forward(x)
        assert regions[-1] == 2, regions
    np.testing.assert_array_equal(out[1], out[2])
    monkeypatch.setattr(nn, "SPLIT_BYTES", 1 << 40)
    conv = nn.Conv2d(4, 5, 3, padding=1, rng=3, band_bytes=None)
    np.testing.assert_allclose(out[1], conv.forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row0,row1", [(2, 6), (3, 7)])             # inside; the last band
def test_flat_columns_are_im2cols_and_their_adjoint_adds_them_back(row0, row1):
    """flat_im2col's columns, junk (j >= Wo) left out, are im2col's, in the same order; and
    flat_col2im_add is its adjoint: <cols(x), D> = <x, col2im(D)> for D zero in the junk.  The
    last band's junk reaches the zeros after the image, which its zero gradient leaves 0."""
    c, kh, kw, h, w = 3, 3, 4, 9, 11
    hp, wp = h, w                                                    # already padded
    ho, wo = hp - kh + 1, wp - kw + 1
    image = RNG.standard_normal((c, hp, wp)).astype(np.float64)
    flat = np.concatenate([image.reshape(c, -1), np.zeros((c, kw - 1))], axis=1)
    cols = nn.flat_im2col(flat, kh, kw, wp, row0, row1)             # (K, bh * Wp)
    assert cols.shape == (c * kh * kw, (row1 - row0) * wp)
    kept = cols.reshape(-1, row1 - row0, wp)[:, :, :wo].reshape(c * kh * kw, -1)
    np.testing.assert_array_equal(kept, nn.im2col(image, kh, kw, 1, 1, row0, row1))
    d = RNG.standard_normal(cols.shape)
    d.reshape(-1, row1 - row0, wp)[:, :, wo:] = 0                    # the junk's gradient
    back = np.zeros_like(flat)
    nn.flat_col2im_add(back, d, kh, kw, wp, row0, row1)
    np.testing.assert_allclose(np.sum(cols * d), np.sum(flat * back), rtol=1e-12)
    assert row1 <= ho and not back[:, hp * wp:].any()                # nothing into the tail
    one = nn.flat_im2col(flat, 1, 1, wp, row0, row1)                  # a 1x1 kernel: a view
    assert np.shares_memory(one, flat) and one.shape == (c, (row1 - row0) * wp)


@pytest.mark.parametrize("workers", [1, 2])
def test_flat_conv_never_reads_uninitialised_memory(workers, monkeypatch):
    """Fresh arrays and the threads' scratch buffers full of NaN: the junk columns' zero gradient
    must keep it out of dx, dW and db (0 * NaN is NaN), and the zeros after each flat channel out
    of the junk of y's last row, so that the array behind the returned view is finite too."""
    x = RNG.standard_normal((2, 3, 13, 10)).astype(np.float32)
    whole = nn.Conv2d(3, 4, 3, padding=1, rng=5, band_bytes=None)
    y_ref = whole.forward(x)
    dy = RNG.standard_normal(y_ref.shape).astype(np.float32)
    dx_ref = whole.backward(dy)
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda shape, dtype=float, *a, **k:
                        np.full(shape, np.nan, dtype=dtype))
    with threads.using(workers):
        threads.parallel(lambda slot: [threads.scratch(1 << 16, np.float32, slot=slot).fill(np.nan)
                                       for slot in ("columns", "dy")], range(workers))
        conv = nn.Conv2d(3, 4, 3, padding=1, rng=5, band_bytes=600)
        y = conv.forward(x)
        dx = conv.backward(dy)
    monkeypatch.setattr(np, "empty", real_empty)
    assert conv._flat() and len(conv._bands(13, 10, 4)) >= 3
    assert y.base is not None and y.base.shape == (2, 4, 13, 12) and np.isfinite(y.base).all()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):
        np.testing.assert_allclose(conv.grads[name], whole.grads[name], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride,band_bytes", [(1, 600), (2, 600), (1, None)])
def test_conv_of_an_empty_batch_gives_empty_outputs_and_zero_grads(stride, band_bytes):
    """N = 0 images (flat, strided and textbook forms): y and dx of the right empty shapes, and
    weight and bias gradients of zero, not an error."""
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1, rng=0, band_bytes=band_bytes)
    y = conv.forward(np.zeros((0, 3, 9, 8), np.float32))
    assert y.shape == (0, 4, (9 + 2 - 3) // stride + 1, (8 + 2 - 3) // stride + 1)
    dx = conv.backward(np.zeros(y.shape, np.float32))
    assert dx.shape == (0, 3, 9, 8)
    assert not conv.grads["weight"].any() and not conv.grads["bias"].any()
    assert conv.grads["weight"].shape == (4, 3, 3, 3)


def test_first_layer_banded_skips_dx_and_keeps_param_grads():
    banded, whole = _conv_pair(3, 4, 3, 1, 1, False, band_bytes=500)
    x = RNG.standard_normal((1, 3, 30, 22)).astype(np.float32)
    dy = RNG.standard_normal(banded.forward(x).shape).astype(np.float32)
    whole.forward(x)
    assert banded.backward(dy) is None and whole.backward(dy) is None
    np.testing.assert_allclose(banded.grads["weight"], whole.grads["weight"], rtol=1e-5, atol=1e-4)


def test_conv_refuses_a_bad_band_size():
    with pytest.raises(ValueError, match="band_bytes"):
        nn.Conv2d(3, 4, 3, band_bytes=0)


def test_maxpool_keeps_one_byte_per_window_not_its_input():
    pool = nn.MaxPool2d(2, 2)
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    pool.forward(x)
    shape, argmax = pool._cache
    assert shape == x.shape and argmax.dtype == np.uint8 and argmax.shape == (1, 3, 4, 4)


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (3, 3)])
def test_pool_and_relu_are_the_same_in_blocks_and_on_any_number_of_threads(k, s, monkeypatch):
    """Split into blocks of channels (BLOCK_SIZE), on one thread or three, or done as one block:
    equal bit for bit, ties included."""
    x = np.round(RNG.standard_normal((1, 8, 400, 390)), 1).astype(np.float32)   # many exact ties
    assert x.size >= 3 * nn.BLOCK_SIZE                            # three blocks or more
    out = {}
    for name, workers, block in [("blocks", 1, nn.BLOCK_SIZE), ("threads", 3, nn.BLOCK_SIZE),
                                 ("whole", 1, x.size + 1)]:
        monkeypatch.setattr(nn, "BLOCK_SIZE", block)
        pool, relu = nn.MaxPool2d(k, s), nn.ReLU()
        with threads.using(workers):
            y = pool.forward(relu.forward(x))
            dy = np.linspace(-1, 1, y.size, dtype=np.float32).reshape(y.shape)
            out[name] = (y, relu.backward(pool.backward(dy)))
    for name in ("threads", "whole"):
        for a, b in zip(out["blocks"], out[name]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("large", [False, True])
def test_relu_against_zeros_is_np_maximum_with_0_bit_for_bit(large, monkeypatch):
    """relu_into reads a shared buffer of zeros where np.maximum(x, 0) is 4x slower: the same bits,
    -0.0, NaN and both infinities included, in place and into a strided block; above _ZEROS_MAX
    values it is np.maximum(x, 0) itself."""
    monkeypatch.setattr(nn, "_zero_buffers", {})                   # none made before this test
    if large:
        monkeypatch.setattr(nn, "_ZEROS_MAX", 100)
    x = np.array([-0.0, 0.0, -1.5, 2.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45], np.float32)
    x = np.tile(x, (2, 3, 70)).reshape(2, 3, 30, 21)
    want = np.maximum(x, np.float32(0))
    got = nn.relu_into(x, np.empty_like(x))
    assert got.tobytes() == want.tobytes()
    block = x[:, 1:, ::2, 3:]                                       # a strided block, in place
    want_block = np.maximum(block, np.float32(0))
    nn.relu_into(block, block)
    assert block.tobytes() == want_block.tobytes()
    assert x[:, 0].tobytes() == np.tile(np.array([-0.0, 0.0, -1.5, 2.0, np.nan, np.inf, -np.inf,
                                                   1e-45, -1e-45], np.float32),
                                         (2, 3, 70)).reshape(2, 3, 30, 21)[:, 0].tobytes()
    if large:                                                      # the scalar: no buffer for it
        assert nn._zero_buffers == {}
    else:                                                          # the shared zeros: read-only
        assert not nn._zero_buffers[x.dtype].flags.writeable


def test_pool_before_relu_is_vggs_relu_before_pool_bit_for_bit():
    """The backbone pools before its ReLU (a quarter of the values to rectify).  Against VGG's
    conv -> ReLU -> pool with the same weights: the output, the input gradient and every weight
    gradient are equal bit for bit, on windows with ties, all-negative and zero maxima.  (The
    first conv pooled in the polyphase layout sums its products in another order than VGG's
    plain conv: with whole numbers for weights, image and gradient every sum is exact, and the
    order cannot show.)"""
    from frcnn_scratch.model import build_backbone
    ours = build_backbone((4, 6, 5), rng=0)
    kinds = [type(layer).__name__ for layer in ours]
    assert kinds == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU", "Conv2d", "ReLU"]
    vgg = build_backbone((4, 6, 5), rng=0)
    vgg.layers = [vgg.layers[i] for i in (0, 2, 1, 3, 5, 4, 6, 7)]  # conv, ReLU, pool, ...
    for net in (ours, vgg):
        for layer in net.layers:
            for name, value in layer.params.items():              # whole numbers in -1..1
                layer.params[name] = np.random.default_rng(value.size).integers(
                    -1, 2, value.shape).astype(np.float32)
    x = RNG.integers(-1, 2, (1, 3, 36, 44)).astype(np.float32)
    y, y_vgg = ours.forward(x), vgg.forward(x)
    assert ours.layers[0]._cache[2] == "polyphase" and vgg.layers[0]._cache[2] == "flat"
    np.testing.assert_array_equal(y, y_vgg)
    dy = RNG.integers(-1, 2, y.shape).astype(np.float32)
    ours.backward(dy.copy()), vgg.backward(dy.copy())
    for layer, twin in zip(ours.layers, (vgg.layers[i] for i in (0, 2, 1, 3, 5, 4, 6, 7))):
        for name, g in layer.grads.items():
            np.testing.assert_array_equal(g, twin.grads[name], err_msg=name)
    conv = nn.Conv2d(6, 3, 3, padding=1, rng=2)                   # and the input gradient itself
    stack = nn.Sequential(conv, nn.MaxPool2d(2), nn.ReLU())
    stack_vgg = nn.Sequential(nn.Conv2d(6, 3, 3, padding=1, rng=2), nn.ReLU(), nn.MaxPool2d(2))
    x = np.round(RNG.standard_normal((1, 6, 10, 12)), 1).astype(np.float32)
    y = stack.forward(x)
    np.testing.assert_array_equal(y, stack_vgg.forward(x))
    assert (y == 0).any() and (y > 0).any()
    dy = RNG.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_array_equal(stack.backward(dy.copy()), stack_vgg.backward(dy.copy()))


@pytest.mark.parametrize("hw", [(6, 8), (7, 9), (2, 3), (5, 2)])
def test_polyphase_planes_and_columns_are_the_padded_image_and_im2col_at_each_phase(hw):
    """polyphase_split: plane (p, q) holds the zero-padded image's rows 2a + p and columns 2b + q,
    zeros past the image and one zero after the last row; polyphase_im2col: the columns of phase
    (pi, pj) of window (a, b) are im2col's columns of output pixel (2a + pi, 2b + pj)."""
    h, w = hw
    x = RNG.standard_normal((3, h, w)).astype(np.float32)
    hq, wq = (h + 3) // 2, (w + 3) // 2
    planes = np.full((2, 2, 3, hq * wq + 1), np.nan, np.float32)   # every value written
    nn.polyphase_split(x, planes, 1, 1)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    for p in range(2):
        for q in range(2):
            want = np.zeros((3, hq, wq), np.float32)
            part = xp[:, p::2, q::2]
            want[:, :part.shape[1], :part.shape[2]] = part
            np.testing.assert_array_equal(planes[p, q, :, :-1].reshape(3, hq, wq), want)
    assert (planes[..., -1] == 0).all()
    with pytest.raises(ValueError, match="polyphase planes: expected shape"):
        nn.polyphase_split(x, planes[..., :-1], 1, 1)
    ha, wa = h // 2, w // 2
    if ha == 0 or wa == 0:
        return
    cols = nn.polyphase_im2col(planes, 3, 3, wq, 0, ha).reshape(27, 2, 2, ha, wq)[..., :wa]
    full = nn.im2col(xp, 3, 3, 1, 1, 0, h).reshape(27, h, w)
    for pi in range(2):
        for pj in range(2):
            np.testing.assert_array_equal(cols[:, pi, pj], full[:, pi:2 * ha:2, pj:2 * wa:2])
    band = nn.polyphase_im2col(planes, 3, 3, wq, ha - 1, ha).reshape(27, 2, 2, 1, wq)
    np.testing.assert_array_equal(band, nn.polyphase_im2col(planes, 3, 3, wq, 0, ha).reshape(
        27, 2, 2, ha, wq)[:, :, :, ha - 1:])                        # a band: its rows alone


@pytest.mark.parametrize("shape, band_bytes", [((2, 3, 12, 16), nn.BAND_BYTES),
                                               ((2, 3, 25, 17), 900), ((1, 3, 40, 22), 2000)])
@pytest.mark.parametrize("relu", [False, True])
def test_a_first_conv_pooled_in_the_polyphase_layout_equals_the_flat_layout(shape, band_bytes,
                                                                             relu, monkeypatch):
    """A first conv (no input gradient) under a 2 x 2 pool works in the polyphase layout: the
    pooled values, the argmax (ties and zero maxima included), dW and db equal those of the same
    conv in the flat layout, bit for bit (whole numbers: every sum is exact, whatever its
    order), for even and odd sizes (rows and columns no window covers), two images, many bands,
    on 1 and 3 threads; dy as a pool's PooledGradient or as a plain array."""
    if band_bytes == 900:
        monkeypatch.setattr(nn, "BAND_POOL_SIZE", 64)              # bands pooled in blocks
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(-2, 3, shape).astype(np.float32)
    convs = [nn.Conv2d(3, 5, 3, padding=1, rng=0, need_input_grad=False, band_bytes=band_bytes),
             nn.Conv2d(3, 5, 3, padding=1, rng=0, need_input_grad=True, band_bytes=band_bytes)]
    for conv in convs:
        conv.params["weight"] = rng.integers(-2, 3, conv.params["weight"].shape).astype(np.float32)
        conv.params["bias"] = np.arange(5, dtype=np.float32) - 2
    convs[1].params = {k: v.copy() for k, v in convs[0].params.items()}
    results = []
    for workers in (1, 3):
        for conv in convs:
            pool, act = nn.MaxPool2d(2), nn.ReLU(inplace=True) if relu else None
            with threads.using(workers):
                y = conv.forward_pooled(x, pool, act)
                argmax = pool._cache[1].copy()
                dy = rng.integers(-2, 3, y.shape).astype(np.float32) if not results else \
                    results[0][-1]
                conv.backward(pool.backward_pooled(dy))
                grads = {k: v.copy() for k, v in conv.grads.items()}
                conv.forward_pooled(x, pool, act)
                conv.backward(np.asarray(pool.backward_pooled(dy)))   # dy as a plain array
            for name, g in conv.grads.items():
                np.testing.assert_array_equal(g, grads[name], err_msg=name)
            results.append((conv._cache[2], y, argmax, grads, dy))
    assert [r[0] for r in results] == ["polyphase", "flat"] * 2
    if band_bytes == 900:
        assert len(convs[0]._bands(shape[2] // 2, 2 * shape[3], 4)) >= 3, "several bands"
    for layout, y, argmax, grads, dy in results[1:]:
        np.testing.assert_array_equal(y, results[0][1])
        np.testing.assert_array_equal(argmax, results[0][2])
        for name in grads:
            np.testing.assert_array_equal(grads[name], results[0][3][name], err_msg=name)
    assert (results[0][1] == (0 if relu else results[0][1].max())).any()   # zero maxima (ReLU)
    bad = x.copy()
    bad[-1, 2, -1, -1] = np.nan                                     # the image's last pixel
    with pytest.raises(ValueError, match="Conv2d x: contains NaN or Inf"):
        convs[0].forward_pooled(bad, nn.MaxPool2d(2))
    convs[0].params["weight"][1, 0, 0, 0] = np.inf                  # the conv's output checked
    with pytest.raises(ValueError, match="MaxPool2d x: contains NaN or Inf"), \
            np.errstate(invalid="ignore"):
        convs[0].forward_pooled(x, nn.MaxPool2d(2))
    assert convs[0]._cache[2] == "polyphase"


def test_a_pooled_gradients_planes_are_the_phases_of_its_dx():
    """PooledGradient.planes: phase (u, v) of window rows [row0, row1) of the unpooled dx, in
    rows Wq wide whose values past Wo // 2 are 0."""
    x = RNG.integers(-2, 3, (2, 3, 10, 14)).astype(np.float32)      # ties
    pool = nn.MaxPool2d(2)
    y = pool.forward(x)
    pooled = pool.backward_pooled(RNG.standard_normal(y.shape).astype(np.float32))
    dx = np.asarray(pooled)
    out = np.full((3, 2, 2, 3, 9), np.nan, np.float32)
    pooled.planes(1, 1, 4, out)
    for u in range(2):
        for v in range(2):
            np.testing.assert_array_equal(out[:, u, v, :, :7], dx[1, :, 2 + u:8:2, v:14:2])
    assert (out[..., 7:] == 0).all()


@pytest.mark.parametrize("k, hw", [(2, (8, 12)), (2, (9, 13)), (3, (13, 11))])
def test_a_pooled_gradient_is_the_pools_dx_whole_and_in_any_band_of_rows(k, hw):
    """PooledGradient (dy and the argmax of a pool whose windows tile its input) is
    MaxPool2d.backward's dx: as an array, and band by band for any band of rows, at a width
    past W (0 there, as the flat layout's junk needs); odd sizes (rows and columns that no
    window covers) and ties included."""
    pool = nn.MaxPool2d(k, k)
    x = np.round(RNG.standard_normal((2, 3) + hw), 1).astype(np.float32)   # many exact ties
    y = pool.forward(x)
    dy = RNG.standard_normal(y.shape).astype(np.float32)
    pooled = pool.backward_pooled(dy)
    want = pool.backward(dy)
    assert isinstance(pooled, nn.PooledGradient) and pooled.shape == x.shape
    np.testing.assert_array_equal(np.asarray(pooled), want)
    h, w = hw
    for i in range(2):
        for row0 in range(h):
            for row1 in range(row0 + 1, h + 1):
                out = np.full((3, row1 - row0, w + 3), np.nan, np.float32)
                assert pooled.rows(i, row0, row1, out) is out
                np.testing.assert_array_equal(out[:, :, :w], want[i, :, row0:row1])
                assert not out[:, :, w:].any()
    overlapping = nn.MaxPool2d(3, 2)                                   # windows that do not tile:
    y = overlapping.forward(x)                                         # the plain array
    dy = RNG.standard_normal(y.shape).astype(np.float32)
    got = overlapping.backward_pooled(dy)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, overlapping.backward(dy))
    with pytest.raises(ValueError, match="MaxPool2d.backward dy: contains NaN or Inf"):
        pool.forward(x)
        pool.backward_pooled(np.full(pool._cache[1].shape, np.nan, np.float32))


@pytest.mark.parametrize("stride, need_input_grad, band_bytes", [
    (1, True, 600), (1, False, 600), (1, True, None), (2, True, 600), (1, True, nn.BAND_BYTES)])
@pytest.mark.parametrize("workers", [1, 3])
def test_conv_backward_of_a_pooled_gradient_equals_that_of_its_array(stride, need_input_grad,
                                                                    band_bytes, workers):
    """A Conv2d under a max pool unpools the pool's PooledGradient band by band: the same dx,
    dW and db bit for bit as from the full-size array, in the flat layout and in im2col's, with
    and without dx, in one band or many, on any number of threads."""
    conv, twin = (nn.Conv2d(3, 4, 3, stride=stride, padding=1, rng=0, band_bytes=band_bytes,
                            need_input_grad=need_input_grad) for _ in range(2))
    x = RNG.standard_normal((2, 3, 37, 23)).astype(np.float32)
    pool = nn.MaxPool2d(2)
    y = conv.forward(x)
    twin.forward(x)
    pool.forward(y)
    pooled = pool.backward_pooled(RNG.standard_normal(pool._cache[1].shape).astype(np.float32))
    assert band_bytes != 600 or len(conv._bands(*y.shape[2:], 4)) >= 3, "several bands"
    with threads.using(workers):
        dx, dx_twin = conv.backward(pooled), twin.backward(np.asarray(pooled))
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(conv.grads[name], twin.grads[name], err_msg=name)
    if need_input_grad:
        np.testing.assert_array_equal(dx, dx_twin)
    else:
        assert dx is None and dx_twin is None
    wrong = nn.PooledGradient(pooled.dy[:1], pooled.argmax[:1], (2, 2), (1,) + y.shape[1:])
    with pytest.raises(ValueError, match=r"expected the forward output's shape"):
        conv.backward(wrong)
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Conv2d(3, 4, 3).backward(pooled)


@pytest.mark.parametrize("stride, band_bytes, k", [
    (1, 600, 2), (1, 10800, 3), (1, None, 2), (2, 600, 2), (1, nn.BAND_BYTES, 2)])
@pytest.mark.parametrize("workers", [1, 3])
def test_a_conv_pooled_band_by_band_equals_the_conv_then_the_pool(stride, band_bytes, k, workers,
                                                                   monkeypatch):
    """Conv2d.forward_pooled (each band of output rows pooled at once, the conv's output never
    stored) gives the pool's output and argmax of the two layers' own forward passes, bit for
    bit: the flat layout and im2col's, bands that end mid-window in the plain layer, rows and
    columns no window covers (odd sizes), a single band split in two, on any number of threads;
    and what each backward pass needs."""
    monkeypatch.setattr(nn, "SPLIT_BYTES", 1)                      # a single band is split too
    monkeypatch.setattr(nn, "BAND_POOL_SIZE", 200)                 # a band pooled in blocks
    conv, twin = (nn.Conv2d(3, 4, 3, stride=stride, padding=1, rng=0, band_bytes=band_bytes)
                  for _ in range(2))
    pool, pool_twin = nn.MaxPool2d(k), nn.MaxPool2d(k)
    x = np.round(RNG.standard_normal((2, 3, 39, 25)), 1).astype(np.float32)   # ties
    with threads.using(workers):
        y = conv.forward_pooled(x, pool)
        y_own_bands = pool_twin.forward(twin.forward(x))
        # The plain forward's bands need not end on whole windows, and a band's product may sum a
        # column in another order when the band has another width (OpenBLAS's AVX2 kernels
        # do): the conv's values agree to float32 rounding.  For the pool's values and argmax,
        # bit for bit, the twin's forward takes the pooled forward's bands.
        np.testing.assert_allclose(y, y_own_bands, rtol=1e-6, atol=1e-6)
        windows = k if pool.tiles() else 1          # (a 3 x 3 pool of stride 2 does not tile)
        forward_bands = lambda ho, wo, size, multiple=1, groups=2: nn.Conv2d._bands(  # noqa
            twin, ho, wo, size, windows if groups == 2 else multiple, groups)
        twin._bands = forward_bands
        y_twin = pool_twin.forward(twin.forward(x))
        del twin._bands                                            # the class's own again
        np.testing.assert_array_equal(y, y_twin)
        np.testing.assert_array_equal(pool._cache[1], pool_twin._cache[1])       # the argmax
        assert pool._cache[0] == pool_twin._cache[0]
        np.testing.assert_array_equal(conv._cache[0], twin._cache[0])            # the padded x
        if band_bytes in (600, 10800):
            bands = twin._bands(*twin._cache[1][2:], 4)
            assert len(bands) >= 3 and any(r % k for band in bands for r in band), "mid-window"
        with nn.no_grad():
            np.testing.assert_array_equal(conv.forward_pooled(x, pool), y)
        assert pool._cache is None and conv._cache is None
    overlapping = nn.MaxPool2d(3, 2)                                   # windows that do not tile
    np.testing.assert_array_equal(conv.forward_pooled(x, overlapping),
                                  nn.MaxPool2d(3, 2).forward(twin.forward(x)))
    conv.params["weight"][0, 0, 1, 1] = np.inf                         # the conv's output checked
    with pytest.raises(ValueError, match="MaxPool2d x: contains NaN or Inf"), \
            np.errstate(invalid="ignore"):
        conv.forward_pooled(x, pool)
    with nn.no_finite_checks(), np.errstate(invalid="ignore"):
        assert not np.isfinite(conv.forward_pooled(x, pool)).all()


def _pooled_stack():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=0, band_bytes=600), nn.MaxPool2d(2),
                         nn.ReLU(inplace=True), nn.Conv2d(4, 5, 3, padding=1, rng=1), nn.ReLU())


def _one_by_one(net, x, dy):
    """The layers' own forward and backward passes, one after the other: (y, dx)."""
    for layer in net.layers:
        x = layer.forward(x)
    for layer in reversed(net.layers):
        dy = layer.backward(dy)
    return x, dy


def test_sequential_pools_and_rectifies_a_convs_bands_and_unpools_its_gradient(monkeypatch):
    """conv -> max pool -> ReLU in a Sequential: the forward pools and rectifies each band of
    the conv's output as it is made, the ReLU's gradient is folded into the pool's argmax (an
    offset >= kh * kw where a window's max is <= 0), and the conv's backward gets the pool's
    PooledGradient.  Output, dx and every weight gradient equal those of the layers run one by
    one, bit for bit, with windows that are all negative and windows whose max is exactly 0;
    the ReLU's own backward is skipped, and refused if called (it kept no mask)."""
    seen, pooled_forward = [], []
    backward, forward_pooled = nn.Conv2d.backward, nn.Conv2d.forward_pooled
    monkeypatch.setattr(nn.Conv2d, "backward", lambda self, dy: seen.append(type(dy)) or
                        backward(self, dy))
    monkeypatch.setattr(nn.Conv2d, "forward_pooled", lambda self, x, pool, relu=None:
                        pooled_forward.append((pool, relu)) or forward_pooled(self, x, pool, relu))
    net, ref = _pooled_stack(), _pooled_stack()
    for conv in (net[0], ref[0]):
        conv.params["bias"][1] = -50                                   # every window's max < 0
        conv.params["weight"][2] = 0                                   # every window's max = 0
    x = np.round(RNG.standard_normal((1, 3, 17, 22)), 1).astype(np.float32)   # ties
    y = net.forward(x)
    assert pooled_forward == [(net[1], net[2])] and net[2]._mask is None
    argmax = net[1]._cache[1]
    assert (argmax[:, 1:3] >= 4).all() and (argmax[:, 0] < 4).any()     # no offset gets dy
    dy = RNG.standard_normal(y.shape).astype(np.float32)
    dx = net.backward(dy.copy())
    assert seen == [np.ndarray, nn.PooledGradient]
    y_ref, dx_ref = _one_by_one(ref, x, dy.copy())
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for k, v in ref.grads.items():
        np.testing.assert_array_equal(net.grads[k], v, err_msg=k)
    assert not net.grads["0.weight"][1].any() and ref.grads["0.weight"][0].any()
    with pytest.raises(RuntimeError, match="before forward"):
        net[2].backward(dy)
    with nn.no_grad():
        np.testing.assert_array_equal(net.forward(x), y)


@pytest.mark.parametrize("o,k,p", [(16, 28, 38520), (16, 28, 5000), (16, 28, 2047),
                                   (3, 4, 10), (32, 33, 4096), (16, 28, 1024)])
def test_small_weight_gradients_in_runs_of_pixels_equal_the_plain_product(o, k, p):
    """dW of a small layer (O * K <= SMALL_PRODUCT_OUTPUTS) over a long band is a batch of
    products over runs of about WEIGHT_GRAD_PIXELS pixels, added in order, then the pixels the
    equal runs leave; it equals dy @ cols.T to float32 rounding.  A larger layer, or a band of
    fewer than two runs, is the plain product, taken as (cols @ dy^T)^T."""
    dy = RNG.standard_normal((o, p)).astype(np.float32)
    cols = RNG.standard_normal((k, p)).astype(np.float32)
    got = nn._weight_grad(dy, cols)
    assert got.shape == (o, k) and got.dtype == np.float32
    exact = dy.astype(np.float64) @ cols.T.astype(np.float64)
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5 * np.sqrt(p))
    runs = p // nn.WEIGHT_GRAD_PIXELS
    if o * k > nn.SMALL_PRODUCT_OUTPUTS or runs < 2:
        np.testing.assert_array_equal(got, (cols @ dy.T).T)
        return
    # the runs, each its own product, added in order by hand: the same bits (so the runs are
    # used: the plain product sums in another order)
    run = p // runs
    want = sum(((cols[:, j * run:(j + 1) * run] @ dy[:, j * run:(j + 1) * run].T)
                for j in range(1, runs)), cols[:, :run] @ dy[:, :run].T)
    if runs * run < p:
        want = want + cols[:, runs * run:] @ dy[:, runs * run:].T
    np.testing.assert_array_equal(got, want.T)
    # strided operands (a band's rows of the columns buffer, dy's rows of a wider array): views
    # are used as they come, and the result is the same
    wide_dy = np.zeros((o, p + 3), np.float32)
    wide_dy[:, :p] = dy
    np.testing.assert_array_equal(nn._weight_grad(wide_dy[:, :p], cols), got)


def test_inplace_relu_writes_over_its_input_and_gradient():
    relu = nn.ReLU(inplace=True)
    x = np.array([[-1.0, 2.0, 0.0]], np.float32)
    y = relu.forward(x)
    assert y is x and x.tolist() == [[0.0, 2.0, 0.0]]
    dy = np.array([[5.0, 6.0, 7.0]], np.float32)
    dx = relu.backward(dy)
    assert dx is dy and dy.tolist() == [[0.0, 6.0, 0.0]]


def test_a_training_step_is_bit_identical_on_1_2_and_3_threads():
    """The model's convolutions split into many bands (64 KB each), pooling and ReLU into channel
    blocks (a 240 x 320 image): losses, every gradient and the predictions are equal bit for bit."""
    sample = sample_at(240, 320, seed=0)
    results = []
    try:
        for n in (1, 2, 3):
            threads.set_threads(n)
            model = set_bands(FasterRCNN(Config(**SMALL)), 64 << 10)
            assert len(model.backbone.layers[0]._bands(240, 320, 4)) >= 8
            losses = model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=0)
            grads = {k: v.copy() for k, v in model.grads().items()}
            results.append((losses, grads, model.predict(sample["image"])))
    finally:
        threads.set_threads(None)
    first = results[0]
    for losses, grads, det in results[1:]:
        assert losses == first[0]
        for name, g in grads.items():
            np.testing.assert_array_equal(g, first[1][name], err_msg=name)
        for key in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(det[key], first[2][key])


def test_the_speed_work_keeps_losses_and_gradients():
    """The whole model with every convolution in many bands against the same model doing each
    convolution in one band (the textbook im2col): losses and gradients to float32 rounding."""
    sample = sample_at(200, 260, seed=1)
    models = [set_bands(FasterRCNN(Config(**SMALL)), 32 << 10),       # many bands
              set_bands(FasterRCNN(Config(**SMALL)), None)]           # one band each
    assert len(models[0].backbone.layers[0]._bands(200, 260, 4)) >= 8
    out = [m.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=3) for m in models]
    for key in out[0]:                                    # measured: 7e-8 relative at most
        assert out[0][key] == pytest.approx(out[1][key], rel=1e-6, abs=1e-9), key
    for name, g in models[0].grads().items():             # measured: 6e-7 of the array's max
        ref = models[1].grads()[name]
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def test_top_n_equals_the_first_n_of_a_stable_sort():
    rng = np.random.default_rng(5)
    for _ in range(500):
        scores = rng.integers(0, 6, int(rng.integers(0, 40))).astype(np.float32)   # ties
        n = int(rng.integers(0, 45))
        np.testing.assert_array_equal(top_n(scores, n), np.argsort(-scores, kind="stable")[:n])


# ---- the thread policy -----------------------------------------------------------------------

def test_work_threads_one_for_small_images_a_few_for_large_and_the_user_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    for cores, want in [(1, (1, 1, 1, 1, 1)), (2, (1, 1, 2, 2, 2)), (4, (1, 1, 4, 4, 4)),
                        (16, (1, 1, 6, 6, 6)), (64, (1, 1, 6, 6, 6))]:
        monkeypatch.setattr(threads, "usable_cores", lambda: cores)
        got = tuple(threads.work_threads(h, w) for h, w in
                    [(96, 160), (160, 256), (240, 400), (480, 640), (600, 1000)])
        assert got == want, (cores, got)
    monkeypatch.undo()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    try:
        threads.set_threads(3)
        assert threads.work_threads(96, 160) == 3 and threads.work_threads(600, 1000) == 3
    finally:
        threads.set_threads(None)
    for bad in (0, -1, 2.5, True, "2", threads.MAX_THREADS + 1):
        with pytest.raises(ValueError, match="threads"):
            threads.set_threads(bad)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                    # the environment is a choice too
    assert threads.work_threads(600, 1000) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert threads.work_threads(600, 1000) == min(threads.usable_cores(), 6)


def test_parallel_keeps_order_and_raises_errors():
    with threads.using(3):
        assert threads.parallel(lambda v: v * v, range(10)) == [v * v for v in range(10)]

        def fail(v):
            raise KeyError("boom")

        with pytest.raises(KeyError, match="boom"):
            threads.parallel(fail, range(4))
    assert threads.workers() == 1
    import threading
    seen = []
    with threads.using(3):                    # the count belongs to the thread that set it
        other = threading.Thread(target=lambda: seen.append(threads.workers()))
        other.start()
        other.join()
    assert seen == [1]
    assert threads.chunks(10, 3) == [(0, 3), (3, 6), (6, 10)] and threads.chunks(2, 8) == [(0, 1), (1, 2)]


def test_one_team_grows_to_the_largest_thread_count_and_a_region_uses_n_threads(monkeypatch):
    import threading
    import time
    monkeypatch.setattr(threads, "_the_team", None)                   # a fresh team
    seen, lock = {}, threading.Lock()

    def who(n):
        time.sleep(0.003)
        with lock:
            seen.setdefault(n, set()).add(threading.get_ident())

    for n in (2, 4, 3):
        with threads.using(n):
            threads.parallel(who, [n] * 16)
        assert 1 < len(seen[n]) <= n                                   # the caller is one of them
        assert threading.get_ident() in seen[n]
    assert len(threads._team().queues) == 3                            # 4 threads: 3 helpers


def test_regions_from_two_threads_at_once_are_each_whole():
    """Two Python threads (two models, say) each running regions: one gets the team, the other a
    pool, and every region gets all of its own results."""
    import threading
    failures = []

    def regions(offset):
        with threads.using(3):
            for r in range(40):
                items = list(range(offset + r, offset + r + 7))
                if threads.parallel(lambda v: v * 3, items) != [v * 3 for v in items]:
                    failures.append((offset, r))

    workers = [threading.Thread(target=regions, args=(k * 1000,)) for k in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert failures == []


def test_an_interrupted_region_leaves_later_regions_whole():
    """Ctrl-C inside a parallel region (in the caller's own item, or while it waits for its
    helpers) raises KeyboardInterrupt at once, and the regions after it still get every result:
    helpers still busy with the old region's items must not be counted in a new one."""
    import threading
    import time

    def slow_square(v):
        time.sleep(0.02)
        if v == -1 and threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt
        return v * v

    with threads.using(3):
        with pytest.raises(KeyboardInterrupt):          # all items -1: the caller gets one too
            threads.parallel(slow_square, [-1] * 6)
        assert threads.parallel(slow_square, range(9)) == [v * v for v in range(9)]

        real_wait = threading.Event.wait

        def interrupted(self, timeout=None):            # Ctrl-C while the caller waits
            if threading.current_thread() is threading.main_thread():
                raise KeyboardInterrupt
            return real_wait(self, timeout)

        threading.Event.wait = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):      # its helpers still sleep in items after it
                threads.parallel(slow_square, range(3, 12))
        finally:
            threading.Event.wait = real_wait
        for _ in range(3):
            assert threads.parallel(slow_square, range(9)) == [v * v for v in range(9)]


def test_a_background_job_takes_a_helper_which_joins_the_regions_when_it_is_done(monkeypatch):
    """background() runs on the team's last helper: a region that starts meanwhile does not wait
    for that helper (the caller takes its items), the helper joins the regions once its job is done,
    and the threads at work never outnumber workers()."""
    import threading
    import time
    monkeypatch.setattr(threads, "_the_team", None)                   # a fresh team
    here = threading.get_ident()
    release, active, most, lock = threading.Event(), [0], [0], threading.Lock()

    def busy(fn):
        def run(*args):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            try:
                return fn(*args)
            finally:
                with lock:
                    active[0] -= 1
        return run

    who = busy(lambda v: (time.sleep(0.002), threading.get_ident())[1])
    with threads.using(2):
        job = threads.background(busy(lambda: (release.wait(30), threading.get_ident())[1]))
        assert set(threads.parallel(who, range(8))) == {here}         # the helper is busy: no wait
        assert not job.ended.is_set()
        release.set()
        helper = job.result()
        assert helper != here
        seen = set()
        for _ in range(20):                                           # it joins the regions again
            seen |= set(threads.parallel(who, range(8)))
            if helper in seen:
                break
        assert seen == {here, helper}

        slow = threads.background(busy(lambda: (time.sleep(0.05), threading.get_ident())[1]))
        late = set(threads.parallel(busy(lambda v: (time.sleep(0.01), threading.get_ident())[1]),
                                    range(20)))                       # 0.2 s of items
        assert slow.result() == helper and late == {here, helper}     # it joined when done
    assert most[0] <= 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_threads_work_in_a_forked_child():
    """A child forked after the team (and the background pool) started has none of their threads:
    its regions and background jobs must still run, not wait forever."""
    import multiprocessing
    with threads.using(3):                                   # the team and a pool exist now
        threads.parallel(lambda v: v, range(6))
        threads.background(lambda: 1).result()
    child = multiprocessing.get_context("fork").Process(target=_regions_in_a_child)
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0


def _regions_in_a_child():
    with threads.using(3):
        ok = threads.parallel(lambda v: v * v, range(9)) == [v * v for v in range(9)]
        ok = ok and threads.background(lambda: 7).result() == 7
    os._exit(0 if ok else 1)


def test_background_runs_beside_the_caller_or_at_once_on_one_thread():
    import threading
    here = threading.get_ident()
    done = threads.background(lambda a, b: (a + b, threading.get_ident()), 2, 3)
    assert done.result() == (5, here)                             # one thread: at once, here
    with threads.using(2):
        job = threads.background(lambda: threading.get_ident())
        assert job.result() != here                               # beside the caller
        assert threads.background(lambda: 7).result() == 7

        def fail():
            raise KeyError("boom")

        for n in (1, 2):
            with threads.using(n), pytest.raises(KeyError, match="boom"):
                threads.background(fail).result()                 # raised where it is read


@pytest.mark.parametrize("slow_stage, broken_stage", [
    ("anchor_targets", "features"),            # labelling beside the backbone; the backbone fails
    ("proposal_targets", "rpn.backward"),      # detector side beside the RPN side; the RPN fails
])
def test_a_failing_step_leaves_no_stage_running_on_another_thread(slow_stage, broken_stage,
                                                                  monkeypatch):
    """Stages that draw from the step's rng run on other threads (the anchor labelling beside the
    backbone, the detector's side beside the RPN's loss and backward): when the step fails, it
    waits for them before raising, so a retried step never shares the rng with a stray thread."""
    import time
    from frcnn_scratch import model as model_module
    owner = model_module._rpn if slow_stage == "anchor_targets" else model_module
    real, ended = getattr(owner, slow_stage), []

    def slow(*args, **kwargs):
        time.sleep(0.3)
        result = real(*args, **kwargs)
        ended.append(True)
        return result

    def broken(*args):
        raise RuntimeError(f"{broken_stage} failed")

    monkeypatch.setattr(owner, slow_stage, slow)
    model = FasterRCNN(Config(**SMALL))
    target = model.rpn if broken_stage == "rpn.backward" else model
    monkeypatch.setattr(target, broken_stage.split(".")[-1], broken)
    sample = sample_at(120, 160, seed=0)
    try:
        threads.set_threads(2)
        with pytest.raises(RuntimeError, match=f"{broken_stage} failed"):
            model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=0)
    finally:
        threads.set_threads(None)
    assert ended == [True]


def test_the_two_sides_of_a_step_draw_from_rng_in_the_same_order_on_any_threads(monkeypatch):
    """The anchor labelling draws before the RoI sampling, whichever thread runs first: a slow
    labelling must not let the detector's side sample RoIs first (losses equal bit for bit)."""
    import time
    from frcnn_scratch import model as model_module
    labelling = model_module._rpn.anchor_targets
    sample = sample_at(120, 160, seed=0)
    losses = {}
    for n, delay in [(1, 0.0), (2, 0.2)]:
        monkeypatch.setattr(model_module._rpn, "anchor_targets",
                            lambda *a, d=delay: (time.sleep(d), labelling(*a))[1])
        model = FasterRCNN(Config(**SMALL))
        try:
            threads.set_threads(n)
            losses[n] = model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"],
                                             rng=np.random.default_rng(4))
        finally:
            threads.set_threads(None)
    assert losses[1] == losses[2]


def test_feature_size_is_the_backbones_output_size():
    model = FasterRCNN(Config(**SMALL))
    for h, w in [(32, 32), (33, 47), (97, 161), (120, 64)]:
        x = np.zeros((1, 3, h, w), np.float32)
        assert model.features(x).shape[2:] == model.feature_size(h, w)


def test_cli_threads_option_is_checked_and_reset(capsys):
    assert main(["train", "--threads", "0", "--iters", "1", "--checkpoint", "never.npz"]) == 2
    assert "--threads: expected an int in 1.." in capsys.readouterr().err
    assert threads.work_threads(96, 160) == 1                     # nothing left behind


# ---- frcnn bench-model -----------------------------------------------------------------------

def test_bench_model_times_numpy_and_measures_memory(capsys):
    assert main(["bench-model", "--sizes", "64x96", "--repeat", "1", "--numpy-only", "--memory",
                 "--set", "channels=[4,8]", "--set", "fc_hidden=16"]) == 0
    out = capsys.readouterr().out
    assert "numpy's BLAS: " in out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("64x96"))
    train_ms, predict_ms, peak_mb = (float(v) for v in row.split()[2:5])
    assert train_ms > 0 and predict_ms > 0 and 0 <= peak_mb < 500


def test_openblas_kernels_names_the_kernels_numpy_runs():
    """The name bench-model prints: OpenBLAS's own, which follows OPENBLAS_CORETYPE where the
    environment sets one (this machine's sets Haswell)."""
    import os
    name = threads.openblas_kernels()
    assert name is None or (isinstance(name, str) and name)
    chosen = os.environ.get("OPENBLAS_CORETYPE")
    if name is not None and chosen:
        assert name.lower() == chosen.lower()


def test_bench_model_says_when_the_environment_pins_numpys_kernels(monkeypatch):
    """torch does not read OPENBLAS_CORETYPE: where it is set, the table's note says that the two
    sides may run different kernels, and how to compare them on the CPU's own; unset, no note."""
    from frcnn_scratch.tools import bench_model
    monkeypatch.setattr(bench_model, "openblas_kernels", lambda: "Haswell")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    (note,) = bench_model.pinned_kernels_notes()
    assert "OPENBLAS_CORETYPE=Haswell" in note and "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in note
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert bench_model.pinned_kernels_notes() == []
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setattr(bench_model, "openblas_kernels", lambda: None)     # numpy on another BLAS
    assert bench_model.pinned_kernels_notes() == []


def test_sides_take_turns_in_blocks_and_the_call_after_the_other_side_is_not_timed():
    """A side is slow right after the other one ran (torch's spinning threads); the medians are of
    the calls that follow a call of the same side, `repeat` of them per side and kind of call."""
    import time
    from frcnn_scratch.tools.bench_model import interleaved_medians
    log = []

    class Side:
        def __init__(self, name):
            self.name = name

        def _call(self, what):
            after_other = not log or log[-1][0] != self.name     # the first call too
            log.append((self.name, what))
            time.sleep(0.03 if after_other else 0.001)

        def train(self, sample):
            self._call("train")

        def predict(self, sample):
            self._call("predict")

    t = interleaved_medians({"a": Side("a"), "b": Side("b")}, [None], repeat=3, block=2)
    assert set(t) == {(n, w) for n in "ab" for w in ("train", "predict")}
    assert all(ms < 15 for ms in t.values()), t            # timed: the slow first calls median 30
    assert log[:4] == [("a", "train")] * 2 + [("b", "train")] * 2
    assert sum(1 for entry in log if entry == ("a", "train")) == 2 * 3   # 3 blocks of 2
    with pytest.raises(ValueError, match="block"):
        interleaved_medians({"a": Side("a")}, [None], repeat=1, block=1)


def test_the_command_keeps_freed_memory_on_glibc():
    """frcnn's allocator setting takes effect where the C library is glibc (this CI's), and is a
    quiet no-op elsewhere."""
    import platform
    from frcnn_scratch.cli import keep_freed_memory
    done = keep_freed_memory()
    assert isinstance(done, bool)
    if platform.libc_ver()[0] == "glibc":
        assert done


def test_memory_estimate_is_above_the_measured_peak_but_not_far():
    """check_memory refuses images by model.memory_estimate: it must cover what a step really
    holds (measured in a fresh process), and not refuse sizes that fit by being far above it."""
    from frcnn_scratch.tools.bench_model import peak_memory_mb
    from frcnn_scratch.memory import memory_estimate, parameter_count
    cfg = Config()
    peak = peak_memory_mb("numpy", (240, 400), 1, [], repeat=2)
    assert peak is not None and peak > 5
    estimate = (memory_estimate(cfg, (240, 400)) - parameter_count(cfg) * 4 * 3) / 2 ** 20
    assert peak <= estimate <= 4 * peak + 20, (peak, estimate)


@pytest.mark.parametrize("argv,match", [
    (["--sizes", "64by96"], "--sizes"), (["--sizes", "16x96"], "at least 32"),
    (["--threads", "0"], "--threads"), (["--threads", "many"], "--threads"),
    (["--repeat", "0"], "--repeat")])
def test_bench_model_bad_options(argv, match, capsys):
    assert main(["bench-model", "--numpy-only"] + argv) == 2
    assert match in capsys.readouterr().err


def test_sample_at_has_the_exact_size_and_objects_inside():
    for h, w in parse_sizes("96x160,240x400"):
        s = sample_at(h, w, seed=2)
        assert s["image"].shape == (h, w, 3) and len(s["boxes"]) >= 1
        assert (s["boxes"][:, 2] <= w).all() and (s["boxes"][:, 3] <= h).all()


def test_torch_layers_compute_what_the_numpy_layers_compute():
    """The twin's layers (torch) hold the NumPy model's weights: same features, RPN outputs and
    head outputs to float32 rounding."""
    torch = pytest.importorskip("torch")
    model = FasterRCNN(Config(**SMALL))
    t = torch_layers(model)
    x = model.preprocess(sample_at(64, 96, seed=0)["image"])
    features = model.features(x)
    with torch.no_grad():
        tf = t["backbone"](torch.from_numpy(x))
        np.testing.assert_allclose(tf.numpy(), features, rtol=1e-4, atol=1e-4)
        hidden = torch.relu(t["rpn_conv"](tf))
        logits, deltas = model.rpn.forward(features)
        ours = logits.reshape(features.shape[2], features.shape[3], -1).transpose(2, 0, 1)
        np.testing.assert_allclose(t["rpn_cls"](hidden)[0].numpy(), ours, rtol=1e-4, atol=1e-4)
        flat = RNG.standard_normal((3, t["fc6"].in_features)).astype(np.float32)
        np.testing.assert_allclose(t["fc6"](torch.from_numpy(flat)).numpy(),
                                   model.head.layers["fc6"].forward(flat), rtol=1e-4, atol=1e-4)


def test_torchvision_twin_trains_and_predicts():
    """Where torchvision imports (not on CPU-only CI machines whose wheel is a CUDA build)."""
    torch = pytest.importorskip("torch")
    try:
        import torchvision
    except Exception as e:                       # ImportError, or C ops built for another torch
        pytest.skip(f"torchvision not importable: {type(e).__name__}")
    from frcnn_scratch.tools.bench_model import TorchSide, torchvision_twin
    from frcnn_scratch.config import TrainConfig
    model = FasterRCNN(Config(**SMALL))
    side = TorchSide(torchvision_twin(model, torchvision), torch, TrainConfig())
    sample = sample_at(96, 128, seed=0)
    side.train(sample)
    side.predict(sample)


def test_parallel_runs_at_most_the_chosen_number_of_threads():
    """After a larger pool was used, a smaller count still runs no more threads than asked."""
    import threading
    import time
    running, peak, lock = [0], [0], threading.Lock()

    def work(_):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1

    with threads.using(4):
        threads.parallel(work, range(8))
    peak[0] = 0
    with threads.using(2):
        threads.parallel(work, range(8))
    assert peak[0] == 2
