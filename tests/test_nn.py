"""Tests for frcnn_scratch.nn, the textbook layers: hand-computed cases, the definition
(conv2d_reference) against plain loops, finite differences, torch.autograd.  The fast layers are
held equal to these in test_fast.py."""
import io

import numpy as np
import pytest
import torch  # CI always installs torch: a plain import, so the NumPy checks here are never skipped
from hypothesis import given, settings, strategies as st

from frcnn_scratch import nn

F = torch.nn.functional

# float32 layers vs a float64 torch reference: sums of a few hundred products of O(1) numbers
F32_TOL = dict(rtol=1e-4, atol=1e-4)
# float64 layers vs central finite differences with eps 1e-6: truncation ~eps^2, rounding ~1e-16/eps
FD_EPS = 1e-6
FD_TOL = dict(rtol=1e-6, atol=1e-7)


def close(actual, expected, what, **tol):
    np.testing.assert_allclose(actual, expected, err_msg=what, **(tol or F32_TOL))


# ----------------------------------------------------------------------------- helpers

def numeric_grad(f, arr, eps=FD_EPS):
    """Central differences of the scalar f() w.r.t. every element of `arr` (perturbed in place)."""
    grad = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def check_layer_fd(layer, x, rng):
    """Compare backward's dx and every param grad with finite differences of L = sum(y * R), float64."""
    layer.astype(np.float64)
    x = x.astype(np.float64)
    r = rng.standard_normal(layer.forward(x).shape)        # dL/dy
    loss = lambda: float(np.sum(layer.forward(x) * r))  # noqa: E731
    layer.forward(x)
    dx = layer.backward(r)
    analytic = {"x": dx, **{k: v.copy() for k, v in layer.grads.items()}}
    numeric = {"x": numeric_grad(loss, x), **{k: numeric_grad(loss, p) for k, p in layer.params.items()}}
    assert set(analytic) == set(numeric), f"grads keys {sorted(analytic)} != params keys {sorted(numeric)}"
    for k in numeric:
        assert analytic[k].dtype == np.float64, f"d{k}: computed in {analytic[k].dtype}, expected float64"
        close(analytic[k], numeric[k], f"{type(layer).__name__} d{k} vs finite differences", **FD_TOL)


