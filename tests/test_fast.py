"""frcnn_scratch.fast against the textbook: each fast layer equals its nn.py twin (bit for bit where
the sums are the same, else to float32 rounding), on odd shapes, strides and paddings as well as
the detector's; the fast model equals the textbook model on a 480 x 640 training step and
prediction; results do not depend on the number of threads.

Then, section by section, the pieces themselves: the convolution's bands, the flat and polyphase
columns, pooling and ReLU in blocks, the fused conv -> pool -> ReLU and its pooled gradient, the
weight gradient in runs, the whole fast model on many bands and threads, the overlapped step, and
the thread team."""
import contextlib
import os

import numpy as np
import pytest

import frcnn_scratch.fast.conv as conv_module
from fixtures.detector_tiny import tiny_config, tiny_sample
from frcnn_scratch import fast, nn
from frcnn_scratch.config import Config
from frcnn_scratch.fast import blocks, columns, threads
from frcnn_scratch.fast import step as fast_step
from frcnn_scratch.fast.columns import ones_below
from frcnn_scratch.model import FasterRCNN
from frcnn_scratch.rpn import top_n
from frcnn_scratch.tools.bench_model import sample_at

# float32 sums of a few hundred products of O(1) numbers, taken in another order
F32_ROUNDING = dict(rtol=1e-5, atol=1e-5)


def rounding_close(actual, expected, what, scale_rtol=1e-5):
    """Equal to float32 rounding, relative to the array's largest value (sums in another order)."""
    scale = max(float(np.abs(expected).max()), 1e-30) if np.size(expected) else 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=scale_rtol * scale, err_msg=what)


# ---- the fast layers against their textbook twins --------------------------------------------------

CONV_CASES = [  # in, out, kernel, stride, padding, (H, W), batch
    (3, 4, 3, 1, 1, (11, 13), 2),          # the detector's: 3x3 stride 1 padding 1
    (2, 3, (2, 3), (2, 1), (0, 2), (9, 8), 1),   # rectangular kernel, stride and padding
    (4, 5, 3, 2, 1, (10, 7), 2),            # stride 2
    (3, 2, 5, 3, 2, (12, 12), 1),           # large kernel and stride
    (3, 2, 2, 3, 1, (8, 10), 1),            # rows no window reads
    (4, 3, 1, 1, 0, (6, 9), 2),             # 1x1: the columns are x itself
    (2, 3, 3, 1, 0, (3, 3), 1),             # one output pixel
]


