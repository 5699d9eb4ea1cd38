"""The layers of the backbone and heads, as a textbook: each backward written right beside its forward.

Faster R-CNN's network is ordinary: 3x3 convolutions with ReLU, 2x2 max pooling, fully connected
layers.  Each layer is a small class in the style of micrograd:

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
keeps nothing for a backward pass.

Checking a backward by finite differences (tests/test_nn.py does this for every layer):

    layer = Conv2d(2, 3, 3, padding=1, rng=0).astype(np.float64)
    x, r = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((1, 3, 5, 5))
    layer.forward(x); dx = layer.backward(r)              # L = sum(y * r), so dL/dy = r
    x[0, 0, 2, 2] += 1e-6; up = (layer.forward(x) * r).sum()
    x[0, 0, 2, 2] -= 2e-6; down = (layer.forward(x) * r).sum()
    (up - down) / 2e-6  # == dx[0, 0, 2, 2] to ~1e-9

This file is the definition.  frcnn_scratch/fast/ computes the same layers faster (bands of rows
that stay in cache, threads) and fuses conv -> max pool -> ReLU into one layer (pooling before the
ReLU is exact: ReLU keeps order, so the max of ReLUs is the ReLU of the max); its tests hold it
equal to these.
"""
import contextlib
import threading

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


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
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def init_weight(shape, fan_in, rng=None, std=None):
    """std None -> he_normal; a number -> N(0, std^2) (the paper code's "gaussian" filler)."""
    if std is None:
        return he_normal(shape, fan_in, rng)
    std = float(std)
    if not np.isfinite(std) or std < 0:
        raise ValueError(f"std: expected a finite number >= 0 or None, got {std}")
    return (np.random.default_rng(rng).standard_normal(shape) * std).astype(np.float32)


# ----------------------------------------------------------------------------- no_grad

_state = threading.local()          # per thread: whether forward passes keep a cache


@contextlib.contextmanager
def no_grad():
    """Forward passes inside this block (on this thread) keep nothing for a backward pass, as
    torch.no_grad: for inference.  A backward after such a forward is refused."""
    previous = grad_enabled()
    _state.grad = False
    try:
        yield
    finally:
        _state.grad = previous


def grad_enabled():
    """False inside no_grad (on this thread), else True."""
    return getattr(_state, "grad", True)


# ----------------------------------------------------------------------------- input checks

def positive_int(value, name):
    """A whole number >= 1 (a channel or feature count); 2.5, (3, 5) or True is a ValueError."""
    if isinstance(value, (bool, np.bool_)) or not np.isscalar(value):
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    try:
        whole = int(value) == value
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return int(value)


def int_pair(value, name, minimum):
    """An int or (h, w) of ints >= minimum -> (h, w); 2.5 or (2, 2, 2) is a ValueError naming it."""
    if np.isscalar(value):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
        whole = all(int(v) == v and not isinstance(v, (bool, np.bool_)) for v in value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: expected an int or (h, w), got {value!r}") from None
    if not whole or h < minimum or w < minimum:
        raise ValueError(f"{name}: expected ints >= {minimum}, got {value!r}")
    return h, w


def float_dtype(x):
    """The dtype a layer without parameters computes in: float64 stays float64, all else float32."""
    return np.float64 if np.asarray(x).dtype == np.float64 else np.float32


def as_input(x, where, dtype, ndim=None, channels=None, finite=True):
    """`x` as a finite `dtype` array of `ndim` dims (and `channels` at axis 1); else a ValueError
    that starts with `where` ("Conv2d x").  finite=False skips the scan for NaN / Inf (for a caller
    that checks values itself, as the detector does at its input, features and gradients)."""
    try:
        x = np.asarray(x).astype(dtype, copy=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected an array of numbers ({e})") from None
    if (ndim is not None and x.ndim != ndim) or (channels is not None and x.shape[1] != channels):
        c = "C" if channels is None else channels
        want = {4: f"(N, {c}, H, W)", 2: f"(N, {'F' if channels is None else channels})"}
        raise ValueError(f"{where}: expected shape {want.get(ndim, f'{ndim}-D')}, "
                         f"got {tuple(x.shape)}")
    if finite and not np.isfinite(x).all():
        raise ValueError(f"{where}: contains NaN or Inf")
    return x


def as_grad(dy, y_shape, dtype, layer, finite=True):
    """The incoming gradient dL/dy, checked against the shape of the forward's output."""
    if y_shape is None:
        raise RuntimeError(no_forward(layer))
    dy = as_input(dy, f"{layer}.backward dy", dtype, finite=finite)
    if dy.shape != tuple(y_shape):
        raise ValueError(f"{layer}.backward dy: expected the forward output's shape "
                         f"{tuple(y_shape)}, got {tuple(dy.shape)}")
    return dy


def no_forward(layer):
    return (f"{layer}.backward called before forward (or after a forward under nn.no_grad, "
            f"which keeps nothing for it)")


# ----------------------------------------------------------------------------- base class

class Module:
    """A layer: forward(x) -> y, backward(dy) -> dx; params / grads dicts of arrays."""

    def __init__(self):
        self.params = {}
        self.grads = {}

    def __call__(self, x):
        return self.forward(x)

    def cached(self):
        """What the last forward kept for backward; a RuntimeError if there is none."""
        if getattr(self, "_cache", None) is None:
            raise RuntimeError(no_forward(type(self).__name__))
        return self._cache

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


# ----------------------------------------------------------------------------- convolution

def conv2d_reference(x, weight, bias, stride=1, padding=0):
    """The definition of a 2-D convolution (cross-correlation, as every framework computes it),
    one output position (i, j) at a time:

        y[n, o, i, j] = b[o] + sum_{c, u, v} W[o, c, u, v] * xp[n, c, i*sh + u, j*sw + v]

    where xp is x zero-padded by `padding`.  Output size: Ho = (H + 2 ph - kh) // sh + 1.
    x (N, C, H, W), weight (O, C, kh, kw), bias (O,) -> y (N, O, Ho, Wo).  Slow: for checking.
    """
    (sh, sw), (ph, pw) = int_pair(stride, "stride", 1), int_pair(padding, "padding", 0)
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, o, ho, wo), np.result_type(x, weight))
    for i in range(ho):
        for j in range(wo):
            window = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]       # (N, C, kh, kw)
            y[:, :, i, j] = np.tensordot(window, weight, axes=([1, 2, 3], [1, 2, 3])) + bias
    return y