def t64(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


# ----------------------------------------------------------------------------- he_normal / init

def test_he_normal_std_and_seed():
    w = nn.he_normal((200, 50, 3, 3), fan_in=50 * 9, rng=np.random.default_rng(0))
    assert w.dtype == np.float32 and w.shape == (200, 50, 3, 3)
    want = np.sqrt(2 / 450)
    # 90,000 samples: the sample std is within 1% of the true std with overwhelming probability
    assert abs(w.std() / want - 1) < 0.01, f"std {w.std():.5f}, expected {want:.5f}"
    assert abs(w.mean()) < 0.02 * want, f"mean {w.mean():.5f}, expected ~0 (standard error {want / 300:.5f})"
    again = nn.he_normal((200, 50, 3, 3), fan_in=450, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(w, again, err_msg="same seed gave different weights")


def test_layers_seeded_and_linear_std():
    a = nn.Conv2d(3, 8, 3, rng=np.random.default_rng(7))
    b = nn.Conv2d(3, 8, 3, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.params["weight"], b.params["weight"])
    assert a.params["weight"].dtype == np.float32 and a.params["bias"].dtype == np.float32
    np.testing.assert_array_equal(a.params["bias"], np.zeros(8, np.float32))
    cls = nn.Linear(1000, 21, rng=np.random.default_rng(0), std=0.01)
    assert abs(cls.params["weight"].std() / 0.01 - 1) < 0.03, f"std {cls.params['weight'].std()}"
    he = nn.Linear(1000, 21, rng=np.random.default_rng(0))
    want = np.sqrt(2 / 1000)
    assert abs(he.params["weight"].std() / want - 1) < 0.03, f"std {he.params['weight'].std()}, want {want}"
    assert he.params["weight"].shape == (21, 1000)
    rpn = nn.Conv2d(64, 64, 3, rng=np.random.default_rng(0), std=0.01)
    assert abs(rpn.params["weight"].std() / 0.01 - 1) < 0.03, f"std {rpn.params['weight'].std()}"


# ----------------------------------------------------------------------------- Conv2d by hand

def _hand_conv(stride=1, padding=0):
    conv = nn.Conv2d(1, 1, 2, stride=stride, padding=padding)
    conv.params["weight"][...] = np.array([[1, 2], [3, 4]], np.float32)
    conv.params["bias"][...] = 1.0 if stride == 1 else 0.0
    return conv


def test_conv2d_hand_computed_forward_backward():
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)   # [[1 2 3] [4 5 6] [7 8 9]]
    conv = _hand_conv()
    y = conv.forward(x)
    # y[0,0] = 1*1 + 2*2 + 3*4 + 4*5 + bias 1 = 38, and so on
    np.testing.assert_array_equal(y, np.array([[[[38, 48], [68, 78]]]], np.float32))
    dx = conv.backward(np.ones((1, 1, 2, 2), np.float32))
    # dW[u, v] = sum of x over the windows at offset (u, v); db = number of outputs
    np.testing.assert_array_equal(conv.grads["weight"], np.array([[[[12, 16], [24, 28]]]], np.float32))
    np.testing.assert_array_equal(conv.grads["bias"], np.array([4], np.float32))
    # dx[i, j] = sum of the kernel entries that touched x[i, j]
    np.testing.assert_array_equal(dx, np.array([[[[1, 3, 2], [4, 10, 6], [3, 7, 4]]]], np.float32))


def test_conv2d_hand_computed_stride_and_padding():
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)
    conv = _hand_conv(stride=2, padding=1)
    y = conv.forward(x)
    # padded 5x5 input, windows at (0,0) [[0,0],[0,1]], (0,2) [[0,0],[2,3]], (2,0) [[0,4],[0,7]], (2,2) [[5,6],[8,9]]
    np.testing.assert_array_equal(y, np.array([[[[4, 18], [36, 77]]]], np.float32))
    dx = conv.backward(np.array([[[[1, 10], [100, 1000]]]], np.float32))
    # each x pixel is seen by exactly one window here (stride 2 = kernel 2): dx = dy[window] * w[offset]
    want = np.array([[4, 30, 40], [200, 1000, 2000], [400, 3000, 4000]], np.float32)
    np.testing.assert_array_equal(dx[0, 0], want)


# ----------------------------------------------------------------------------- MaxPool2d by hand

def test_maxpool_hand_computed_routing_and_ties():
    x = np.array([[1, 3, 2, 2],
                  [3, 0, 1, 0],
                  [5, 5, 0, 0],
                  [5, 4, 0, 0]], np.float32).reshape(1, 1, 4, 4)
    pool = nn.MaxPool2d(2, 2)
    y = pool.forward(x)
    np.testing.assert_array_equal(y, np.array([[[[3, 2], [5, 0]]]], np.float32))
    dx = pool.backward(np.array([[[[1, 2], [3, 4]]]], np.float32))
    # ties go to the first max in row-major window order
    want = np.zeros((4, 4), np.float32)
    want[0, 1], want[0, 2], want[2, 0], want[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(dx[0, 0], want)


def test_maxpool_odd_size_floors_and_overlap_adds():
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)    # max of each window is its bottom-right
    pool = nn.MaxPool2d(2, 2)
    y = pool.forward(x)
    np.testing.assert_array_equal(y[0, 0], np.array([[6, 8], [16, 18]], np.float32))
    dx = pool.backward(np.ones_like(y))
    assert dx.shape == x.shape and dx[0, 0, 4].sum() == 0 and dx[0, 0, :, 4].sum() == 0
    # kernel 3, stride 1 on 4x4: one peak inside all four overlapping windows collects all four dy
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = 9                                            # inside all four 3x3 windows
    pool = nn.MaxPool2d(3, 1)
    y = pool.forward(x)
    np.testing.assert_array_equal(y[0, 0], np.full((2, 2), 9, np.float32))
    dx = pool.backward(np.ones_like(y))
    assert dx[0, 0, 1, 1] == 4 and dx.sum() == 4, f"overlapping windows should add: {dx[0, 0]}"


def test_relu_hand_computed():
    relu = nn.ReLU()
    y = relu.forward(np.array([[-1.0, 0.0, 2.0]], np.float32))
    np.testing.assert_array_equal(y, np.array([[0, 0, 2]], np.float32))
    dx = relu.backward(np.array([[5.0, 5.0, 5.0]], np.float32))
    np.testing.assert_array_equal(dx, np.array([[0, 0, 5]], np.float32))   # gradient at 0 is 0, as torch


