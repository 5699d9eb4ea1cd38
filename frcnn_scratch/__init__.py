"""frcnn-scratch: Faster R-CNN (Ren, He, Girshick, Sun, 2015) in readable NumPy.

    import frcnn_scratch as fr
    fr.ops.box_iou(a, b); fr.set_backend("triton"); model = fr.FasterRCNN(config)
"""
from . import ops
from .config import Config, TrainConfig
from .model import FasterRCNN
from .ops import get_backend, set_backend, use_backend

__all__ = ["ops", "Config", "TrainConfig", "FasterRCNN", "get_backend", "set_backend", "use_backend"]
__version__ = "0.1.0"
