"""Losses of the paper's eq. (1), each returning (loss, grad) so that backward sits beside forward.

Eq. (1) (section 3.1.2), the RPN's multi-task loss over the anchors i of a mini-batch:

    L({p_i}, {t_i}) = 1/N_cls * sum_i L_cls(p_i, p_i*)  +  lambda * 1/N_reg * sum_i p_i* L_reg(t_i, t_i*)

    p_i     predicted probability that anchor i is an object (here sigmoid of one logit)
    p_i*    its label: 1 positive, 0 negative (anchors labelled -1 are not in the mini-batch)
    t_i     predicted box deltas (tx, ty, tw, th) of eq. (2); t_i* those of the matched ground truth
    L_cls   log loss; L_reg = smooth L1 (defined in Fast R-CNN), counted only for positives

The Fast R-CNN head (section 3.2) uses the same two pieces: a softmax cross-entropy over the
classes and smooth L1 on the per-class deltas of foreground RoIs.

Every function returns the SUM over its elements (the caller normalises) and the gradient of that
sum with respect to the prediction, with the same shape and dtype as the prediction.  The math
runs in float32, or in float64 when the prediction is a float64 array (so that gradients can be
checked by finite differences in float64).  The loss is returned as a Python float.
"""
import numpy as np

from ._checks import as_float_values, as_labels, finite_number, positive_number

__all__ = ["sigmoid", "softmax", "binary_log_loss", "softmax_cross_entropy", "smooth_l1", "rpn_loss"]


# ---- L_cls: log loss ---------------------------------------------------------------------------

def binary_log_loss(logits, labels):
    """Log loss of one logistic output per anchor (the RPN's cls layer as k logistic outputs).

    With p = sigmoid(x) and label y in {0, 1}:  L = -y log p - (1 - y) log(1 - p)
    = softplus(x) - y x, written as max(x, 0) - y x + log(1 + exp(-|x|)) so that no exp
    overflows however large |x| is.  dL/dx = sigmoid(x) - y.

    Args:
        logits: (A,) objectness logits x.
        labels: (A,) in {1 positive, 0 negative, -1 ignored}.
    Returns:
        (loss, grad): loss = SUM of L over the anchors whose label is not -1 (a float);
        grad (A,) = dloss/dlogits, 0 where the label is -1.
    """
    x = as_float_values(logits, "logits", ndim=1)                      # (A,)
    return _binary_log_loss(x, as_labels(labels, "labels", -1, 1, size=len(x)))


def _binary_log_loss(x, y):
    """binary_log_loss of checked logits (A,) and (A,) int64 labels in {1, 0, -1}."""
    counted = y >= 0                                                   # (A,) not ignored
    y = np.where(counted, y, 0).astype(x.dtype)
    per_anchor = np.maximum(x, 0) - y * x + np.log1p(np.exp(-np.abs(x)))   # softplus(x) - y x
    loss = float(np.sum(per_anchor[counted], dtype=np.float64))
    grad = np.where(counted, sigmoid(x) - y, 0).astype(x.dtype)        # (A,)
    return loss, grad