@pytest.mark.parametrize("c, o, k, s, p, hw, n", CONV_CASES)
@pytest.mark.parametrize("band_bytes", [fast.BAND_BYTES, 300, None])    # one band, many, whole
@pytest.mark.parametrize("workers", [1, 3])
def test_banded_conv_equals_the_textbook_conv(c, o, k, s, p, hw, n, band_bytes, workers):
    rng = np.random.default_rng(0)
    plain = nn.Conv2d(c, o, k, stride=s, padding=p, rng=1)
    quick = fast.Conv2d(c, o, k, stride=s, padding=p, rng=1, band_bytes=band_bytes)
    np.testing.assert_array_equal(quick.params["weight"], plain.params["weight"])  # same init
    for layer in (plain, quick):
        layer.params["bias"][...] = np.arange(o, dtype=np.float32) - 1
    x = rng.standard_normal((n, c) + hw).astype(np.float32)
    with threads.using(workers):
        y = quick.forward(x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = quick.backward(dy)
    y_plain = plain.forward(x)
    dx_plain = plain.backward(dy)
    rounding_close(y, y_plain, "y")
    rounding_close(dx, dx_plain, "dx")
    for key in ("weight", "bias"):
        rounding_close(quick.grads[key], plain.grads[key], f"d{key}")


@pytest.mark.parametrize("hw", [(12, 16), (13, 11), (4, 6), (9, 2)])
@pytest.mark.parametrize("first", [True, False])                 # the polyphase layout, or flat
def test_conv_pool_relu_equals_the_three_textbook_layers(hw, first):
    """ConvPoolReLU = nn.Conv2d -> nn.MaxPool2d(2) -> nn.ReLU: the pooled output bit for bit where
    the conv's sums agree (integers), its gradients to rounding; odd sizes drop a row or column."""
    rng = np.random.default_rng(1)
    fused = fast.ConvPoolReLU(3, 4, 3, padding=1, rng=2, need_input_grad=not first, pool=2)
    conv, pool, relu = nn.Conv2d(3, 4, 3, padding=1, rng=2), nn.MaxPool2d(2), nn.ReLU()
    weight = rng.integers(-2, 3, conv.params["weight"].shape)
    for layer in (fused.conv, conv):
        layer.params["weight"][...] = weight
        layer.params["bias"][...] = [0.0, 1.0, -1.0, 0.5]
    x = rng.integers(-3, 4, (2, 3) + hw).astype(np.float32)        # whole numbers: many ties
    y = fused.forward(x)
    y_plain = relu.forward(pool.forward(conv.forward(x)))
    np.testing.assert_array_equal(y, y_plain)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = fused.backward(dy)
    dx_plain = conv.backward(pool.backward(relu.backward(dy)))
    if first:
        assert dx is None                                           # the image: no gradient
    else:
        rounding_close(dx, dx_plain, "dx")
    for key in ("weight", "bias"):
        rounding_close(fused.grads[key], conv.grads[key], f"d{key}")


@pytest.mark.parametrize("k, s, hw", [(2, 2, (8, 8)), (2, 2, (7, 9)), (3, 2, (9, 8)), (3, 1, (5, 5)),
                                      (2, 3, (8, 10))])
@pytest.mark.parametrize("workers", [1, 3])
def test_fast_relu_and_pool_equal_the_textbook_bit_for_bit(k, s, hw, workers, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_SIZE", 64)                   # several blocks
    rng = np.random.default_rng(2)
    x = rng.integers(-2, 3, (2, 5) + hw).astype(np.float32)         # ties and zeros
    with threads.using(workers):
        pool, relu = fast.MaxPool2d(k, s), fast.ReLU()
        y = relu.forward(pool.forward(x))
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = pool.backward(relu.backward(dy))
    tpool, trelu = nn.MaxPool2d(k, s), nn.ReLU()
    np.testing.assert_array_equal(y, trelu.forward(tpool.forward(x)))
    np.testing.assert_array_equal(dx, tpool.backward(trelu.backward(dy)))


def test_fast_backbone_has_the_textbook_names_and_initial_weights():
    from frcnn_scratch.model import backbone
    channels = (4, 8, 8, 16)
    plain, quick = backbone(channels, np.random.default_rng(3)), fast.backbone(channels,
                                                                             np.random.default_rng(3))
    assert list(plain.params) == list(quick.params) == [
        "0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias", "9.weight", "9.bias"]
    for name in plain.params:
        np.testing.assert_array_equal(plain.params[name], quick.params[name], err_msg=name)
    x = np.random.default_rng(4).random((1, 3, 24, 40)).astype(np.float32)
    rounding_close(quick.forward(x), plain.forward(x), "backbone output")


# ---- the whole model -----------------------------------------------------------------------------

def test_fast_and_textbook_models_agree_at_480x640():
    """One training step (the four losses and every gradient) and one prediction of the default
    model at 480 x 640, fast against textbook: equal to float32 rounding.  The same random draws
    come in the same order, so both sample the same anchors and RoIs."""
    sample = sample_at(480, 640, seed=1)
    results = {}
    for is_fast in (True, False):
        model = FasterRCNN(Config(), fast=is_fast)
        losses = model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=3)
        grads = {k: v.copy() for k, v in model.grads().items()}
        results[is_fast] = (losses, grads, model.predict(sample["image"]),
                            dict(model.feature_gradients))
    (l_fast, g_fast, d_fast, f_fast), (l_plain, g_plain, d_plain, f_plain) = results[True], \
        results[False]
    assert l_fast == pytest.approx(l_plain, rel=1e-5, abs=1e-7)
    assert f_fast == pytest.approx(f_plain, rel=1e-5)
    assert set(g_fast) == set(g_plain)
    for name in g_plain:
        rounding_close(g_fast[name], g_plain[name], name)
    assert len(d_fast["boxes"]) == len(d_plain["boxes"]) > 0
    np.testing.assert_array_equal(d_fast["labels"], d_plain["labels"])
    np.testing.assert_allclose(d_fast["boxes"], d_plain["boxes"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(d_fast["scores"], d_plain["scores"], rtol=0, atol=1e-5)


def test_a_checkpoint_of_one_loads_into_the_other(tmp_path):
    path = tmp_path / "m.npz"
    quick = FasterRCNN(tiny_config(seed=5))
    sample = tiny_sample(seed=1)
    quick.loss_and_grads(sample["image"], sample["boxes"], sample["labels"], rng=0)
    quick.save(path)
    plain = FasterRCNN.load(path, fast=False)
    assert not plain.fast and isinstance(plain.backbone[0], nn.Conv2d)
    for name, value in quick.params().items():
        np.testing.assert_array_equal(plain.params()[name], value, err_msg=name)
    a, b = quick.predict(sample["image"]), plain.predict(sample["image"])
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("fast_model", [True, False])
def test_the_textbook_and_fast_models_train_alike(fast_model):
    """A few SGD steps move both models the same way (to rounding)."""
    from frcnn_scratch.config import TrainConfig
    from frcnn_scratch.train import Trainer
    samples = [tiny_sample(seed=i) for i in range(3)]
    models = [FasterRCNN(tiny_config(), fast=f) for f in (True, False)]
    histories = []
    for model in models:
        trainer = Trainer(model, samples, TrainConfig(iterations=4, warmup=2, seed=1))
        histories.append([trainer.step()["loss"] for _ in range(4)])
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-4)


# ---- pieces moved from the layers' tests -----------------------------------------------------------

def test_ones_below_puts_a_row_of_ones_under_the_columns_and_carries_the_bias():
    """[W2 | b] @ [cols; 1] = W2 @ cols + b, and dy @ [cols; 1]^T = [dy @ cols^T | sum of dy]."""
    cols = np.array([[1, 2, 3], [4, 5, 6]], np.float32)               # K = 2 rows, q = 3 pixels
    buffer = np.full(12, np.nan, np.float32)                          # room for more: untouched
    buffer[:6] = cols.ravel()
    got = ones_below(buffer, 2, 3)
    np.testing.assert_array_equal(got, [[1, 2, 3], [4, 5, 6], [1, 1, 1]])
    assert np.shares_memory(got, buffer) and np.isnan(buffer[9:]).all()
    w2b = np.array([[1, -1, 10]], np.float32)                         # W2 = [1, -1], b = 10
    np.testing.assert_array_equal(w2b @ got, [[7, 7, 7]])             # 1*1 - 4 + 10, ...
    dy = np.array([[1, 0, 2]], np.float32)
    np.testing.assert_array_equal(dy @ got.T, [[7, 16, 3]])           # dW2 = [7, 16], db = 3


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_conv2d_bias_is_added_once_on_every_path(k, stride, padding):
    """The bias rides in the product (a row of ones), except for a 1 x 1 kernel in the flat
    layout, whose columns are x itself and get it added on their own; on every path a zero
    input gives y = b and dy = 1 gives db = the number of outputs."""
    for band_bytes in (fast.BAND_BYTES, 200, None):                  # flat, many bands, one band
        conv = fast.Conv2d(2, 3, k, stride=stride, padding=padding, rng=0, band_bytes=band_bytes)
        conv.params["bias"][:] = [1.5, -2.0, 0.25]
        y = conv.forward(np.zeros((2, 2, 6, 5), np.float32))
        np.testing.assert_array_equal(y, np.broadcast_to(conv.params["bias"][None, :, None, None],
                                                         y.shape))
        conv.backward(np.ones(y.shape, np.float32))
        np.testing.assert_array_equal(conv.grads["bias"], np.full(3, y[:, 0].size, np.float32))
        np.testing.assert_array_equal(conv.grads["weight"], 0)       # x = 0: no weight gradient


def test_first_conv_without_input_grad_gives_identical_param_grads():
    """need_input_grad=False skips dx only: the same weight and bias gradients, bit for bit, and
    fast.Sequential stops there (the layers before it would otherwise see dy=None)."""
    rng = np.random.default_rng(10)

    def net(need_input_grad):
        r = np.random.default_rng(11)
        return fast.Sequential(fast.Conv2d(3, 4, 3, padding=1, rng=r,
                                           need_input_grad=need_input_grad),
                               fast.ReLU(), fast.MaxPool2d(), fast.Conv2d(4, 2, 3, stride=2, rng=r))
    full, skip = net(True), net(False)
    x = rng.standard_normal((2, 3, 9, 10)).astype(np.float32)
    dy = rng.standard_normal(full.forward(x).shape).astype(np.float32)
    skip.forward(x)
    assert full.backward(dy).shape == x.shape
    assert skip.backward(dy) is None
    assert list(skip.grads) == list(full.grads)
    for k in full.grads:
        np.testing.assert_array_equal(skip.grads[k], full.grads[k], err_msg=k)
        assert skip.grads[k].dtype == full.grads[k].dtype == np.float32, k


def test_sequential_refuses_to_skip_input_grad_before_trainable_layers():
    rng = np.random.default_rng(12)
    net = fast.Sequential(fast.Conv2d(1, 2, 1, rng=rng),
                          fast.Conv2d(2, 2, 1, rng=rng, need_input_grad=False))
    y = net.forward(np.ones((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"layers\[1\] returned no input gradient"):
        net.backward(np.ones_like(y))


def test_first_conv_skips_the_image_gradient_and_the_grads_stay():
    """The backbone's first conv computes no dL/d(image); flipping it back on must change nothing
    but the rounding: the first conv then leaves the polyphase layout for the flat one, whose
    products add the same terms in another order."""
    model = FasterRCNN(tiny_config())
    first = model.backbone[0].conv
    assert first.need_input_grad is False
    convs = [layer.conv if isinstance(layer, fast.ConvPoolReLU) else layer
             for layer in model.backbone if isinstance(layer, (fast.ConvPoolReLU, fast.Conv2d))]
    assert all(conv.need_input_grad for conv in convs[1:])
    s = tiny_sample(seed=2)
    skipped = model.loss_and_grads(s["image"], s["boxes"], s["labels"], np.random.default_rng(5))
    assert first._cache is None or first._cache[2] == "polyphase"
    g_skipped = {k: v.copy() for k, v in model.grads().items()}
    first.need_input_grad = True
    full = model.loss_and_grads(s["image"], s["boxes"], s["labels"], np.random.default_rng(5))
    assert skipped == pytest.approx(full, rel=1e-5, abs=1e-7)
    for k, v in model.grads().items():
        scale = max(1e-6, float(np.abs(v).max()))
        np.testing.assert_allclose(g_skipped[k], v, rtol=0, atol=1e-5 * scale, err_msg=k)


def test_the_feature_gradients_sum_and_norms_match_numpy_on_any_number_of_threads():
    """The two heads' gradients of the feature map, added and measured in blocks of channels:
    the sum is a + b exactly, the norms are np.linalg.norm's (float64), and the same bit for bit
    on one and on three threads."""
    from frcnn_scratch.fast.step import sum_and_norms
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((1, 19, 7, 9)).astype(np.float32) for _ in range(2))
    results = []
    for n in (1, 3):
        with threads.using(n):
            results.append(sum_and_norms(a, b[:, :, ::-1]))      # a strided view too
    for total, norms in results:
        np.testing.assert_array_equal(total, a + b[:, :, ::-1])
        np.testing.assert_allclose(norms, [np.linalg.norm(a.astype(np.float64)),
                                           np.linalg.norm(b.astype(np.float64))], rtol=1e-12)
    assert results[0][1] == results[1][1]
    total, norms = sum_and_norms(np.zeros((1, 4, 0, 3), np.float32), np.zeros((1, 4, 0, 3)))
    assert total.shape == (1, 4, 0, 3) and norms == [0.0, 0.0]


# ---- helpers of the sections below -----------------------------------------------------------------

SMALL = dict(channels=(4, 8, 8), anchor_scales=(2.0, 4.0), anchor_ratios=(1.0,), rpn_channels=8,
             fc_hidden=16, pooled_size=3, rpn_post_nms_test=10)      # a small network, real sizes


def set_bands(model, band_bytes):
    """Give every convolution of a fast model (backbone, fused or not, and RPN) this band size;
    returns the model."""
    for layer in list(model.backbone.layers) + list(model.rpn.layers.values()):
        if isinstance(layer, fast.ConvPoolReLU):
            layer = layer.conv
        if isinstance(layer, fast.Conv2d):
            layer.band_bytes = band_bytes
    return model


def _conv_pair(c, o, k, s, p, need_input_grad, band_bytes):
    """A fast.Conv2d in bands of band_bytes and its twin in one band (the whole image's im2col),
    with the same initial weights."""
    banded = fast.Conv2d(c, o, k, stride=s, padding=p, rng=1, need_input_grad=need_input_grad,
                         band_bytes=band_bytes)
    whole = fast.Conv2d(c, o, k, stride=s, padding=p, rng=1, need_input_grad=need_input_grad,
                        band_bytes=None)
    return banded, whole


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


# ---- the convolution in bands (fast.Conv2d) ----------------------------------------------------------

@pytest.mark.parametrize("c,o,k,s,p,hw,n", [
    (3, 8, 3, 1, 1, (37, 29), 1), (5, 4, 3, 2, 1, (31, 40), 2), (4, 6, 5, 1, 2, (23, 17), 1),
    (6, 3, 1, 1, 0, (19, 21), 2), (2, 5, 3, 3, 0, (26, 26), 1), (3, 4, (3, 5), (2, 1), (1, 2), (20, 18), 1),
    (3, 4, 2, 3, 0, (25, 23), 1),                                   # stride > kernel: rows no window reads
    (3, 4, (3, 5), 1, (1, 2), (20, 18), 1), (4, 5, 3, 1, 0, (15, 13), 2)])   # flat, no padding too
@pytest.mark.parametrize("workers", [1, 3])
def test_banded_conv_equals_the_whole_image_im2col(c, o, k, s, p, hw, n, workers):
    """Many small bands (a few rows each, the last one short), run on 1 or 3 threads, against
    one band holding the whole image (band_bytes=None: the whole image's im2col): y, dx, dW and
    db agree to float32 rounding."""
    rng = np.random.default_rng(20)
    banded, whole = _conv_pair(c, o, k, s, p, True, band_bytes=600)
    x = rng.standard_normal((n, c) + hw).astype(np.float32)
    with threads.using(workers):
        y = banded.forward(x)
    assert len(banded.bands(y.shape[2], y.shape[3], 4)) >= 3, "the case must have several bands"
    y_ref = whole.forward(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(y.shape).astype(np.float32)
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
    conv = fast.Conv2d(c, 2, k, padding=k // 2, rng=0, band_bytes=band_bytes)
    bands = conv.bands(ho, wo, 4)
    assert bands[0][0] == 0 and bands[-1][1] == ho
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    rows = [r1 - r0 for r0, r1 in bands]
    assert all(r >= k for r in rows[:-1]) and rows[-1] >= 1
    if band_bytes is not None:
        assert all(r <= k or c * k * k * wo * 4 * r <= band_bytes for r in rows)
    if len(bands) > 1 and rows[0] > k:
        assert len(bands) % 2 == 0 and max(rows) - min(rows) <= 1, rows
    if ho == 75:                                              # the backward's: 8 of 9 or 10
        assert sorted({r1 - r0 for r0, r1 in conv.bands(ho, wo, 4, groups=4)}) == [9, 10]
    windows = conv.bands(ho, wo, 4, multiple=2)               # forward_pooled's: whole windows
    assert windows[0][0] == 0 and windows[-1][1] == ho
    assert all(r0 % 2 == 0 for r0, _ in windows) and all(r1 % 2 == 0 for _, r1 in windows[:-1])
    assert all(r1 - r0 >= k for r0, r1 in windows[:-1])
    assert (len(bands) == 1) == (band_bytes is None or c * k * k * wo * 4 * ho <= band_bytes)
    fours = conv.bands(ho, wo, 4, groups=4)                   # the backward's: two even rounds
    assert fours[0][0] == 0 and fours[-1][1] == ho and len(fours) >= len(bands)
    assert all(a[1] == b[0] for a, b in zip(fours, fours[1:]))
    if len(fours) > 1 and fours[0][1] > k:
        assert len(fours) % 4 == 0, fours


@pytest.mark.parametrize("need_input_grad", [True, False])
def test_banded_conv_backward_is_bit_identical_on_any_number_of_threads(need_input_grad):
    """The backward's two rounds (even bands, then odd ones; in this flat layout each band's two
    parts run together), two images of an odd number of forward bands each: y, dx, dW and db
    equal bit for bit on 1, 2, 4 and 7 threads."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 5, 27, 23)).astype(np.float32)
    dy = None
    out = {}
    for workers in (1, 2, 4, 7):
        conv = fast.Conv2d(5, 6, 3, padding=1, rng=2, need_input_grad=need_input_grad,
                           band_bytes=2000)
        with threads.using(workers):
            y = conv.forward(x)
            assert len(conv.bands(y.shape[2], y.shape[3], 4)) % 2 == 1 and y.shape[2] > 9
            dy = rng.standard_normal(y.shape).astype(np.float32) if dy is None else dy
            dx = conv.backward(dy)
        out[workers] = (y, dx, conv.grads["weight"], conv.grads["bias"])
    for workers in (2, 4, 7):
        for a, b in zip(out[1], out[workers]):
            if a is None:
                assert b is None
            else:
                np.testing.assert_array_equal(a, b)


def test_a_conv_of_one_band_runs_its_two_backward_parts_in_one_region(monkeypatch):
    """One band of one image has no neighbour: its weight part and input part run side by side in
    one parallel region (not one after the other, in two); the results are those of one thread."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((1, 4, 9, 11)).astype(np.float32)
    dy = rng.standard_normal((1, 5, 9, 11)).astype(np.float32)
    out = {}
    for workers in (1, 2):
        conv = fast.Conv2d(4, 5, 3, padding=1, rng=3, band_bytes=None)
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
    x = np.random.default_rng(23).standard_normal((1, 4, 10, 11)).astype(np.float32)
    monkeypatch.setattr(conv_module, "SPLIT_BYTES", 4 * 9 * 10 * 11 * 4)   # this layer's columns
    out = {}
    for workers in (1, 2):
        conv = fast.Conv2d(4, 5, 3, padding=1, rng=3, band_bytes=None)
        with threads.using(workers), _regions_counted(monkeypatch) as regions:
            out[workers] = conv.forward(x)
        assert regions[-1] == 2, regions
    np.testing.assert_array_equal(out[1], out[2])
    monkeypatch.setattr(conv_module, "SPLIT_BYTES", 1 << 40)
    conv = fast.Conv2d(4, 5, 3, padding=1, rng=3, band_bytes=None)
    np.testing.assert_allclose(out[1], conv.forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("workers", [1, 2])
def test_flat_conv_never_reads_uninitialised_memory(workers, monkeypatch):
    """Fresh arrays and the threads' scratch buffers full of NaN: the junk columns' zero gradient
    must keep it out of dx, dW and db (0 * NaN is NaN), and the zeros after each flat channel out
    of the junk of y's last row, so that the array behind the returned view is finite too."""
    rng = np.random.default_rng(24)
    x = rng.standard_normal((2, 3, 13, 10)).astype(np.float32)
    whole = fast.Conv2d(3, 4, 3, padding=1, rng=5, band_bytes=None)
    y_ref = whole.forward(x)
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    dx_ref = whole.backward(dy)
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda shape, dtype=float, *a, **k:
                        np.full(shape, np.nan, dtype=dtype))
    with threads.using(workers):
        threads.parallel(lambda slot: [threads.scratch(1 << 16, np.float32, slot=slot).fill(np.nan)
                                       for slot in ("columns", "dy")], range(workers))
        conv = fast.Conv2d(3, 4, 3, padding=1, rng=5, band_bytes=600)
        y = conv.forward(x)
        dx = conv.backward(dy)
    monkeypatch.setattr(np, "empty", real_empty)
    assert conv._flat() and len(conv.bands(13, 10, 4)) >= 3
    assert y.base is not None and y.base.shape == (2, 4, 13, 12) and np.isfinite(y.base).all()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):
        np.testing.assert_allclose(conv.grads[name], whole.grads[name], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride,band_bytes", [(1, 600), (2, 600), (1, None)])
def test_conv_of_an_empty_batch_gives_empty_outputs_and_zero_grads(stride, band_bytes):
    """N = 0 images (flat, strided and one-band forms): y and dx of the right empty shapes, and
    weight and bias gradients of zero, not an error."""
    conv = fast.Conv2d(3, 4, 3, stride=stride, padding=1, rng=0, band_bytes=band_bytes)
    y = conv.forward(np.zeros((0, 3, 9, 8), np.float32))
    assert y.shape == (0, 4, (9 + 2 - 3) // stride + 1, (8 + 2 - 3) // stride + 1)
    dx = conv.backward(np.zeros(y.shape, np.float32))
    assert dx.shape == (0, 3, 9, 8)
    assert not conv.grads["weight"].any() and not conv.grads["bias"].any()
    assert conv.grads["weight"].shape == (4, 3, 3, 3)


def test_first_layer_banded_skips_dx_and_keeps_param_grads():
    rng = np.random.default_rng(25)
    banded, whole = _conv_pair(3, 4, 3, 1, 1, False, band_bytes=500)
    x = rng.standard_normal((1, 3, 30, 22)).astype(np.float32)
    dy = rng.standard_normal(banded.forward(x).shape).astype(np.float32)
    whole.forward(x)
    assert banded.backward(dy) is None and whole.backward(dy) is None
    np.testing.assert_allclose(banded.grads["weight"], whole.grads["weight"], rtol=1e-5, atol=1e-4)


def test_conv_refuses_a_bad_band_size():
    with pytest.raises(ValueError, match="band_bytes"):
        fast.Conv2d(3, 4, 3, band_bytes=0)
    with pytest.raises(ValueError, match="band_bytes"):
        fast.ConvPoolReLU(3, 4, 3, band_bytes=-1)


# ---- the columns' layouts (fast.columns) -------------------------------------------------------------

@pytest.mark.parametrize("row0,row1", [(2, 6), (3, 7)])             # inside; the last band
def test_flat_columns_are_im2cols_and_their_adjoint_adds_them_back(row0, row1):
    """flat_im2col's columns, junk (j >= Wo) left out, are band_im2col's, in the same order, and
    those are the textbook im2col's columns of the band's rows; flat_col2im_add is its adjoint:
    <cols(x), D> = <x, col2im(D)> for D zero in the junk.  The last band's junk reaches the zeros
    after the image, which its zero gradient leaves 0."""
    rng = np.random.default_rng(26)
    c, kh, kw, h, w = 3, 3, 4, 9, 11
    hp, wp = h, w                                                    # already padded
    ho, wo = hp - kh + 1, wp - kw + 1
    image = rng.standard_normal((c, hp, wp)).astype(np.float64)
    flat = np.concatenate([image.reshape(c, -1), np.zeros((c, kw - 1))], axis=1)
    cols = columns.flat_im2col(flat, kh, kw, wp, row0, row1)        # (K, bh * Wp)
    assert cols.shape == (c * kh * kw, (row1 - row0) * wp)
    kept = cols.reshape(-1, row1 - row0, wp)[:, :, :wo].reshape(c * kh * kw, -1)
    banded = columns.band_im2col(image, kh, kw, 1, 1, row0, row1)
    np.testing.assert_array_equal(kept, banded)
    textbook = nn.im2col(image[None], kh, kw, 1, 1)[0].reshape(-1, ho, wo)[:, row0:row1]
    np.testing.assert_array_equal(banded, textbook.reshape(c * kh * kw, -1))
    d = rng.standard_normal(cols.shape)
    d.reshape(-1, row1 - row0, wp)[:, :, wo:] = 0                    # the junk's gradient
    back = np.zeros_like(flat)
    columns.flat_col2im_add(back, d, kh, kw, wp, row0, row1)
    np.testing.assert_allclose(np.sum(cols * d), np.sum(flat * back), rtol=1e-12)
    assert row1 <= ho and not back[:, hp * wp:].any()                # nothing into the tail
    one = columns.flat_im2col(flat, 1, 1, wp, row0, row1)            # a 1x1 kernel: a view
    assert np.shares_memory(one, flat) and one.shape == (c, (row1 - row0) * wp)


@pytest.mark.parametrize("hw", [(6, 8), (7, 9), (2, 3), (5, 2)])
def test_polyphase_planes_and_columns_are_the_padded_image_and_im2col_at_each_phase(hw):
    """polyphase_split: plane (p, q) holds the zero-padded image's rows 2a + p and columns 2b + q,
    zeros past the image and one zero after the last row; polyphase_im2col: the columns of phase
    (pi, pj) of window (a, b) are the textbook im2col's columns of output pixel (2a + pi, 2b + pj)."""
    h, w = hw
    x = np.random.default_rng(27).standard_normal((3, h, w)).astype(np.float32)
    hq, wq = (h + 3) // 2, (w + 3) // 2
    planes = np.full((2, 2, 3, hq * wq + 1), np.nan, np.float32)   # every value written
    columns.polyphase_split(x, planes, 1, 1)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    for p in range(2):
        for q in range(2):
            want = np.zeros((3, hq, wq), np.float32)
            part = xp[:, p::2, q::2]
            want[:, :part.shape[1], :part.shape[2]] = part
            np.testing.assert_array_equal(planes[p, q, :, :-1].reshape(3, hq, wq), want)
    assert (planes[..., -1] == 0).all()
    with pytest.raises(ValueError, match="polyphase planes: expected shape"):
        columns.polyphase_split(x, planes[..., :-1], 1, 1)
    ha, wa = h // 2, w // 2
    if ha == 0 or wa == 0:
        return
    cols = columns.polyphase_im2col(planes, 3, 3, wq, 0, ha).reshape(27, 2, 2, ha, wq)[..., :wa]
    full = nn.im2col(xp[None], 3, 3, 1, 1)[0].reshape(27, h, w)
    for pi in range(2):
        for pj in range(2):
            np.testing.assert_array_equal(cols[:, pi, pj], full[:, pi:2 * ha:2, pj:2 * wa:2])
    band = columns.polyphase_im2col(planes, 3, 3, wq, ha - 1, ha).reshape(27, 2, 2, 1, wq)
    np.testing.assert_array_equal(band, columns.polyphase_im2col(planes, 3, 3, wq, 0, ha).reshape(
        27, 2, 2, ha, wq)[:, :, :, ha - 1:])                        # a band: its rows alone


@pytest.mark.parametrize("o,k,p", [(16, 28, 38520), (16, 28, 5000), (16, 28, 2047),
                                   (3, 4, 10), (32, 33, 4096), (16, 28, 1024)])
def test_small_weight_gradients_in_runs_of_pixels_equal_the_plain_product(o, k, p):
    """dW of a small layer (O * K <= SMALL_PRODUCT_OUTPUTS) over a long band is a batch of
    products over runs of about WEIGHT_GRAD_PIXELS pixels, added in order, then the pixels the
    equal runs leave; it equals dy @ cols.T to float32 rounding.  A larger layer, or a band of
    fewer than two runs, is the plain product, taken as (cols @ dy^T)^T."""
    rng = np.random.default_rng(28)
    dy = rng.standard_normal((o, p)).astype(np.float32)
    cols = rng.standard_normal((k, p)).astype(np.float32)
    got = columns.weight_grad(dy, cols)
    assert got.shape == (o, k) and got.dtype == np.float32
    exact = dy.astype(np.float64) @ cols.T.astype(np.float64)
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5 * np.sqrt(p))
    runs = p // columns.WEIGHT_GRAD_PIXELS
    if o * k > columns.SMALL_PRODUCT_OUTPUTS or runs < 2:
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
    np.testing.assert_array_equal(columns.weight_grad(wide_dy[:, :p], cols), got)


# ---- max pooling and ReLU in blocks (fast.blocks) ----------------------------------------------------

def test_maxpool_keeps_one_byte_per_window_not_its_input():
    pool = fast.MaxPool2d(2, 2)
    x = np.random.default_rng(29).standard_normal((1, 3, 8, 8)).astype(np.float32)
    pool.forward(x)
    argmax, shape = pool._cache
    assert shape == x.shape and argmax.dtype == np.uint8 and argmax.shape == (1, 3, 4, 4)


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (3, 3)])
def test_pool_and_relu_are_the_same_in_blocks_and_on_any_number_of_threads(k, s, monkeypatch):
    """Split into blocks of channels (BLOCK_SIZE), on one thread or three, or done as one block:
    equal bit for bit, ties included."""
    rng = np.random.default_rng(30)
    x = np.round(rng.standard_normal((1, 8, 400, 390)), 1).astype(np.float32)   # many exact ties
    assert x.size >= 3 * blocks.BLOCK_SIZE                        # three blocks or more
    out = {}
    for name, workers, block in [("blocks", 1, blocks.BLOCK_SIZE), ("threads", 3, blocks.BLOCK_SIZE),
                                 ("whole", 1, x.size + 1)]:
        monkeypatch.setattr(blocks, "BLOCK_SIZE", block)
        pool, relu = fast.MaxPool2d(k, s), fast.ReLU()
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
    -0.0, NaN and both infinities included, in place and into a strided block; above ZEROS_MAX
    values it is np.maximum(x, 0) itself."""
    monkeypatch.setattr(blocks, "_zero_buffers", {})               # none made before this test
    if large:
        monkeypatch.setattr(blocks, "ZEROS_MAX", 100)
    values = np.array([-0.0, 0.0, -1.5, 2.0, np.nan, np.inf, -np.inf, 1e-45, -1e-45], np.float32)
    x = np.tile(values, (2, 3, 70)).reshape(2, 3, 30, 21)
    want = np.maximum(x, np.float32(0))
    got = blocks.relu_into(x, np.empty_like(x))
    assert got.tobytes() == want.tobytes()
    block = x[:, 1:, ::2, 3:]                                       # a strided block, in place
    want_block = np.maximum(block, np.float32(0))
    blocks.relu_into(block, block)
    assert block.tobytes() == want_block.tobytes()
    assert x[:, 0].tobytes() == np.tile(values, (2, 3, 70)).reshape(2, 3, 30, 21)[:, 0].tobytes()
    if large:                                                      # the scalar: no buffer for it
        assert blocks._zero_buffers == {}
    else:                                                          # the shared zeros: read-only
        assert not blocks._zero_buffers[x.dtype].flags.writeable


def test_inplace_relu_writes_over_its_input_and_gradient():
    relu = fast.ReLU(inplace=True)
    x = np.array([[-1.0, 2.0, 0.0]], np.float32)
    y = relu.forward(x)
    assert y is x and x.tolist() == [[0.0, 2.0, 0.0]]
    dy = np.array([[5.0, 6.0, 7.0]], np.float32)
    dx = relu.backward(dy)
    assert dx is dy and dy.tolist() == [[0.0, 6.0, 0.0]]


# ---- conv -> pool -> ReLU fused (ConvPoolReLU, Conv2d.forward_pooled, PooledGradient) --------------

def test_pool_before_relu_is_vggs_relu_before_pool_bit_for_bit():
    """The fast backbone pools before its ReLU (a quarter of the values to rectify).  Against the
    textbook's VGG order, conv -> ReLU -> pool, with the same weights: the output and every
    weight gradient are equal bit for bit, on windows with ties, all-negative and zero maxima.
    (The first conv pooled in the polyphase layout, and every fast conv with its bias in the
    product, sum in another order than the textbook's: with whole numbers for weights, image and
    gradient every sum is exact, and the order cannot show.)  Then the input gradient: a fused
    ConvPoolReLU against the same fast conv followed by ReLU and pool, bit for bit."""
    from frcnn_scratch.model import backbone
    rng = np.random.default_rng(31)
    ours = fast.backbone((4, 6, 5), rng=np.random.default_rng(0))
    vgg = backbone((4, 6, 5), rng=np.random.default_rng(0))
    assert [type(layer).__name__ for layer in ours] == ["ConvPoolReLU", "ConvPoolReLU", "Conv2d",
                                                        "ReLU"]
    assert [type(layer).__name__ for layer in vgg] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d",
                                                       "ReLU", "MaxPool2d", "Conv2d", "ReLU"]
    assert list(ours.params) == list(vgg.params)
    for net in (ours, vgg):
        for name, value in net.params.items():                    # whole numbers in -1..1
            value[...] = np.random.default_rng(value.size).integers(-1, 2, value.shape)
    x = rng.integers(-1, 2, (1, 3, 36, 44)).astype(np.float32)
    y, y_vgg = ours.forward(x), vgg.forward(x)
    assert ours.layers[0].conv._cache[2] == "polyphase" and ours.layers[1].conv._cache[2] == "flat"
    np.testing.assert_array_equal(y, y_vgg)
    dy = rng.integers(-1, 2, y.shape).astype(np.float32)
    ours.backward(dy.copy()), vgg.backward(dy.copy())
    assert list(ours.grads) == list(vgg.grads)
    for name, g in vgg.grads.items():
        np.testing.assert_array_equal(ours.grads[name], g, err_msg=name)
    fused = fast.ConvPoolReLU(6, 3, 3, padding=1, rng=2)          # and the input gradient itself
    stack_vgg = fast.Sequential(fast.Conv2d(6, 3, 3, padding=1, rng=2), fast.ReLU(),
                                fast.MaxPool2d(2))
    x = np.round(rng.standard_normal((1, 6, 10, 12)), 1).astype(np.float32)
    y = fused.forward(x)
    np.testing.assert_array_equal(y, stack_vgg.forward(x))
    assert (y == 0).any() and (y > 0).any()
    dy = rng.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_array_equal(fused.backward(dy.copy()), stack_vgg.backward(dy.copy()))


@pytest.mark.parametrize("shape, band_bytes", [((2, 3, 12, 16), fast.BAND_BYTES),
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
        monkeypatch.setattr(blocks, "BAND_POOL_SIZE", 64)          # bands pooled in blocks
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(-2, 3, shape).astype(np.float32)
    convs = [fast.Conv2d(3, 5, 3, padding=1, rng=0, need_input_grad=False, band_bytes=band_bytes),
             fast.Conv2d(3, 5, 3, padding=1, rng=0, need_input_grad=True, band_bytes=band_bytes)]
    for conv in convs:
        conv.params["weight"] = rng.integers(-2, 3, conv.params["weight"].shape).astype(np.float32)
        conv.params["bias"] = np.arange(5, dtype=np.float32) - 2
    convs[1].params = {k: v.copy() for k, v in convs[0].params.items()}
    results = []
    for workers in (1, 3):
        for conv in convs:
            pool = fast.MaxPool2d(2)
            with threads.using(workers):
                y = conv.forward_pooled(x, pool, relu)
                argmax = pool._cache[0].copy()
                dy = rng.integers(-2, 3, y.shape).astype(np.float32) if not results else \
                    results[0][-1]
                conv.backward(pool.pooled_gradient(dy))
                grads = {k: v.copy() for k, v in conv.grads.items()}
                conv.forward_pooled(x, pool, relu)
                conv.backward(np.asarray(pool.pooled_gradient(dy)))   # dy as a plain array
            for name, g in conv.grads.items():
                np.testing.assert_array_equal(g, grads[name], err_msg=name)
            results.append((conv._cache[2], y, argmax, grads, dy))
    assert [r[0] for r in results] == ["polyphase", "flat"] * 2
    if band_bytes == 900:
        assert len(convs[0].bands(shape[2] // 2, 2 * shape[3], 4)) >= 3, "several bands"
    for layout, y, argmax, grads, dy in results[1:]:
        np.testing.assert_array_equal(y, results[0][1])
        np.testing.assert_array_equal(argmax, results[0][2])
        for name in grads:
            np.testing.assert_array_equal(grads[name], results[0][3][name], err_msg=name)
    assert (results[0][1] == (0 if relu else results[0][1].max())).any()   # zero maxima (ReLU)


def test_a_pooled_gradients_planes_are_the_phases_of_its_dx():
    """PooledGradient.planes: phase (u, v) of window rows [row0, row1) of the unpooled dx, in
    rows Wq wide whose values past Wo // 2 are 0."""
    rng = np.random.default_rng(32)
    x = rng.integers(-2, 3, (2, 3, 10, 14)).astype(np.float32)      # ties
    pool = fast.MaxPool2d(2)
    y = pool.forward(x)
    pooled = pool.pooled_gradient(rng.standard_normal(y.shape).astype(np.float32))
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
    MaxPool2d.backward's dx (the fast pool's and the textbook's): as an array, and band by band
    for any band of rows, at a width past W (0 there, as the flat layout's junk needs); odd sizes
    (rows and columns that no window covers) and ties included.  A pool whose windows do not
    tile gives backward's array itself."""
    rng = np.random.default_rng(33)
    pool, textbook = fast.MaxPool2d(k, k), nn.MaxPool2d(k, k)
    x = np.round(rng.standard_normal((2, 3) + hw), 1).astype(np.float32)   # many exact ties
    y = pool.forward(x)
    np.testing.assert_array_equal(y, textbook.forward(x))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    pooled = pool.pooled_gradient(dy)
    want = pool.backward(dy)
    np.testing.assert_array_equal(want, textbook.backward(dy))
    assert isinstance(pooled, fast.PooledGradient) and pooled.shape == x.shape
    np.testing.assert_array_equal(np.asarray(pooled), want)
    h, w = hw
    for i in range(2):
        for row0 in range(h):
            for row1 in range(row0 + 1, h + 1):
                out = np.full((3, row1 - row0, w + 3), np.nan, np.float32)
                assert pooled.rows(i, row0, row1, out) is out
                np.testing.assert_array_equal(out[:, :, :w], want[i, :, row0:row1])
                assert not out[:, :, w:].any()
    overlapping = fast.MaxPool2d(3, 2)                                 # windows that do not tile:
    y = overlapping.forward(x)                                         # the plain array
    dy = rng.standard_normal(y.shape).astype(np.float32)
    got = overlapping.pooled_gradient(dy)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, overlapping.backward(dy))


@pytest.mark.parametrize("stride, need_input_grad, band_bytes", [
    (1, True, 600), (1, False, 600), (1, True, None), (2, True, 600), (1, True, fast.BAND_BYTES)])
@pytest.mark.parametrize("workers", [1, 3])
def test_conv_backward_of_a_pooled_gradient_equals_that_of_its_array(stride, need_input_grad,
                                                                    band_bytes, workers):
    """A Conv2d under a max pool unpools the pool's PooledGradient band by band: the same dx,
    dW and db bit for bit as from the full-size array, in the flat layout and in im2col's, with
    and without dx, in one band or many, on any number of threads."""
    rng = np.random.default_rng(34)
    conv, twin = (fast.Conv2d(3, 4, 3, stride=stride, padding=1, rng=0, band_bytes=band_bytes,
                              need_input_grad=need_input_grad) for _ in range(2))
    x = rng.standard_normal((2, 3, 37, 23)).astype(np.float32)
    pool = fast.MaxPool2d(2)
    y = conv.forward(x)
    twin.forward(x)
    pool.forward(y)
    pooled = pool.pooled_gradient(rng.standard_normal(pool._cache[0].shape).astype(np.float32))
    assert band_bytes != 600 or len(conv.bands(*y.shape[2:], 4)) >= 3, "several bands"
    with threads.using(workers):
        dx, dx_twin = conv.backward(pooled), twin.backward(np.asarray(pooled))
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(conv.grads[name], twin.grads[name], err_msg=name)
    if need_input_grad:
        np.testing.assert_array_equal(dx, dx_twin)
    else:
        assert dx is None and dx_twin is None
    wrong = fast.PooledGradient(pooled.dy[:1], pooled.argmax[:1], (2, 2), (1,) + y.shape[1:])
    with pytest.raises(ValueError, match=r"expected the forward output's shape"):
        conv.backward(wrong)
    with pytest.raises(RuntimeError, match="before forward"):
        fast.Conv2d(3, 4, 3).backward(pooled)


@pytest.mark.parametrize("stride, band_bytes, k", [
    (1, 600, 2), (1, 10800, 3), (1, None, 2), (2, 600, 2), (1, fast.BAND_BYTES, 2)])
@pytest.mark.parametrize("workers", [1, 3])
def test_a_conv_pooled_band_by_band_equals_the_conv_then_the_pool(stride, band_bytes, k, workers,
                                                                   monkeypatch):
    """Conv2d.forward_pooled (each band of output rows pooled at once, the conv's output never
    stored) gives the pool's output and argmax of the two layers' own forward passes, bit for
    bit: the flat layout and im2col's, bands that end mid-window in the plain layer, rows and
    columns no window covers (odd sizes), a single band split in two, on any number of threads;
    and what each backward pass needs.  A pool whose windows do not tile runs after the conv's
    own forward (the ReLU's gradient, if any, folded into its argmax as the fused pass folds it)."""
    monkeypatch.setattr(conv_module, "SPLIT_BYTES", 1)             # a single band is split too
    monkeypatch.setattr(blocks, "BAND_POOL_SIZE", 200)             # a band pooled in blocks
    conv, twin = (fast.Conv2d(3, 4, 3, stride=stride, padding=1, rng=0, band_bytes=band_bytes)
                  for _ in range(2))
    pool, pool_twin = fast.MaxPool2d(k), fast.MaxPool2d(k)
    rng = np.random.default_rng(35)
    x = np.round(rng.standard_normal((2, 3, 39, 25)), 1).astype(np.float32)   # ties
    with threads.using(workers):
        y = conv.forward_pooled(x, pool)
        y_own_bands = pool_twin.forward(twin.forward(x))
        # The plain forward's bands need not end on whole windows, and a band's product may sum a
        # column in another order when the band has another width (OpenBLAS's AVX2 kernels
        # do): the conv's values agree to float32 rounding.  For the pool's values and argmax,
        # bit for bit, the twin's forward takes the pooled forward's bands.
        np.testing.assert_allclose(y, y_own_bands, rtol=1e-6, atol=1e-6)
        windows = k if pool.tiles() else 1          # (a 3 x 3 pool of stride 2 does not tile)
        forward_bands = lambda ho, wo, size, multiple=1, groups=2: fast.Conv2d.bands(  # noqa
            twin, ho, wo, size, windows if groups == 2 else multiple, groups)
        twin.bands = forward_bands
        y_twin = pool_twin.forward(twin.forward(x))
        del twin.bands                                             # the class's own again
        np.testing.assert_array_equal(y, y_twin)
        np.testing.assert_array_equal(pool._cache[0], pool_twin._cache[0])       # the argmax
        assert pool._cache[1] == pool_twin._cache[1]                              # x's shape
        np.testing.assert_array_equal(conv._cache[0], twin._cache[0])            # the padded x
        if band_bytes in (600, 10800):
            bands = twin.bands(*twin._cache[1][2:], 4)
            assert len(bands) >= 3 and any(r % k for band in bands for r in band), "mid-window"
        with nn.no_grad():
            np.testing.assert_array_equal(conv.forward_pooled(x, pool), y)
        assert pool._cache is None and conv._cache is None
    overlapping = fast.MaxPool2d(3, 2)                                 # windows that do not tile
    np.testing.assert_array_equal(conv.forward_pooled(x, overlapping),
                                  fast.MaxPool2d(3, 2).forward(twin.forward(x)))
    y = conv.forward_pooled(x, overlapping, relu=True)                 # with the ReLU folded in
    pool_twin, relu_twin = fast.MaxPool2d(3, 2), fast.ReLU()
    np.testing.assert_array_equal(y, relu_twin.forward(pool_twin.forward(twin.forward(x))))
    assert (y == 0).any() and (y > 0).any()
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = conv.backward(overlapping.pooled_gradient(dy))
    np.testing.assert_array_equal(dx, twin.backward(pool_twin.backward(relu_twin.backward(dy))))
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(conv.grads[name], twin.grads[name], err_msg=name)


def _pooled_stack():
    """conv -> 2 x 2 max pool -> ReLU as one fused layer, then conv -> ReLU."""
    return fast.Sequential(fast.ConvPoolReLU(3, 4, 3, padding=1, rng=0, band_bytes=600),
                           fast.Conv2d(4, 5, 3, padding=1, rng=1), fast.ReLU())


def _unfused_stack():
    """The same network, layer by layer (the same fast conv under a separate pool and ReLU)."""
    return fast.Sequential(fast.Conv2d(3, 4, 3, padding=1, rng=0, band_bytes=600),
                           fast.MaxPool2d(2), fast.ReLU(inplace=True),
                           fast.Conv2d(4, 5, 3, padding=1, rng=1), fast.ReLU())


def test_conv_pool_relu_pools_and_rectifies_a_convs_bands_and_unpools_its_gradient(monkeypatch):
    """ConvPoolReLU: the forward pools and rectifies each band of the conv's output as it is made,
    the ReLU's gradient is folded into the pool's argmax (an offset >= kh * kw where a window's
    max is <= 0), and the conv's backward gets the pool's PooledGradient (the pool's full-size dx
    is never made).  Output, dx and every weight gradient equal those of the layers run one by
    one, bit for bit, with windows that are all negative and windows whose max is exactly 0; the
    parameters have the same names."""
    seen, pooled_forward, full_unpool = [], [], []
    backward, forward_pooled = fast.Conv2d.backward, fast.Conv2d.forward_pooled
    pool_backward = fast.MaxPool2d.backward
    monkeypatch.setattr(fast.Conv2d, "backward", lambda self, dy: seen.append(type(dy)) or
                        backward(self, dy))
    monkeypatch.setattr(fast.Conv2d, "forward_pooled", lambda self, x, pool, relu=False:
                        pooled_forward.append((pool, relu)) or forward_pooled(self, x, pool, relu))
    monkeypatch.setattr(fast.MaxPool2d, "backward", lambda self, dy: full_unpool.append(self) or
                        pool_backward(self, dy))
    net, ref = _pooled_stack(), _unfused_stack()
    assert list(net.params) == list(ref.params) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    for conv in (net[0].conv, ref[0]):
        conv.params["bias"][1] = -50                                   # every window's max < 0
        conv.params["weight"][2] = 0                                   # every window's max = 0
    x = np.round(np.random.default_rng(36).standard_normal((1, 3, 17, 22)), 1).astype(np.float32)
    y = net.forward(x)
    assert [(p, r) for p, r in pooled_forward if p is not None] == [(net[0].pool, True)]
    argmax = net[0].pool._cache[0]
    assert (argmax[:, 1:3] >= 4).all() and (argmax[:, 0] < 4).any()     # no offset gets dy
    dy = np.random.default_rng(37).standard_normal(y.shape).astype(np.float32)
    dx = net.backward(dy.copy())
    assert seen == [np.ndarray, fast.PooledGradient] and full_unpool == []
    y_ref = ref.forward(x)
    dx_ref = ref.backward(dy.copy())
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for k, v in ref.grads.items():
        np.testing.assert_array_equal(net.grads[k], v, err_msg=k)
    assert not net.grads["0.weight"][1].any() and ref.grads["0.weight"][0].any()
    with nn.no_grad():
        np.testing.assert_array_equal(net.forward(x), y)


# ---- the whole fast model: many bands, many threads --------------------------------------------------

def test_feature_size_is_the_backbones_output_size():
    model = FasterRCNN(Config(**SMALL))
    for h, w in [(32, 32), (33, 47), (97, 161), (120, 64)]:
        x = np.zeros((1, 3, h, w), np.float32)
        assert model.features(x).shape[2:] == model.feature_size(h, w)


def test_a_training_step_is_bit_identical_on_1_2_and_3_threads():
    """The model's convolutions split into many bands (64 KB each), pooling and ReLU into channel
    blocks (a 240 x 320 image): losses, every gradient and the predictions are equal bit for bit."""
    sample = sample_at(240, 320, seed=0)
    results = []
    try:
        for n in (1, 2, 3):
            threads.set_threads(n)
            model = set_bands(FasterRCNN(Config(**SMALL)), 64 << 10)
            assert len(model.backbone.layers[0].conv.bands(240, 320, 4)) >= 8
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
    convolution in one band (the whole image's im2col): losses and gradients to float32 rounding."""
    sample = sample_at(200, 260, seed=1)
    models = [set_bands(FasterRCNN(Config(**SMALL)), 32 << 10),       # many bands
              set_bands(FasterRCNN(Config(**SMALL)), None)]           # one band each
    assert len(models[0].backbone.layers[0].conv.bands(200, 260, 4)) >= 8
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


# ---- the overlapped step (fast.step) -----------------------------------------------------------------

@pytest.mark.parametrize("slow_stage, broken_stage", [
    ("anchor_targets", "backbone.forward"),    # labelling beside the backbone; the backbone fails
    ("proposal_targets", "rpn.backward"),      # detector side beside the RPN side; the RPN fails
])
def test_a_failing_step_leaves_no_stage_running_on_another_thread(slow_stage, broken_stage,
                                                                  monkeypatch):
    """Stages that draw from the step's rng run on other threads (the anchor labelling beside the
    backbone, the detector's side beside the RPN's loss and backward): when the step fails, it
    waits for them before raising, so a retried step never shares the rng with a stray thread."""
    import time
    from frcnn_scratch import model as model_module
    owner = fast_step if slow_stage == "anchor_targets" else model_module
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
    target = model.rpn if broken_stage == "rpn.backward" else model.backbone
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
    labelling = fast_step.anchor_targets
    sample = sample_at(120, 160, seed=0)
    losses = {}
    for n, delay in [(1, 0.0), (2, 0.2)]:
        monkeypatch.setattr(fast_step, "anchor_targets",
                            lambda *a, d=delay: (time.sleep(d), labelling(*a))[1])
        model = FasterRCNN(Config(**SMALL))
        try:
            threads.set_threads(n)
            losses[n] = model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"],
                                             rng=np.random.default_rng(4))
        finally:
            threads.set_threads(None)
    assert losses[1] == losses[2]


# ---- the thread team and its policy (fast.threads) ---------------------------------------------------

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


@pytest.mark.skipif("OPENBLAS_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in os.environ,
                    reason="the environment fixes BLAS's thread count: blas_threads leaves it")
def test_blas_threads_sets_the_count_from_any_python_thread():
    """A blas_threads block on a thread other than the one that set the count first must set it
    too (threadpoolctl ignores every thread but the first), and the count from before the first
    block comes back when the last one ends, whichever thread ends it."""
    import threading
    if threads.blas_thread_count() is None:
        pytest.skip("numpy's BLAS is not one threadpoolctl controls")
    before = threads.blas_thread_count()
    other = 2 if before == 1 else 1
    with threads.blas_threads(other):                 # the main thread sets it first
        assert threads.blas_thread_count() == other
    assert threads.blas_thread_count() == before
    seen, entered, leave = [], threading.Event(), threading.Event()

    def block():
        with threads.blas_threads(other):
            seen.append(threads.blas_thread_count())
            entered.set()
            leave.wait(30)
        seen.append(threads.blas_thread_count())

    worker = threading.Thread(target=block)
    worker.start()
    assert entered.wait(30)
    with threads.blas_threads(other):                 # a second block, ending first
        pass
    assert threads.blas_thread_count() == other       # the worker's block still runs
    leave.set()
    worker.join(30)
    assert seen == [other, before], (seen, before, other)
    assert threads.blas_thread_count() == before


def test_predictions_from_two_threads_equal_serial_ones_bit_for_bit():
    """One model shared by two Python threads, each predicting images of several sizes (below
    and above SMALL_IMAGE_PIXELS: one thread and the team) in another order, round after round,
    with pauses so that each thread begins and ends predictions while the other works: every
    prediction equals the one made alone, bit for bit.  BLAS's thread count changes a product's
    sums, so a count that one thread's block does not set, or that one thread restores while the
    other multiplies, shows here.  The first round makes the second case certain: thread 0
    begins, thread 1 begins inside it, thread 0 ends while thread 1 is held before its RPN."""
    import threading
    import time
    model = FasterRCNN(Config(score_threshold=0.0))     # products big enough for BLAS's threads
    rng = np.random.default_rng(5)
    sizes = [(96, 160), (300, 310), (40, 56), (150, 128)]        # 300 x 310: 93k pixels
    images = [rng.random(hw + (3,), dtype=np.float32) for hw in sizes]
    alone = [model.predict(image) for image in images]
    assert all(len(a["boxes"]) for a in alone)                  # something to compare
    rounds, differ, failed = 25, [], []
    inside = [threading.Event(), threading.Event()]             # thread k's first prediction
    first_done = threading.Event()                              # has begun; thread 0's has ended
    rpn_forward = model.rpn.forward

    def held_rpn_forward(features):
        k = int(threading.current_thread().name[-1])
        if not inside[k].is_set():
            inside[k].set()
            (inside[1] if k == 0 else first_done).wait(30)
        return rpn_forward(features)

    def predict_all(k):
        pauses = np.random.default_rng(k).uniform(0, 0.015, size=rounds * len(images))
        pauses[:2] = (0.0, 0.05) if k == 0 else (0.0, 0.0)      # thread 1 goes on alone a while
        try:
            for r in range(rounds):
                for j in range(len(images)):
                    i = (j + k + r) % len(images)               # the threads on other images
                    if k == 1 and (r, j) == (0, 0):
                        inside[0].wait(30)
                    time.sleep(pauses[r * len(images) + j])
                    got = model.predict(images[i])
                    if k == 0 and (r, j) == (0, 0):
                        first_done.set()
                    for key in ("boxes", "scores", "labels"):
                        if not np.array_equal(got[key], alone[i][key]):
                            differ.append((k, r, sizes[i], key))
                            break
        except BaseException as e:                              # seen by the test, not lost
            failed.append(e)
        finally:
            for event in inside + [first_done]:
                event.set()

    model.rpn.forward = held_rpn_forward
    workers = [threading.Thread(target=predict_all, args=(k,), name=f"predictor-{k}")
               for k in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failed, failed
    assert not differ, f"{len(differ)} of {2 * rounds * len(images)} predictions differ from " \
                       f"the serial ones (thread, round, size, first field): {differ[:4]}"


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
