"""The speed work, beside the textbook: the same network and the same training step, faster.

`FasterRCNN(config, fast=True)` (the default) builds its layers from here; `fast=False` builds them
from nn.py and runs model.py's plain step.  Everything here computes what the textbook computes,
and a test pins each piece to its textbook twin:

| piece | what it buys (docs/performance.md) | pinned by (tests/test_fast.py) |
| --- | --- | --- |
| `Conv2d` in bands of rows (conv.py) | columns built and multiplied in cache, never 9x the input in memory | test_banded_conv_equals_the_textbook_conv |
| flat and polyphase layouts (columns.py) | contiguous copies instead of im2col's gathers; the first layer's pool over contiguous planes | test_flat_columns_are_im2cols..., test_polyphase_planes... |
| the bias in the product, the batched weight gradient (columns.py) | one product each way; small weight gradients at full BLAS speed | test_ones_below_puts_a_row_of_ones..., test_conv2d_bias_is_added_once_on_every_path, test_small_weight_gradients_in_runs_of_pixels_equal_the_plain_product |
| `ConvPoolReLU` (conv.py) | each band pooled and rectified in cache; the pool's gradient unpooled band by band | test_conv_pool_relu_equals_the_three_textbook_layers |
| `ReLU`, `MaxPool2d` in blocks (blocks.py) | element-wise passes in cache, shared over threads | test_fast_relu_and_pool_equal_the_textbook... |
| the thread team (threads.py) | independent pieces (bands, blocks) on up to 6 cores (1 for small images), OpenBLAS on one | test_a_training_step_is_bit_identical_on_1_2_and_3_threads |
| the overlapped step (step.py) | anchor labelling beside the backbone, the detector beside the RPN's backward | test_fast_and_textbook_models_agree_at_480x640, test_the_two_sides_of_a_step_draw_from_rng_in_the_same_order_on_any_threads, test_a_failing_step_leaves_no_stage_running_on_another_thread |

Results do not depend on the number of threads (bit for bit: the pieces and the order of every
sum depend on the sizes only).  Against the textbook they differ only in the order of some sums
(the bias inside the product, sums over bands): float32 rounding.
"""
from .. import nn
from . import threads
from .blocks import MaxPool2d, PooledGradient, ReLU
from .conv import BAND_BYTES, Conv2d, ConvPoolReLU, Sequential
from .step import loss_and_grads, predict, preprocess

Linear = nn.Linear          # the heads' fully connected layers: small, the textbook's is as fast

__all__ = ["BAND_BYTES", "Conv2d", "ConvPoolReLU", "Linear", "MaxPool2d", "PooledGradient", "ReLU",
           "Sequential", "backbone", "loss_and_grads", "predict", "preprocess", "threads"]


def backbone(channels, rng):
    """model.backbone's network (conv3x3 + ReLU per entry of `channels`, a 2x2 max pool between
    entries) as fast layers: ConvPoolReLU where a pool follows, then Conv2d + ReLU.  The same
    parameter names and initial weights as the textbook's.  The first conv sends no gradient back
    to the image (need_input_grad=False): nothing learns from it."""
    layers, in_ch = [], 3
    for i, out_ch in enumerate(channels):
        if i < len(channels) - 1:
            layers.append(ConvPoolReLU(in_ch, out_ch, 3, padding=1, rng=rng,
                                       need_input_grad=i > 0, pool=2))
        else:
            layers += [Conv2d(in_ch, out_ch, 3, padding=1, rng=rng, need_input_grad=i > 0),
                       ReLU(inplace=True)]           # its input feeds nothing else
        in_ch = int(out_ch)
    return Sequential(*layers)