def im2col(xp, kh, kw, sh, sw):
    """Every kh x kw window of the padded images xp (N, C, Hp, Wp) as a column:
    cols (N, C*kh*kw, Ho*Wo), column i*Wo + j holding window (i, j) in (c, u, v) order, the order
    of W.reshape(O, C*kh*kw), so that the convolution is one matrix product per image."""
    n, c = xp.shape[:2]
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # (N, C, Ho, Wo, kh, kw)
    ho, wo = win.shape[2:4]
    cols = win.transpose(0, 1, 4, 5, 2, 3)                                   # (N, C, kh, kw, Ho, Wo)
    return cols.reshape(n, c * kh * kw, ho * wo)                             # a copy


def col2im(dcols, xp_shape, kh, kw, sh, sw, ho, wo):
    """The adjoint of im2col: each column value goes back to the pixel it was copied from, and a
    pixel under several windows gets the sum.  dcols (N, C*kh*kw, Ho*Wo) -> dxp (N, C, Hp, Wp)."""
    n, c = xp_shape[:2]
    dcols = dcols.reshape(n, c, kh, kw, ho, wo)
    dxp = np.zeros(xp_shape, dcols.dtype)
    for u in range(kh):                          # offset (u, v) took xp[.., i*sh + u, j*sw + v]
        for v in range(kw):
            dxp[:, :, u:u + sh * ho:sh, v:v + sw * wo:sw] += dcols[:, :, u, v]
    return dxp


