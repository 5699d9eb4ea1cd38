"""frcnn_scratch.fast against the textbook: each fast layer equals its nn.py twin (bit for bit where
the sums are the same, else to float32 rounding), on odd shapes, strides and paddings as well as
the detector's; the fast model equals the textbook model on a 480 x 640 training step and
prediction; results do not depend on the number of threads."""
import numpy as np
import pytest

from fixtures.detector_tiny import tiny_config, tiny_sample
from frcnn_scratch import fast, nn
from frcnn_scratch.config import Config
from frcnn_scratch.fast import threads
from frcnn_scratch.fast.columns import ones_below
from frcnn_scratch.model import FasterRCNN
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
    from frcnn_scratch.fast import blocks
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
