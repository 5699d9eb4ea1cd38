"""Losses of eq. (1): values by hand, properties, then gradients (finite differences and torch)."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from frcnn_scratch.losses import binary_log_loss, rpn_loss, smooth_l1, softmax_cross_entropy

LN3 = math.log(3.0)   # sigmoid(ln 3) = 3/4


def close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want)) if got.size else 0.0
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert err <= tol, f"{what}: max abs difference {err:.3g} > {tol:g}\n got {got}\nwant {want}"


# ---- values by hand --------------------------------------------------------------------------

def test_binary_log_loss_at_known_logits():
    logits = np.array([0.0, 0.0, LN3, LN3, 7.0], np.float32)
    labels = np.array([1, 0, 1, 0, -1])
    loss, grad = binary_log_loss(logits, labels)
    # -log(1/2) twice, -log(3/4), -log(1/4); the ignored anchor adds nothing.
    close(loss, 2 * math.log(2) - math.log(0.75) - math.log(0.25), 1e-6, "loss")
    close(grad, [-0.5, 0.5, -0.25, 0.75, 0.0], 1e-6, "grad = sigmoid(x) - y")
    assert grad.dtype == np.float32


def test_binary_log_loss_is_stable_for_large_logits():
    logits = np.array([1000, -1000, 1000, -1000, 88.8, -104], np.float32)
    labels = np.array([0, 0, 1, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no overflow warning from exp
        loss, grad = binary_log_loss(logits, labels)
    # Wrong confident answers cost |x|; right ones cost 0 (to float precision).
    close(loss, 1000 + 1000 + 88.8 + 104, 1e-3, "loss")
    close(grad, [1, 0, 0, -1, 1, -1], 1e-6, "grad")


def test_softmax_cross_entropy_at_known_logits():
    logits = np.array([[0, 0, 0, 0],
                       [0, math.log(2), math.log(5), -30],   # softmax ~ (1, 2, 5, 0) / 8
                       [1000, 0, -1000, 0],
                       [3, 1, 2, 0]], np.float32)
    labels = np.array([2, 2, 1, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grad = softmax_cross_entropy(logits, labels)
    close(loss, math.log(4) - math.log(5 / 8) + 1000, 1e-4, "loss")
    close(grad[0], [0.25, 0.25, -0.75, 0.25], 1e-6, "grad row 0")
    close(grad[1], [1 / 8, 2 / 8, 5 / 8 - 1, 0], 1e-6, "grad row 1")
    close(grad[2], [1, -1, 0, 0], 1e-6, "grad row 2")
    close(grad[3], [0, 0, 0, 0], 0, "grad of an ignored row")


@pytest.mark.parametrize("x, sigma, want_loss, want_grad", [
    (0.5, 1.0, 0.125, 0.5),            # quadratic: 0.5 x^2, slope x
    (-0.5, 1.0, 0.125, -0.5),
    (2.0, 1.0, 1.5, 1.0),              # linear: |x| - 0.5, slope sign(x)
    (-2.0, 1.0, 1.5, -1.0),
    (1.0, 1.0, 0.5, 1.0),              # the kink |x| = 1/sigma^2: both pieces give 0.5, slope 1
    (0.0, 1.0, 0.0, 0.0),
    (0.1, 3.0, 0.045, 0.9),            # sigma 3: 0.5 * 9 * 0.01, slope 9 * 0.1
    (1.0, 3.0, 1 - 1 / 18, 1.0),       # |x| - 0.5 / 9
    (-1 / 9, 3.0, 1 / 18, -1.0),       # the kink at 1/9: 0.5 / 9 from either piece
])
def test_smooth_l1_both_pieces_and_the_kink(x, sigma, want_loss, want_grad):
    loss, grad = smooth_l1(np.array([x]), np.array([0.0]), sigma=sigma)
    close(loss, want_loss, 1e-12, f"loss at x={x}, sigma={sigma}")
    close(grad, [want_grad], 1e-12, f"grad at x={x}, sigma={sigma}")


def test_smooth_l1_is_continuous_with_slope_one_at_the_kink():
    for sigma in (1.0, 3.0):
        k = 1 / sigma**2
        eps = 1e-9
        below, g_below = smooth_l1(np.array([k - eps]), np.array([0.0]), sigma=sigma)
        above, g_above = smooth_l1(np.array([k + eps]), np.array([0.0]), sigma=sigma)
        close(above - below, 2 * eps, 1e-12, f"jump at the kink, sigma={sigma}")
        close(g_below, g_above, 1e-7, f"slope either side of the kink, sigma={sigma}")


def test_smooth_l1_weights_per_row_or_per_element():
    pred = np.array([[0.5, 2.0, 0, 0], [3.0, 0, 0, 0]], np.float32)
    target = np.zeros((2, 4), np.float32)
    loss_rows, grad_rows = smooth_l1(pred, target, weights=np.array([1.0, 0.0]))
    close(loss_rows, 0.125 + 1.5, 1e-6, "row 1 not counted")
    close(grad_rows, [[0.5, 1, 0, 0], [0, 0, 0, 0]], 1e-6, "grad with row weights")
    w = np.array([[2, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    loss_el, grad_el = smooth_l1(pred, target, weights=w)
    close(loss_el, 2 * 0.125 + 2.5, 1e-6, "element weights")
    close(grad_el, [[1, 0, 0, 0], [1, 0, 0, 0]], 1e-6, "grad with element weights")


def _rpn_case(dtype=np.float64):
    logits = np.array([0.0, 0.0, 5.0, LN3], dtype)
    labels = np.array([1, 0, -1, 1])
    t_pred = np.array([[0.1, 0, 0, 0], [9, 9, 9, 9], [4, 4, 4, 4], [0, 1, 0, 0]], dtype)
    t_target = np.zeros((4, 4), dtype)
    return logits, t_pred, labels, t_target


def test_rpn_loss_by_hand_default_normalisation():
    logits, t_pred, labels, t_target = _rpn_case()
    out = rpn_loss(logits, t_pred, labels, t_target)        # lam 1, sigma 3, N = 3 sampled
    cls_sum = math.log(2) + math.log(2) - math.log(0.75)
    reg_sum = 0.045 + (1 - 1 / 18)           # anchor 0 (x = 0.1 < 1/9) and anchor 3 (x = 1)
    close(out["loss_cls"], cls_sum / 3, 1e-12, "loss_cls")
    close(out["loss_reg"], reg_sum / 3, 1e-12, "loss_reg")
    close(out["loss"], (cls_sum + reg_sum) / 3, 1e-12, "loss")
    close(out["grad_logits"], np.array([-0.5, 0.5, 0, -0.25]) / 3, 1e-12, "grad_logits")
    want_t = np.zeros((4, 4))
    want_t[0, 0] = 0.9 / 3                   # sigma^2 x / N_reg
    want_t[3, 1] = 1 / 3                     # sign(x) / N_reg; anchors 1, 2 are not positive
    close(out["grad_t"], want_t, 1e-12, "grad_t")


def test_rpn_loss_paper_normalisation():
    logits, t_pred, labels, t_target = _rpn_case()
    out = rpn_loss(logits, t_pred, labels, t_target, n_cls=256, n_reg=2400, lam=10)
    cls_sum = math.log(2) + math.log(2) - math.log(0.75)
    reg_sum = 0.045 + (1 - 1 / 18)
    close(out["loss"], cls_sum / 256 + 10 * reg_sum / 2400, 1e-12, "loss")
    close(out["grad_t"][3, 1], 10 / 2400, 1e-12, "grad_t = lam * sign(x) / N_reg")


def test_rpn_loss_no_sampled_anchor_and_empty():
    out = rpn_loss(np.array([3.0]), np.ones((1, 4)), np.array([-1]), np.zeros((1, 4)))
    assert out["loss"] == 0 and not out["grad_logits"].any() and not out["grad_t"].any()
    out = rpn_loss(np.zeros(0), np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros((0, 4)))
    assert out["loss"] == 0 and out["grad_t"].shape == (0, 4) and out["grad_logits"].shape == (0,)


def test_float32_in_float32_out():
    logits, t_pred, labels, t_target = _rpn_case(np.float32)
    out = rpn_loss(logits, t_pred, labels, t_target)
    assert out["grad_logits"].dtype == np.float32 and out["grad_t"].dtype == np.float32
    assert isinstance(out["loss"], float)
    assert softmax_cross_entropy([[1, 2]], [0])[1].dtype == np.float32
    assert smooth_l1([[1, 2, 3, 4]], [[0, 0, 0, 0]])[1].dtype == np.float32


# ---- properties ------------------------------------------------------------------------------

PROPS = settings(max_examples=50, deadline=None)
finite = st.floats(-50, 50, allow_nan=False, width=32)


@PROPS
@given(st.lists(st.tuples(finite, st.sampled_from([-1, 0, 1])), max_size=20))
def test_binary_log_loss_nonnegative_and_grad_bounded(rows):
    logits = np.array([r[0] for r in rows], np.float32)
    labels = np.array([r[1] for r in rows], np.int64)
    loss, grad = binary_log_loss(logits, labels)
    assert loss >= 0, f"loss {loss} < 0"
    assert np.all(np.abs(grad) <= 1) and np.all(grad[labels == -1] == 0)
    # Swapping the label of every counted anchor and negating its logit changes nothing.
    flipped = np.where(labels >= 0, 1 - labels, -1)
    close(binary_log_loss(-logits, flipped)[0], loss, 1e-4 * (1 + loss), "symmetry")


@PROPS
@given(st.lists(finite, min_size=1, max_size=12), st.floats(0.2, 5))
def test_smooth_l1_between_zero_and_abs_and_symmetric(xs, sigma):
    x = np.array(xs, np.float64)
    loss, grad = smooth_l1(x, np.zeros_like(x), sigma=sigma)
    assert 0 <= loss <= np.abs(x).sum() + 1e-12
    close(smooth_l1(-x, np.zeros_like(x), sigma=sigma)[0], loss, 1e-9, "symmetry")
    assert np.all(np.abs(grad) <= 1 + 1e-12)


# ---- gradients: central finite differences in float64 ----------------------------------------

def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


def test_binary_log_loss_grad_matches_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 12)
    y = rng.integers(-1, 2, 12)
    _, grad = binary_log_loss(x, y)
    close(grad, numeric_grad(lambda v: binary_log_loss(v, y)[0], x), 1e-7, "d loss / d logits")


def test_softmax_cross_entropy_grad_matches_finite_differences():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (5, 4))
    y = np.array([0, 3, -1, 1, 2])
    _, grad = softmax_cross_entropy(z, y)
    close(grad, numeric_grad(lambda v: softmax_cross_entropy(v, y)[0], z), 1e-7, "d loss / d z")


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_smooth_l1_grad_matches_finite_differences(sigma):
    rng = np.random.default_rng(2)
    p = rng.normal(0, 0.5, (6, 4))
    t = rng.normal(0, 0.5, (6, 4))
    w = rng.integers(0, 2, 6).astype(np.float64)
    # keep away from the kink, where the second derivative jumps and differences blur it
    x = p - t
    p = np.where(np.abs(np.abs(x) - 1 / sigma**2) < 1e-3, p + 1e-2, p)
    _, grad = smooth_l1(p, t, sigma=sigma, weights=w)
    num = numeric_grad(lambda v: smooth_l1(v, t, sigma=sigma, weights=w)[0], p)
    close(grad, num, 1e-7, f"d loss / d pred, sigma={sigma}")


def test_rpn_loss_grads_match_finite_differences():
    rng = np.random.default_rng(3)
    a = 10
    logits = rng.normal(0, 2, a)
    labels = rng.integers(-1, 2, a)
    t_pred = rng.normal(0, 0.3, (a, 4))
    t_target = rng.normal(0, 0.3, (a, 4))
    out = rpn_loss(logits, t_pred, labels, t_target, lam=2.0)
    num_l = numeric_grad(lambda v: rpn_loss(v, t_pred, labels, t_target, lam=2.0)["loss"], logits)
    num_t = numeric_grad(lambda v: rpn_loss(logits, v, labels, t_target, lam=2.0)["loss"], t_pred)
    close(out["grad_logits"], num_l, 1e-7, "d L / d logits")
    close(out["grad_t"], num_t, 1e-7, "d L / d t")


# ---- gradients and values against torch.autograd --------------------------------------------

def test_binary_log_loss_matches_torch():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 4, 64)
    y = rng.integers(-1, 2, 64)
    loss, grad = binary_log_loss(x, y)
    xt = torch.tensor(x, requires_grad=True)
    keep = torch.tensor(y >= 0)
    ref = F.binary_cross_entropy_with_logits(xt[keep], torch.tensor(y, dtype=torch.float64)[keep],
                                             reduction="sum")
    ref.backward()
    close(loss, ref.item(), 1e-10, "loss vs torch")
    close(grad, xt.grad.numpy(), 1e-12, "grad vs torch")


def test_softmax_cross_entropy_matches_torch():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 4, (16, 5))
    y = rng.integers(-1, 5, 16)
    loss, grad = softmax_cross_entropy(z, y)
    zt = torch.tensor(z, requires_grad=True)
    ref = F.cross_entropy(zt, torch.tensor(y), reduction="sum", ignore_index=-1)
    ref.backward()
    close(loss, ref.item(), 1e-10, "loss vs torch")
    close(grad, zt.grad.numpy(), 1e-12, "grad vs torch")


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_smooth_l1_matches_torch_with_beta_one_over_sigma_squared(sigma):
    rng = np.random.default_rng(6)
    p = rng.normal(0, 0.6, (20, 4))
    t = rng.normal(0, 0.6, (20, 4))
    w = rng.integers(0, 2, (20, 4)).astype(np.float64)
    loss, grad = smooth_l1(p, t, sigma=sigma, weights=w)
    pt = torch.tensor(p, requires_grad=True)
    ref = (F.smooth_l1_loss(pt, torch.tensor(t), reduction="none", beta=1 / sigma**2)
           * torch.tensor(w)).sum()
    ref.backward()
    close(loss, ref.item(), 1e-10, f"loss vs torch, sigma={sigma}")
    close(grad, pt.grad.numpy(), 1e-12, f"grad vs torch, sigma={sigma}")


@pytest.mark.parametrize("kwargs", [{}, dict(n_cls=256, n_reg=2400, lam=10.0, sigma=1.0)])
def test_rpn_loss_matches_torch(kwargs):
    rng = np.random.default_rng(7)
    a = 50
    logits = rng.normal(0, 2, a)
    labels = rng.integers(-1, 2, a)
    t_pred = rng.normal(0, 0.3, (a, 4))
    t_target = rng.normal(0, 0.3, (a, 4))
    out = rpn_loss(logits, t_pred, labels, t_target, **kwargs)
    lam = kwargs.get("lam", 1.0)
    sigma = kwargs.get("sigma", 3.0)
    sampled = int((labels >= 0).sum())
    n_cls, n_reg = kwargs.get("n_cls", sampled), kwargs.get("n_reg", sampled)
    xt = torch.tensor(logits, requires_grad=True)
    tt = torch.tensor(t_pred, requires_grad=True)
    keep, pos = torch.tensor(labels >= 0), torch.tensor(labels == 1)
    l_cls = F.binary_cross_entropy_with_logits(
        xt[keep], torch.tensor(labels, dtype=torch.float64)[keep], reduction="sum") / n_cls
    l_reg = F.smooth_l1_loss(tt[pos], torch.tensor(t_target)[pos], reduction="sum",
                             beta=1 / sigma**2) / n_reg
    total = l_cls + lam * l_reg                                  # eq. (1)
    total.backward()
    close(out["loss"], total.item(), 1e-10, "loss vs torch")
    close(out["loss_cls"], l_cls.item(), 1e-10, "loss_cls vs torch")
    close(out["loss_reg"], l_reg.item(), 1e-10, "loss_reg vs torch")
    close(out["grad_logits"], xt.grad.numpy(), 1e-12, "grad_logits vs torch")
    close(out["grad_t"], tt.grad.numpy(), 1e-12, "grad_t vs torch")


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: binary_log_loss([[0.0]], [1]), r"logits: expected shape \(N,\)"),
    (lambda: binary_log_loss([0.0, 1.0], [1]), r"labels: expected shape \(2,\)"),
    (lambda: binary_log_loss([np.nan], [1]), "logits: contains NaN or Inf"),
    (lambda: binary_log_loss(np.array([np.inf]), [1]), "logits: contains NaN or Inf"),
    (lambda: binary_log_loss([0.0], [2]), r"labels: expected values in \[-1, 1\], got 2"),
    (lambda: binary_log_loss([0.0], [0.5]), "labels: expected whole numbers"),
    (lambda: binary_log_loss([0.0], [np.nan]), "labels: contains NaN or Inf"),
    (lambda: softmax_cross_entropy([0.0, 1.0], [0]), r"logits: expected shape"),
    (lambda: softmax_cross_entropy([[0.0, 1.0]], [2]), r"labels: expected values in \[-1, 1\]"),
    (lambda: softmax_cross_entropy(np.zeros((1, 0)), [0]), "logits: expected at least one class"),
    (lambda: softmax_cross_entropy([[0.0, np.nan]], [0]), "logits: contains NaN"),
    (lambda: smooth_l1([[0.0] * 4], [[0.0] * 3]), r"target: expected shape \(1, 4\)"),
    (lambda: smooth_l1([[0.0] * 4], [[np.nan] * 4]), "target: contains NaN"),
    (lambda: smooth_l1([[0.0] * 4], [[0.0] * 4], sigma=0), "sigma: expected a positive"),
    (lambda: smooth_l1([[0.0] * 4], [[0.0] * 4], weights=[1.0, 1.0]), r"weights: expected shape"),
    (lambda: smooth_l1([[0.0] * 4], [[0.0] * 4], weights=[-1.0]), "weights: expected non-negative"),
    (lambda: rpn_loss(np.zeros(2), np.zeros((2, 3)), [1, 0], np.zeros((2, 4))),
     r"t_pred: expected shape \(2, 4\)"),
    (lambda: rpn_loss(np.zeros(2), np.zeros((2, 4)), [1, 0], np.zeros((3, 4))),
     r"t_target: expected shape \(2, 4\)"),
    (lambda: rpn_loss(np.zeros(2), np.zeros((2, 4)), [1, 5], np.zeros((2, 4))),
     r"labels: expected values in \[-1, 1\]"),
    (lambda: rpn_loss(np.zeros(2), np.full((2, 4), np.nan), [1, 0], np.zeros((2, 4))),
     "t_pred: contains NaN"),
    (lambda: rpn_loss(np.zeros(2), np.zeros((2, 4)), [1, 0], np.zeros((2, 4)), n_cls=0),
     "n_cls: expected a positive"),
    (lambda: rpn_loss(np.zeros(2), np.zeros((2, 4)), [1, 0], np.zeros((2, 4)), n_reg=-3),
     "n_reg: expected a positive"),
    (lambda: rpn_loss(np.zeros(2), np.zeros((2, 4)), [1, 0], np.zeros((2, 4)), lam=np.nan),
     "lam: expected a non-negative"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: smooth_l1(np.zeros(2), np.zeros(2), sigma="a"), "sigma: expected a positive finite number"),
    (lambda: smooth_l1(np.zeros(2), np.zeros(2), sigma=None), "sigma: expected a positive finite number"),
    (lambda: rpn_loss(np.zeros(2), np.zeros((2, 4)), [1, 0], np.zeros((2, 4)), lam="x"), "lam: expected"),
    (lambda: rpn_loss(np.zeros(2), np.zeros((2, 4)), [1, 0], np.zeros((2, 4)), n_cls="x"), "n_cls: expected"),
    (lambda: binary_log_loss([0.0], ["a"]), "labels: expected whole numbers"),
])
def test_unconvertible_numbers_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sigmoid_and_softmax_are_public_and_shared():
    from frcnn_scratch import losses, roi_head, rpn
    assert rpn.sigmoid is losses.sigmoid and roi_head.softmax is losses.softmax
    np.testing.assert_allclose(losses.sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])
    p = losses.softmax(np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]]))
    np.testing.assert_allclose(p, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-12)