class Conv2d(Module):
    """2-D convolution by im2col: y = W2 @ cols + b per image (see conv2d_reference for the sum).

    Args:
        in_ch, out_ch: channels in and out.
        kernel_size, stride, padding: an int or (h, w).
        rng: np.random.Generator (or int seed) for the init of `weight`; bias starts at 0.
        std: None -> He-normal (std = sqrt(2 / (in_ch*kh*kw))); a number -> N(0, std^2), as the
            paper code initialises the RPN's cls and reg layers (0.01).
    Params:
        weight (out_ch, in_ch, kh, kw), bias (out_ch,).
    Memory: forward keeps the columns, kh*kw times the input, for the backward pass.
    """

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, rng=None, std=None):
        super().__init__()
        self.in_ch = positive_int(in_ch, "in_ch")
        self.out_ch = positive_int(out_ch, "out_ch")
        self.kernel_size = int_pair(kernel_size, "kernel_size", 1)
        self.stride = int_pair(stride, "stride", 1)
        self.padding = int_pair(padding, "padding", 0)
        kh, kw = self.kernel_size
        shape = (self.out_ch, self.in_ch, kh, kw)
        self.params["weight"] = init_weight(shape, self.in_ch * kh * kw, rng, std)
        self.params["bias"] = np.zeros(self.out_ch, dtype=np.float32)
        self._cache = None

    def forward(self, x):
        """x (N, in_ch, H, W) -> y (N, out_ch, Ho, Wo)."""
        w, b = self.params["weight"], self.params["bias"]             # (O, C, kh, kw), (O,)
        x = as_input(x, "Conv2d x", w.dtype, ndim=4, channels=self.in_ch)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, _, h, wd = x.shape
        if h + 2 * ph < kh or wd + 2 * pw < kw:
            raise ValueError(f"Conv2d x: padded input {(h + 2 * ph, wd + 2 * pw)} is smaller than "
                             f"the kernel {(kh, kw)}; got x of shape {x.shape}")
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))           # (N, C, Hp, Wp)
        ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
        cols = im2col(xp, kh, kw, sh, sw)                             # (N, K, L)  K = C kh kw
        w2 = w.reshape(self.out_ch, -1)                               # (O, K)
        y = w2 @ cols + b[:, None]                                    # (N, O, L)  L = Ho Wo
        self._cache = (cols, xp.shape, (ho, wo)) if grad_enabled() else None
        return y.reshape(n, self.out_ch, ho, wo)                      # (N, O, Ho, Wo)

    def backward(self, dy):
        """dy (N, out_ch, Ho, Wo) -> dx (N, in_ch, H, W); fills grads weight, bias."""
        w = self.params["weight"]
        cols, xp_shape, (ho, wo) = self.cached()
        dy = as_grad(dy, (len(cols), self.out_ch, ho, wo), w.dtype, "Conv2d")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        dy2 = dy.reshape(len(dy), self.out_ch, ho * wo)               # (N, O, L)
        w2 = w.reshape(self.out_ch, -1)                               # (O, K)
        # y = W2 @ cols + b   =>   dW2 = sum over images of dy @ cols^T,  db = sum of dy,
        #                          dcols = W2^T @ dy, and col2im sends dcols back to the pixels
        dw = (dy2 @ cols.transpose(0, 2, 1)).sum(axis=0)              # (O, K)
        self.grads["weight"] = dw.reshape(w.shape)                    # (O, C, kh, kw)
        self.grads["bias"] = dy.sum(axis=(0, 2, 3))                   # (O,)
        dxp = col2im(w2.T @ dy2, xp_shape, kh, kw, sh, sw, ho, wo)    # (N, C, Hp, Wp)
        return dxp[:, :, ph:xp_shape[2] - ph, pw:xp_shape[3] - pw]    # (N, C, H, W)


# ----------------------------------------------------------------------------- ReLU

class ReLU(Module):
    """y = max(x, 0); dy/dx = 1 where x > 0, else 0 (0 at x = 0, as torch)."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        """x (any shape) -> y (same shape)."""
        x = as_input(x, "ReLU x", float_dtype(x))
        mask = x > 0
        self._cache = mask if grad_enabled() else None
        return np.where(mask, x, x.dtype.type(0))

    def backward(self, dy):
        """dy (same shape as x) -> dx = dy * [x > 0]."""
        mask = self.cached()
        dy = as_grad(dy, mask.shape, float_dtype(dy), "ReLU")
        return np.where(mask, dy, dy.dtype.type(0))


# ----------------------------------------------------------------------------- MaxPool2d

class MaxPool2d(Module):
    """Max over k x k windows taken every `stride` pixels (no padding).

    Output size is floored as in torch: Ho = (H - k) // s + 1; rows and columns that do not fill a
    window are dropped.  Backward routes each dy to the input that was the max of its window (on
    ties, the first max in row-major window order); windows that overlap (s < k) add.

    Args:
        kernel_size, stride: an int or (h, w); stride None is kernel_size, as in torch (the VGG
            pool is 2 x 2 with stride 2).
    """

    def __init__(self, kernel_size=2, stride=None):
        super().__init__()
        self.kernel_size = int_pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else int_pair(stride, "stride", 1)
        self._cache = None

    def forward(self, x):
        """x (N, C, H, W) -> y (N, C, Ho, Wo)."""
        x = as_input(x, "MaxPool2d x", float_dtype(x), ndim=4)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        n, c, h, w = x.shape
        if h < kh or w < kw:
            raise ValueError(f"MaxPool2d x: spatial size {(h, w)} is smaller than the kernel "
                             f"{(kh, kw)}")
        win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # (N, C, Ho, Wo, kh, kw)
        ho, wo = win.shape[2:4]
        win = win.reshape(n, c, ho, wo, kh * kw)                       # a copy
        argmax = win.argmax(axis=-1)                                   # (N, C, Ho, Wo) first max
        y = np.take_along_axis(win, argmax[..., None], axis=-1)[..., 0]
        self._cache = (argmax, x.shape) if grad_enabled() else None
        return y

    def backward(self, dy):
        """dy (N, C, Ho, Wo) -> dx (N, C, H, W), dy sent to each window's argmax."""
        argmax, x_shape = self.cached()
        dy = as_grad(dy, argmax.shape, float_dtype(dy), "MaxPool2d")
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ho, wo = argmax.shape[2:]
        dx = np.zeros(x_shape, dtype=dy.dtype)                         # (N, C, H, W)
        for u in range(kh):      # the windows whose max sat at offset (u, v) pass dy to it
            for v in range(kw):
                routed = np.where(argmax == u * kw + v, dy, dy.dtype.type(0))
                dx[:, :, u:u + sh * ho:sh, v:v + sw * wo:sw] += routed
        return dx


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
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        shape = (self.out_features, self.in_features)
        self.params["weight"] = init_weight(shape, self.in_features, rng, std)
        self.params["bias"] = np.zeros(self.out_features, dtype=np.float32)
        self._cache = None

    def forward(self, x):
        """x (N, in_features) -> y (N, out_features)."""
        w, b = self.params["weight"], self.params["bias"]             # (O, I), (O,)
        x = as_input(x, "Linear x", w.dtype, ndim=2, channels=self.in_features)
        self._cache = x if grad_enabled() else None
        return x @ w.T + b                                            # (N, O)

    def backward(self, dy):
        """dy (N, out_features) -> dx (N, in_features); fills grads weight, bias."""
        w, x = self.params["weight"], self.cached()
        dy = as_grad(dy, (len(x), self.out_features), w.dtype, "Linear")
        self.grads["weight"] = dy.T @ x                                # (O, I)
        self.grads["bias"] = dy.sum(axis=0)                            # (O,)
        return dy @ w                                                  # (N, I)