def sigmoid(x):
    """The logistic p = 1 / (1 + exp(-x)) without overflow for any x: exp is only taken of -|x|."""
    e = np.exp(-np.abs(x))                                             # in (0, 1]
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def softmax(logits):
    """Row-wise softmax of (R, C) logits, exp(z - max) / sum exp(z - max) so that no exp overflows."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))             # (R, C), row max is 1
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(logits, labels):
    """Softmax log loss over C classes per row (the Fast R-CNN head's L_cls; class 0 = background).

    L = log(sum_c exp(z_c)) - z_y, with the log-sum-exp taken after subtracting max_c z_c so that
    no exp overflows.  dL/dz = softmax(z) - onehot(y).

    Args:
        logits: (R, C) class scores z.
        labels: (R,) int class index in [0, C), or -1 for a row that is not counted.
    Returns:
        (loss, grad): loss = SUM of L over counted rows (a float); grad (R, C), 0 on rows with -1.
    """
    z = as_float_values(logits, "logits", ndim=2)                      # (R, C)
    num_rows, num_classes = z.shape
    if num_classes == 0:
        raise ValueError("logits: expected at least one class column, got shape (R, 0)")
    return _softmax_cross_entropy(z, as_labels(labels, "labels", -1, num_classes - 1,
                                               size=num_rows))


def _softmax_cross_entropy(z, y):
    """softmax_cross_entropy of checked (R, C) logits and (R,) int64 labels in [-1, C)."""
    counted = y >= 0                                                   # (R,)
    rows = np.arange(len(z))
    shifted = z - z.max(axis=1, keepdims=True)                         # (R, C), row max is 0
    log_sum_exp = np.log(np.exp(shifted).sum(axis=1))                  # (R,) in [0, log C]
    target = shifted[rows, np.where(counted, y, 0)]                    # (R,) z_y - max
    loss = float(np.sum((log_sum_exp - target)[counted], dtype=np.float64))
    grad = softmax(z)                                                  # (R, C)
    grad[rows[counted], y[counted]] -= 1                               # - onehot(y)
    grad[~counted] = 0
    return loss, grad.astype(z.dtype)


# ---- L_reg: smooth L1 --------------------------------------------------------------------------

def smooth_l1(pred, target, sigma=1.0, weights=None):
    """Smooth L1 of Fast R-CNN (eq. 3 there), with py-faster-rcnn's sigma, summed over elements.

    For x = pred - target:   0.5 (sigma x)^2        if |x| < 1 / sigma^2
                             |x| - 0.5 / sigma^2     otherwise
    Both pieces meet at |x| = 1 / sigma^2 with value 0.5 / sigma^2 and slope +-1.  sigma = 1 is
    Fast R-CNN's loss; sigma = 3 (the RPN's) makes the quadratic zone 9 times narrower.  It is
    torch's smooth_l1_loss with beta = 1 / sigma^2.  dL/dpred = sigma^2 x inside, sign(x) outside.

    Args:
        pred: (N, D) or (N,) predictions, e.g. (N, 4) deltas t.
        target: same shape as pred.
        sigma: positive number.
        weights: None (all 1), same shape as pred, or (N,) (one weight per row); non-negative;
            multiplies each element's loss (0 = not counted).
    Returns:
        (loss, grad): loss = SUM of weights * L (a float); grad same shape as pred.
    """
    p = as_float_values(pred, "pred", ndim=np.ndim(pred) if np.ndim(pred) in (1, 2) else 2)
    t = as_float_values(target, "target", ndim=p.ndim).astype(p.dtype)
    if t.shape != p.shape:
        raise ValueError(f"target: expected shape {tuple(p.shape)} like pred, got {tuple(t.shape)}")
    return _smooth_l1(p, t, positive_number(sigma, "sigma"), _weights(weights, p))


def _smooth_l1(p, t, sigma, w):
    """smooth_l1 of checked pred and target (same shape and dtype), sigma, and weights w (None,
    or non-negative and of p's shape and dtype)."""
    if w is None:
        w = np.ones_like(p)
    s2 = sigma * sigma
    x = p - t
    inside = np.abs(x) < 1.0 / s2                                      # the quadratic zone
    per_element = np.where(inside, 0.5 * s2 * x * x, np.abs(x) - 0.5 / s2)
    loss = float(np.sum(w * per_element, dtype=np.float64))
    grad = w * np.where(inside, s2 * x, np.sign(x))
    return loss, grad.astype(p.dtype)


def _weights(weights, p):
    """Per-element weights broadcast to p's shape (None stays None: all 1)."""
    if weights is None:
        return None
    w = as_float_values(weights, "weights", ndim=np.ndim(weights)).astype(p.dtype)
    if w.shape == p.shape[:1] and p.ndim == 2:
        w = np.repeat(w[:, None], p.shape[1], axis=1)                  # (N,) -> (N, D)
    if w.shape != p.shape:
        raise ValueError(f"weights: expected shape {tuple(p.shape)} or ({p.shape[0]},), "
                         f"got {tuple(w.shape)}")
    if np.any(w < 0):
        raise ValueError("weights: expected non-negative values")
    return w


# ---- eq. (1): the RPN loss ---------------------------------------------------------------------

def rpn_loss(logits, t_pred, labels, t_target, n_cls=None, n_reg=None, lam=1.0, sigma=3.0):
    """The RPN's multi-task loss, eq. (1), and its gradients.

        L = 1/N_cls * sum_i L_cls(p_i, p_i*) + lam * 1/N_reg * sum_i p_i* L_reg(t_i, t_i*)

    L_cls is `binary_log_loss` over the sampled anchors (labels 0 or 1); L_reg is `smooth_l1`
    with sigma (3 for the RPN in the paper's code) summed over the 4 deltas, counted only where
    p_i* = 1 (positive anchors).

    Normalisation.  The paper sets N_cls = 256 (the mini-batch size), N_reg ~ 2400 (the number
    of anchor locations of a ~1000x600 image) and lambda = 10, so that the two terms weigh about
    the same, and notes the results are insensitive to lambda over a wide range.  The defaults
    here are those of later implementations: lambda = 1 and N_cls = N_reg = the number of
    sampled anchors (labels >= 0).  The two terms then weigh equally without tuning, and the
    loss does not change with the feature map's size (N_reg = anchor locations would shrink the
    box loss on small images, the ones this project trains on).  Pass n_cls=256, n_reg=2400,
    lam=10 to get the paper's choice.  With no sampled anchor the normaliser is 1 (loss 0).

    Args:
        logits: (A,) objectness logits.
        t_pred: (A, 4) predicted deltas t_i.
        labels: (A,) in {1, 0, -1} (-1: not in the mini-batch).
        t_target: (A, 4) target deltas t_i* (only rows with label 1 are used).
        n_cls, n_reg: positive numbers, or None for the number of sampled anchors.
        lam: lambda >= 0, the weight of the box term.
        sigma: smooth L1 sigma.
    Returns:
        dict(loss=float, loss_cls=float (the first term), loss_reg=float (1/N_reg sum p* L_reg,
        before lambda; loss = loss_cls + lam * loss_reg), grad_logits (A,), grad_t (A, 4)).
    """
    x = as_float_values(logits, "logits", ndim=1)                      # (A,)
    num = len(x)
    t = as_float_values(t_pred, "t_pred", ndim=2)                      # (A, 4)
    t_star = as_float_values(t_target, "t_target", ndim=2)             # (A, 4)
    for name, arr in (("t_pred", t), ("t_target", t_star)):
        if arr.shape != (num, 4):
            raise ValueError(f"{name}: expected shape ({num}, 4) to match logits, got {tuple(arr.shape)}")
    y = as_labels(labels, "labels", -1, 1, size=num)                   # (A,)
    sampled = int(np.count_nonzero(y >= 0))
    return _rpn_loss(x, t, y, t_star, _normaliser(n_cls, "n_cls", sampled),
                     _normaliser(n_reg, "n_reg", sampled), finite_number(lam, "lam", minimum=0),
                     positive_number(sigma, "sigma"))


def _rpn_loss(x, t, y, t_star, n_cls, n_reg, lam, sigma):
    """rpn_loss of checked arrays (logits (A,), t_pred and t_target (A, 4), labels (A,) int64)
    and checked normalisers, lambda and sigma."""
    num = len(x)
    # Only the sampled anchors count (a few hundred of tens of thousands): both sums run over
    # them alone, and every other anchor's gradient is 0.
    sampled_rows = np.flatnonzero(y >= 0)                              # (S,)
    positive_rows = np.flatnonzero(y == 1)                             # p_i* = 1, (P,)
    cls_sum, grad_cls = _binary_log_loss(x[sampled_rows], y[sampled_rows])
    reg_sum, grad_reg = _smooth_l1(t[positive_rows], t_star[positive_rows].astype(t.dtype),
                                   sigma, None)                        # p_i* L_reg, summed
    loss_cls = cls_sum / n_cls
    loss_reg = reg_sum / n_reg
    grad_logits = np.zeros(num, x.dtype)                               # (A,)
    grad_logits[sampled_rows] = grad_cls / n_cls
    grad_t = np.zeros((num, 4), t.dtype)                               # (A, 4)
    grad_t[positive_rows] = grad_reg * (lam / n_reg)
    return dict(loss=loss_cls + lam * loss_reg, loss_cls=loss_cls, loss_reg=loss_reg,
                grad_logits=grad_logits, grad_t=grad_t)


def _normaliser(n, name, sampled):
    """N_cls or N_reg: given, or the number of sampled anchors (at least 1)."""
    if n is None:
        return float(max(sampled, 1))
    return positive_number(n, name)