def test_linear_and_flatten_hand_computed():
    lin = nn.Linear(2, 1)
    lin.params["weight"][...] = [[2.0, -1.0]]
    lin.params["bias"][...] = [0.5]
    y = lin.forward(np.array([[1.0, 3.0], [2.0, 0.0]], np.float32))
    np.testing.assert_array_equal(y, np.array([[-0.5], [4.5]], np.float32))
    dx = lin.backward(np.array([[1.0], [2.0]], np.float32))
    np.testing.assert_array_equal(lin.grads["weight"], np.array([[5.0, 3.0]], np.float32))
    np.testing.assert_array_equal(lin.grads["bias"], np.array([3.0], np.float32))
    np.testing.assert_array_equal(dx, np.array([[2, -1], [4, -2]], np.float32))
    flat = nn.Flatten()
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    y = flat.forward(x)
    np.testing.assert_array_equal(y, x.reshape(2, 12))
    np.testing.assert_array_equal(flat.backward(y), x)


# ----------------------------------------------------------------------------- properties

def test_conv2d_reference_hand_computed():
    """The definition, on the hand-made case above: y[0, 0] = 1*1 + 2*2 + 3*4 + 4*5 + 1 = 38."""
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)
    w = np.array([[[[1, 2], [3, 4]]]], np.float32)
    np.testing.assert_array_equal(nn.conv2d_reference(x, w, np.ones(1, np.float32)),
                                  [[[[38, 48], [68, 78]]]])
    np.testing.assert_array_equal(nn.conv2d_reference(x, w, np.zeros(1, np.float32), stride=2,
                                                      padding=1), [[[[4, 18], [36, 77]]]])


def test_im2col_columns_and_col2im_is_its_adjoint():
    """Column i*Wo + j of im2col holds window (i, j) in (c, u, v) order; col2im is its adjoint:
    <im2col(x), d> = <x, col2im(d)> for every x and d (so the conv's backward is exact)."""
    rng = np.random.default_rng(0)
    xp = rng.standard_normal((2, 3, 7, 6))
    cols = nn.im2col(xp, 3, 2, 2, 1)                                  # kh 3, kw 2, sh 2, sw 1
    ho, wo = (7 - 3) // 2 + 1, (6 - 2) // 1 + 1
    assert cols.shape == (2, 3 * 3 * 2, ho * wo)
    for i in range(ho):
        for j in range(wo):
            np.testing.assert_array_equal(cols[:, :, i * wo + j],
                                          xp[:, :, 2 * i:2 * i + 3, j:j + 2].reshape(2, -1))
    d = rng.standard_normal(cols.shape)
    back = nn.col2im(d, xp.shape, 3, 2, 2, 1, ho, wo)
    np.testing.assert_allclose(np.sum(cols * d), np.sum(xp * back), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 3), o=st.integers(1, 3), h=st.integers(1, 7),
       w=st.integers(1, 7), kh=st.integers(1, 3), kw=st.integers(1, 3), sh=st.integers(1, 3),
       sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_conv2d_equals_conv2d_reference(n, c, o, h, w, kh, kw, sh, sw, ph, pw, seed):
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    rng = np.random.default_rng(seed)
    conv = nn.Conv2d(c, o, (kh, kw), stride=(sh, sw), padding=(ph, pw), rng=rng)
    conv.params["bias"][...] = rng.standard_normal(o)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    y = conv.forward(x)
    assert y.dtype == np.float32
    want = nn.conv2d_reference(x.astype(np.float64), conv.params["weight"].astype(np.float64),
                               conv.params["bias"].astype(np.float64), (sh, sw), (ph, pw))
    close(y, want, "Conv2d (im2col) vs conv2d_reference (loops over output pixels)")


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), k=st.integers(1, 3), s=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_maxpool_matches_naive_loops_with_ties(h, w, k, s, seed):
    if h < k or w < k:
        return
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(2, 2, h, w)).astype(np.float32)      # small ints: many ties
    pool = nn.MaxPool2d(k, s)
    y = pool.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = pool.backward(dy)
    want_dx = np.zeros_like(x, dtype=np.float64)
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            win = x[:, :, i * s:i * s + k, j * s:j * s + k].reshape(2, 2, -1)
            assert np.array_equal(y[:, :, i, j], win.max(-1))
            a = win.argmax(-1)                                           # first max, row-major
            for nn_ in range(2):
                for cc in range(2):
                    u, v = divmod(int(a[nn_, cc]), k)
                    want_dx[nn_, cc, i * s + u, j * s + v] += dy[nn_, cc, i, j]
    close(dx, want_dx, "maxpool routing vs loops", rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- finite differences (float64)

@pytest.mark.parametrize("cfg", [
    dict(in_ch=2, out_ch=3, kernel_size=3, stride=1, padding=1),
    dict(in_ch=2, out_ch=2, kernel_size=(2, 3), stride=(2, 1), padding=(0, 2)),
    dict(in_ch=1, out_ch=2, kernel_size=3, stride=2, padding=0),
])
def test_conv2d_finite_differences(cfg):
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(rng=rng, **cfg)
    conv.params["bias"][...] = rng.standard_normal(cfg["out_ch"])
    check_layer_fd(conv, rng.standard_normal((2, cfg["in_ch"], 5, 6)), rng)


def test_linear_finite_differences():
    rng = np.random.default_rng(1)
    check_layer_fd(nn.Linear(5, 4, rng=rng), rng.standard_normal((3, 5)), rng)


def test_relu_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 4))
    x[np.abs(x) < 1e-3] = 0.5                                # keep away from the kink at 0
    check_layer_fd(nn.ReLU(), x, rng)