# ----------------------------------------------------------------------------- Flatten

class Flatten(Module):
    """(N, C, H, W) (or any (N, ...)) -> (N, C*H*W), C-order as torch.flatten(x, 1)."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        """x (N, ...) -> y (N, prod(...))."""
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"Flatten x: expected shape (N, ...), got {tuple(x.shape)}")
        x = as_input(x, "Flatten x", float_dtype(x))
        self._cache = x.shape if grad_enabled() else None
        return x.reshape(len(x), -1)

    def backward(self, dy):
        """dy (N, prod(...)) -> dx (N, ...): the same values, the input's shape."""
        shape = self.cached()
        dy = as_grad(dy, (shape[0], int(np.prod(shape[1:]))), float_dtype(dy), "Flatten")
        return dy.reshape(shape)


# ----------------------------------------------------------------------------- Sequential

class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    params / grads gather the layers' arrays under "<index>.<name>" ("0.weight", "0.bias",
    "3.weight", ...), like torch's nn.Sequential.  They are built on each access and hold the
    layers' own arrays, so an optimizer given `net.params` updates the layers in place.
    """

    def __init__(self, *layers):
        # (no Module.__init__: params and grads are the layers', gathered by the properties below)
        self.layers = list(layers)
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
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
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
            raise ValueError(f"params: expected a non-empty dict name -> array, "
                             f"got {type(params).__name__}")
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

    def step(self, grads, names=None):
        """Update parameters in place from grads (dict with the same keys and shapes).

        names: update only these parameters (the others, and their velocities, stay as they are:
            frozen layers); None updates all.
        """
        for k in self.params if names is None else names:
            p, v = self.params[k], self.velocity[k]
            if k not in grads:
                raise ValueError(f"grads: missing gradient for parameter {k!r}")
            g = np.asarray(grads[k])
            if g.shape != p.shape:
                raise ValueError(f"grads[{k!r}]: expected shape {p.shape}, got {g.shape}")
            if not np.isfinite(g).all():
                raise ValueError(f"grads[{k!r}]: contains NaN or Inf")
            if self.weight_decay > 0 and (self.decay_bias or not k.endswith("bias")):
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
                raise ValueError(f"state[{key!r}]: expected shape {p.shape}, "
                                 f"got {np.shape(state[key])}")
        number = lambda k: _state_number(state, k)                      # noqa: E731
        self.set_lr(number("lr"))
        self.momentum = number("momentum")
        self.weight_decay = number("weight_decay")
        self.decay_bias = bool(number("decay_bias")) if "decay_bias" in state else self.decay_bias
        self.steps = int(number("steps"))
        for k, p in self.params.items():
            self.velocity[k] = np.array(state[f"velocity.{k}"], dtype=p.dtype)


def _state_number(state, key):
    """state[key] as a float, or a ValueError naming the key (a checkpoint may hold anything)."""
    try:
        return float(np.asarray(state[key]).item())
    except (TypeError, ValueError) as e:
        raise ValueError(f"state[{key!r}]: expected a number, got {state[key]!r:.40} ({e})") \
            from None