def test_maxpool_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.permutation(2 * 2 * 7 * 7).reshape(2, 2, 7, 7) * 0.01   # distinct values: no ties
    check_layer_fd(nn.MaxPool2d(3, 2), x, rng)
    check_layer_fd(nn.MaxPool2d(2, 2), x, rng)


def test_sequential_finite_differences():
    rng = np.random.default_rng(4)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(3 * 2 * 2, 3, rng=rng))
    x = rng.standard_normal((2, 2, 4, 5))
    check_layer_fd(net, x, rng)


# ----------------------------------------------------------------------------- torch.autograd

@pytest.mark.parametrize("cfg", [
    dict(in_ch=3, out_ch=8, kernel_size=3, stride=1, padding=1),
    dict(in_ch=4, out_ch=5, kernel_size=3, stride=2, padding=1),
    dict(in_ch=2, out_ch=3, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1)),
    dict(in_ch=3, out_ch=4, kernel_size=5, stride=3, padding=2),
    dict(in_ch=3, out_ch=2, kernel_size=2, stride=3, padding=1),    # rows no window reads
    dict(in_ch=4, out_ch=3, kernel_size=1, stride=1, padding=0),    # columns = x: bias apart
])
def test_conv2d_matches_torch(cfg):
    rng = np.random.default_rng(5)
    conv = nn.Conv2d(rng=rng, **cfg)
    np.full(2 * cfg["in_ch"] * 16 * 16, np.nan, np.float32)        # freed: memory a new array may reuse
    conv.params["bias"][...] = rng.standard_normal(cfg["out_ch"])
    x = rng.standard_normal((2, cfg["in_ch"], 11, 12)).astype(np.float32)
    y = conv.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = conv.backward(dy)
    xt, wt, bt = t64(x), t64(conv.params["weight"]), t64(conv.params["bias"])
    yt = F.conv2d(xt, wt, bt, stride=conv.stride, padding=conv.padding)
    yt.backward(torch.from_numpy(dy.astype(np.float64)))
    close(y, yt.detach().numpy(), "conv y vs torch")
    close(dx, xt.grad.numpy(), "conv dx vs torch")
    close(conv.grads["weight"], wt.grad.numpy(), "conv dW vs torch")
    close(conv.grads["bias"], bt.grad.numpy(), "conv db vs torch")
    assert y.dtype == dx.dtype == conv.grads["weight"].dtype == np.float32


@pytest.mark.parametrize("k, s, hw", [(2, 2, (8, 8)), (2, 2, (7, 9)), (3, 2, (9, 8)), (3, 1, (5, 5)),
                                      (2, 3, (8, 10))])
def test_maxpool_matches_torch(k, s, hw):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, *hw)).astype(np.float32)
    pool = nn.MaxPool2d(k, s)
    y = pool.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    np.full(x.size, np.nan, np.float32)                      # freed: memory dx may reuse
    dx = pool.backward(dy)
    xt = t64(x)
    yt = F.max_pool2d(xt, k, s)
    yt.backward(torch.from_numpy(dy.astype(np.float64)))
    close(y, yt.detach().numpy(), "maxpool y vs torch", rtol=0, atol=0)
    close(dx, xt.grad.numpy(), "maxpool dx vs torch", rtol=1e-6, atol=1e-6)


def test_linear_and_relu_match_torch():
    rng = np.random.default_rng(7)
    lin, relu = nn.Linear(20, 7, rng=rng), nn.ReLU()
    lin.params["bias"][...] = rng.standard_normal(7)
    x = rng.standard_normal((5, 20)).astype(np.float32)
    y = relu.forward(lin.forward(x))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = lin.backward(relu.backward(dy))
    xt, wt, bt = t64(x), t64(lin.params["weight"]), t64(lin.params["bias"])
    yt = F.relu(F.linear(xt, wt, bt))
    yt.backward(torch.from_numpy(dy.astype(np.float64)))
    close(y, yt.detach().numpy(), "linear+relu y vs torch")
    close(dx, xt.grad.numpy(), "linear dx vs torch")
    close(lin.grads["weight"], wt.grad.numpy(), "linear dW vs torch")
    close(lin.grads["bias"], bt.grad.numpy(), "linear db vs torch")


# ----------------------------------------------------------------------------- Sequential

def test_sequential_names_and_shared_arrays():
    rng = np.random.default_rng(8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(),
                        nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.Flatten(), nn.Linear(4 * 4 * 4, 2, rng=rng))
    assert list(net.params) == ["0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    assert net.params["3.weight"] is net[3].params["weight"], "params must be the layers' own arrays"
    assert len(net) == 6 and isinstance(net[2], nn.MaxPool2d)
    y = net.forward(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert y.shape == (2, 2)
    dx = net.backward(np.ones_like(y))
    assert dx.shape == (2, 3, 8, 8) and dx.dtype == np.float32
    assert list(net.grads) == list(net.params)
    for k in net.params:
        assert net.grads[k].shape == net.params[k].shape, k
    before = net[5].params["weight"].copy()
    nn.SGD(net.params, lr=0.1).step(net.grads)
    assert not np.array_equal(before, net[5].params["weight"]), "SGD did not update the layer in place"


# ----------------------------------------------------------------------------- SGD vs torch.optim.SGD

def _sgd_pair(lr, momentum, wd):
    rng = np.random.default_rng(9)
    params = {"0.weight": rng.standard_normal((4, 3)).astype(np.float32),
              "0.bias": rng.standard_normal(4).astype(np.float32),
              "2.weight": rng.standard_normal((2, 4, 3, 3)).astype(np.float32)}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    # torch decays every param of a group: put biases in a group without decay, as ours skips them
    topt = torch.optim.SGD([
        {"params": [tparams["0.weight"], tparams["2.weight"]], "weight_decay": wd},
        {"params": [tparams["0.bias"]], "weight_decay": 0.0}], lr=lr, momentum=momentum)
    return params, nn.SGD(params, lr=lr, momentum=momentum, weight_decay=wd), tparams, topt


def test_sgd_matches_torch_with_momentum_weight_decay_and_lr_change():
    params, opt, tparams, topt = _sgd_pair(lr=0.1, momentum=0.9, wd=0.01)
    rng = np.random.default_rng(10)
    for step in range(5):
        if step == 3:                                           # a schedule's drop
            opt.set_lr(0.01)
            for g in topt.param_groups:
                g["lr"] = 0.01
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        opt.step(grads)
        for k, t in tparams.items():
            t.grad = torch.from_numpy(grads[k].copy())
        topt.step()
        for k in params:
            close(params[k], tparams[k].detach().numpy(), f"step {step}: {k} vs torch.optim.SGD",
                  rtol=1e-5, atol=1e-6)


def test_sgd_skips_bias_decay_and_state_dict_resume():
    params, opt, _, _ = _sgd_pair(lr=0.1, momentum=0.0, wd=0.5)
    b0, w0 = params["0.bias"].copy(), params["0.weight"].copy()
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    opt.step(zero)
    np.testing.assert_array_equal(params["0.bias"], b0, err_msg="bias was decayed")
    close(params["0.weight"], w0 * (1 - 0.1 * 0.5), "weight decay with zero grad", rtol=1e-6, atol=0)

    rng = np.random.default_rng(11)
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]
    p_a, opt_a, _, _ = _sgd_pair(0.05, 0.9, 1e-3)
    for g in grads:
        opt_a.step(g)
    p_b, opt_b, _, _ = _sgd_pair(0.05, 0.9, 1e-3)
    for g in grads[:2]:
        opt_b.step(g)
    buf = io.BytesIO()
    np.savez(buf, **opt_b.state_dict())                         # checkpoints store it as .npz arrays
    buf.seek(0)
    with np.load(buf) as npz:
        state = {k: npz[k] for k in npz.files}
    saved = {k: v.copy() for k, v in p_b.items()}
    p_c, opt_c, _, _ = _sgd_pair(1.0, 0.5, 0.0)                 # different hyper-parameters, overwritten
    for k in p_c:
        p_c[k][...] = saved[k]
    opt_c.load_state_dict(state)
    assert (opt_c.lr, opt_c.momentum, opt_c.weight_decay, opt_c.steps) == (0.05, 0.9, 1e-3, 2)
    for g in grads[2:]:
        opt_c.step(g)
    for k in p_a:
        np.testing.assert_array_equal(p_c[k], p_a[k], err_msg=f"resumed {k} differs from uninterrupted run")


# ----------------------------------------------------------------------------- dtypes

def test_dtypes_float32_by_default_float64_after_astype():
    rng = np.random.default_rng(12)
    conv = nn.Conv2d(2, 2, 3, rng=rng)
    y = conv.forward(rng.standard_normal((1, 2, 5, 5)))           # float64 input, float32 params
    assert y.dtype == np.float32
    conv.astype(np.float64)
    y = conv.forward(rng.standard_normal((1, 2, 5, 5)).astype(np.float32))
    assert y.dtype == np.float64
    assert conv.backward(np.ones_like(y)).dtype == np.float64
    assert nn.ReLU().forward(np.ones((2, 2), np.int64)).dtype == np.float32


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("make, x, match", [
    (lambda: nn.Conv2d(3, 4, 3), np.zeros((1, 2, 8, 8)), r"Conv2d x: expected shape \(N, 3, H, W\)"),
    (lambda: nn.Conv2d(3, 4, 3), np.zeros((3, 8, 8)), r"Conv2d x: expected shape \(N, 3, H, W\)"),
    (lambda: nn.Conv2d(3, 4, 3), np.zeros((1, 3, 2, 8)), r"smaller than the kernel"),
    (lambda: nn.Conv2d(1, 1, 3), np.full((1, 1, 4, 4), np.nan), r"Conv2d x: contains NaN"),
    (lambda: nn.Linear(4, 2), np.zeros((2, 5)), r"Linear x: expected shape \(N, 4\)"),
    (lambda: nn.Linear(4, 2), np.zeros((2, 2, 4)), r"Linear x: expected shape"),
    (lambda: nn.MaxPool2d(2), np.zeros((2, 8, 8)), r"MaxPool2d x: expected shape \(N, C, H, W\)"),
    (lambda: nn.MaxPool2d(3), np.zeros((1, 1, 2, 8)), r"smaller than the kernel"),
    (lambda: nn.ReLU(), np.array([1.0, np.inf]), r"ReLU x: contains NaN or Inf"),
    (lambda: nn.ReLU(), np.array(["a"]), r"ReLU x: expected an array of numbers"),
])
def test_bad_forward_inputs(make, x, match):
    with pytest.raises(ValueError, match=match):
        make().forward(x)


@pytest.mark.parametrize("layer", ["Conv2d", "ReLU", "MaxPool2d", "Linear"])
def test_one_bad_value_anywhere_is_caught_forward_and_backward(layer):
    """The textbook layers check x and dy: a single NaN or Inf anywhere raises, naming the layer."""
    make = {"Conv2d": lambda: nn.Conv2d(5, 4, 3, padding=1, rng=0), "ReLU": nn.ReLU,
            "MaxPool2d": lambda: nn.MaxPool2d(2), "Linear": lambda: nn.Linear(12, 3, rng=0)}[layer]
    x = np.random.default_rng(3).standard_normal((2, 5, 12, 12)).astype(np.float32)
    if layer == "Linear":
        x = x[:, 0, 0]
    y_shape = make().forward(x.copy()).shape
    for bad in (np.nan, np.inf, -np.inf):
        for where in [(0, 0, 0, 0), (1, 4, 11, 11), (0, 2, 6, 3)]:
            where = where[:x.ndim]
            xb = x.copy()
            xb[tuple(min(i, s - 1) for i, s in zip(where, x.shape))] = bad
            with pytest.raises(ValueError, match=f"{layer} x: contains NaN or Inf"):
                make().forward(xb)
            m = make()
            m.forward(x.copy())
            dy = np.ones(y_shape, np.float32)
            dy[tuple(min(i, s - 1) for i, s in zip(where, y_shape))] = bad
            with pytest.raises(ValueError, match=f"{layer}.backward dy: contains NaN or Inf"):
                m.backward(dy)


def test_nn_imports_nothing_from_the_project():
    """nn.py is the textbook: numpy and the standard library only."""
    import ast
    import sys
    tree = ast.parse(open(nn.__file__).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module.split(".")[0] in {"numpy"} | set(
                sys.stdlib_module_names), f"nn.py imports {node.module!r}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in {"numpy"} | set(sys.stdlib_module_names), \
                    f"nn.py imports {alias.name!r}"


def test_bad_backward_inputs():
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(RuntimeError, match="before forward"):
        conv.backward(np.zeros((1, 2, 2, 2)))
    conv.forward(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"dy: expected the forward output's shape \(1, 2, 2, 2\)"):
        conv.backward(np.zeros((1, 2, 3, 3)))
    with pytest.raises(ValueError, match="dy: contains NaN"):
        conv.backward(np.full((1, 2, 2, 2), np.nan))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.MaxPool2d().backward(np.zeros((1, 1, 1, 1)))


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Conv2d(0, 4, 3), "in_ch"),
    (lambda: nn.Conv2d((3, 5), 4, 3), "in_ch: expected an int >= 1"),
    (lambda: nn.Linear(True, 4), "in_features: expected an int >= 1"),
    (lambda: nn.Linear(4, 2.5), "out_features: expected an int >= 1"),
    (lambda: nn.Conv2d(3, 4, 0), "kernel_size"),
    (lambda: nn.Conv2d(3, 4, 3, stride=0), "stride"),
    (lambda: nn.Conv2d(3, 4, 3, padding=-1), "padding"),
    (lambda: nn.Conv2d(3, 4, 2.5), "kernel_size"),
    (lambda: nn.MaxPool2d((2, 2, 2)), "kernel_size"),
    (lambda: nn.Linear(4, 2, std=-1), "std"),
    (lambda: nn.Conv2d(4, 2, 3, std=float("nan")), "std"),
    (lambda: nn.he_normal((2, 2), 0), "fan_in"),
    (lambda: nn.Sequential(nn.ReLU(), "relu"), r"layers\[1\]"),
    (lambda: nn.SGD({"w": np.zeros(2, np.float32)}, lr=-0.1), "lr"),
    (lambda: nn.SGD({"w": np.zeros(2, np.float32)}, lr=0.1, momentum=1.0), "momentum"),
    (lambda: nn.SGD({"w": np.zeros(2, np.float32)}, lr=0.1, weight_decay=-1), "weight_decay"),
    (lambda: nn.SGD({"w": [0.0, 1.0]}, lr=0.1), r"params\['w'\]"),
    (lambda: nn.SGD({}, lr=0.1), "params"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sgd_bad_grads():
    opt = nn.SGD({"w": np.zeros(2, np.float32)}, lr=0.1)
    with pytest.raises(ValueError, match="missing gradient for parameter 'w'"):
        opt.step({})
    with pytest.raises(ValueError, match=r"grads\['w'\]: expected shape \(2,\)"):
        opt.step({"w": np.zeros(3)})
    with pytest.raises(ValueError, match=r"grads\['w'\]: contains NaN"):
        opt.step({"w": np.array([0.0, np.nan])})
    with pytest.raises(ValueError, match="velocity.w"):
        opt.load_state_dict({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "steps": 0})


# ----------------------------------------------------------------------------- no_grad

def _no_grad_layers():
    rng = np.random.default_rng(7)
    return [nn.Conv2d(3, 4, 3, padding=1, rng=rng), nn.Conv2d(3, 4, 3, stride=2, rng=rng),
            nn.MaxPool2d(2, 2), nn.MaxPool2d(3, 2), nn.ReLU(), nn.ReLU(),
            nn.Flatten(), nn.Linear(3 * 12 * 10, 5, rng=rng)]


@pytest.mark.parametrize("index", range(8))
def test_no_grad_forward_is_the_same_and_keeps_nothing_for_backward(index):
    """Under no_grad each layer's output equals its normal forward bit for bit (ties in the max
    pools included), and a backward after it is refused with a message that says why: also when
    an earlier normal forward had left a cache, which must not be used for the new input."""
    layer = _no_grad_layers()[index]
    x = np.round(np.random.default_rng(index).standard_normal((2, 3, 12, 10)), 1).astype(np.float32)
    if isinstance(layer, nn.Linear):
        x = x.reshape(2, -1)
    y = layer.forward(x.copy())
    dy = np.ones_like(y)
    layer.backward(dy.copy())                                          # a normal pair works
    layer.forward(x.copy())                                            # a cache is left ...
    with nn.no_grad():
        assert not nn.grad_enabled()
        y_inference = layer.forward(x.copy())
    assert nn.grad_enabled()
    np.testing.assert_array_equal(y_inference, y)
    with pytest.raises(RuntimeError, match="no_grad"):                 # ... and dropped
        layer.backward(dy.copy())


def test_no_grad_is_per_thread_and_restores_the_previous_state():
    import threading
    seen = {}
    with nn.no_grad():
        with nn.no_grad():
            pass
        assert not nn.grad_enabled()                                   # the inner block restored it
        worker = threading.Thread(target=lambda: seen.setdefault("other", nn.grad_enabled()))
        worker.start()
        worker.join()
    assert seen["other"] and nn.grad_enabled()
    with pytest.raises(ZeroDivisionError):
        with nn.no_grad():
            1 / 0
    assert nn.grad_enabled()                                           # also after an exception


def test_max_pool_stride_defaults_to_the_kernel_as_in_torch():
    assert nn.MaxPool2d(3).stride == (3, 3) and nn.MaxPool2d(2).stride == (2, 2)
    assert nn.MaxPool2d(3, 2).stride == (2, 2)


def test_no_grad_keeps_no_argmax_and_no_mask():
    """What inference saves: no argmax array and no ReLU mask."""
    pool, relu = nn.MaxPool2d(2, 2), nn.ReLU()
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype(np.float32)
    with nn.no_grad():
        relu.forward(pool.forward(x))
    assert pool._cache is None and relu._cache is None


def test_maxpool_of_more_than_255_offsets_keeps_each_windows_first_max():
    """A 17 x 17 window has 289 offsets: the argmax is int64 there (uint8 below 256 offsets), and
    the running max of 'offset where larger' must not wrap.  Hand-made: window 0's max at offset
    280 (row 16, column 8) with a tie at 281 after it; window 1's max at offset 3, tied at 288."""
    x = np.zeros((1, 1, 17, 34), np.float32)
    x[0, 0, 16, 8] = x[0, 0, 16, 9] = 5.0                           # window 0: offsets 280, 281
    x[0, 0, 0, 17 + 3] = x[0, 0, 16, 17 + 16] = 7.0                # window 1: offsets 3, 288
    pool = nn.MaxPool2d(17, 17)
    y = pool.forward(x)
    np.testing.assert_array_equal(y, [[[[5.0, 7.0]]]])
    argmax = pool._cache[0]
    assert argmax.dtype.kind == "i"
    np.testing.assert_array_equal(argmax, [[[[280, 3]]]])
    dx = pool.backward(np.array([[[[1.0, 2.0]]]], np.float32))
    want = np.zeros_like(x)
    want[0, 0, 16, 8], want[0, 0, 0, 20] = 1.0, 2.0
    np.testing.assert_array_equal(dx, want)


def test_sgd_state_values_that_are_not_numbers_are_named():
    opt = nn.SGD({"w": np.zeros(2, np.float32)}, lr=0.1)
    state = opt.state_dict()
    state["lr"] = np.array("abc")
    with pytest.raises(ValueError, match=r"state\['lr'\]: expected a number"):
        opt.load_state_dict(state)
