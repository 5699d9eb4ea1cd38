"""The training loop: one image per step (the paper's mini-batch), SGD with momentum, a warmup then
cosine learning rate, horizontal flips, a tqdm bar with the four losses, and checkpoints that
resume exactly (model, optimizer, random state and iteration in one .npz).

Same seed, same data, same config -> the same run, bit for bit; a run stopped and resumed from a
checkpoint continues as if it had never stopped.  For that, resuming needs the same TrainConfig as
the checkpoint in every field but checkpoint_every (see RESUME_MUST_MATCH).  The total iterations
may change only while every step taken so far lies in the warmup (iteration <= warmup), where the
learning rate does not depend on the total; after that the cosine stretches over the total, so
another --iters would have given the steps already taken other learning rates.
"""
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from .data.transforms import hflip
from .evaluate import coco_evaluate, evaluate_detections
from .model import atomic_savez, read_npz, stored_dict
from .nn import SGD
from .threads import _openblas_thread_functions, blas_threads, work_threads  # noqa: F401


@dataclass
class TrainConfig:
    """How to train (the model's own choices are in model.Config)."""
    iterations: int = 3000
    lr: float = 0.01                 # peak learning rate (the paper: 0.001 for VGG-16 on VOC)
    momentum: float = 0.9
    weight_decay: float = 1e-4       # paper: 5e-4
    warmup: int = 100                # iterations of linear warmup from lr / 10
    final_lr_fraction: float = 0.02  # cosine decay from lr down to lr * this
    flip: bool = True                # horizontal-flip augmentation, p = 0.5
    seed: int = 0                    # image order, flips, anchor and RoI sampling
    checkpoint_every: int = 500      # iterations between checkpoints (0: only at the end)

    def __post_init__(self):
        for name in ("iterations", "warmup", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"train config.{name}: expected an int >= 0, got {value!r}")
        for name in ("lr", "momentum", "weight_decay", "final_lr_fraction"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"train config.{name}: expected a number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"train config.lr: expected a positive number, got {self.lr!r}")
        if self.momentum >= 1:
            raise ValueError(f"train config.momentum: expected a number in [0, 1), got {self.momentum!r}")
        if self.final_lr_fraction > 1:
            raise ValueError(f"train config.final_lr_fraction: expected a number in [0, 1] (a "
                             f"fraction of lr), got {self.final_lr_fraction!r}")
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ValueError(f"train config.flip: expected True or False, got {self.flip!r}")


# Every TrainConfig field changes what a step does, except checkpoint_every (only when files are
# written): seed (image order, flips, sampling), lr / warmup / final_lr_fraction / iterations (the
# schedule: cosine over `iterations`), momentum / weight_decay (the update), flip (the data).
# `iterations` may differ while the steps taken are all in the warmup (see the module docstring).
RESUME_MUST_MATCH = ("iterations", "lr", "momentum", "weight_decay", "warmup", "final_lr_fraction",
                     "flip", "seed")


def learning_rate(iteration, tcfg):
    """Linear warmup from lr / 10 over `warmup` steps, then cosine decay to lr * final_lr_fraction."""
    if iteration < tcfg.warmup:
        return tcfg.lr * (0.1 + 0.9 * iteration / tcfg.warmup)
    span = max(tcfg.iterations - tcfg.warmup, 1)
    progress = min((iteration - tcfg.warmup) / span, 1.0)
    low = tcfg.lr * tcfg.final_lr_fraction
    return low + 0.5 * (tcfg.lr - low) * (1.0 + math.cos(math.pi * progress))


def training_sample(samples, rng, flip):
    """Draw the next image (uniformly) and flip it with probability 0.5.  Difficult (VOC) and
    crowd (COCO) objects are left out of the targets, as the paper's code does."""
    sample = samples[int(rng.integers(len(samples)))]
    if flip and rng.random() < 0.5:
        sample = hflip(sample)
    difficult = np.asarray(sample.get("difficult", np.zeros(len(sample["labels"]), bool)), bool)
    if difficult.any():
        keep = ~difficult
        sample = dict(sample, boxes=np.asarray(sample["boxes"])[keep],
                      labels=np.asarray(sample["labels"])[keep], difficult=difficult[keep])
    return sample


# ---- one step at a time ------------------------------------------------------------------------------

class Trainer:
    """Training one step at a time, the public step API; `train` is a loop over `step`.

        trainer = Trainer(model, samples, TrainConfig(iterations=1000))
        losses = trainer.step()                    # draw an image, forward, the four losses,
                                                   # backward, one SGD update
        losses = trainer.step(sample, trainable=lambda name: name.startswith("rpn."))
                                                   # a given image; update the RPN only

    A step's learning rate follows the schedule of tcfg (learning_rate) at `iteration`, which each
    step advances; set it to run another schedule.  With `trainable`, the other parameters (and
    their momentum) stay as they are: alternating schedules such as the paper's 4-step training
    (section 3.2) freeze parts this way.

    Args:
        model: a FasterRCNN.
        samples: sample dicts (a list, or a data.Dataset).
        tcfg: a TrainConfig (defaults if None): seed, lr schedule, momentum, weight decay, flips.
    """

    def __init__(self, model, samples, tcfg=None, data_id=None):
        self.tcfg = TrainConfig() if tcfg is None else tcfg
        self.data_id = data_id
        if len(samples) == 0:
            raise ValueError("samples: expected at least one training image")
        self.model, self.samples = model, samples
        self.rng = np.random.default_rng(self.tcfg.seed)
        self.optimizer = SGD(model.params(), lr=self.tcfg.lr, momentum=self.tcfg.momentum,
                             weight_decay=self.tcfg.weight_decay)
        self.iteration = 0

    def next_sample(self):
        """The next training image: drawn uniformly, flipped with p = 0.5 (tcfg.flip)."""
        return training_sample(self.samples, self.rng, self.tcfg.flip)

    def step(self, sample=None, trainable=None, parts=("rpn", "head"), proposals=None):
        """One step on `sample` (default: next_sample()); returns the loss dict of
        FasterRCNN.loss_and_grads.

        trainable: a predicate on parameter names ("backbone...", "rpn...", "head...") choosing
            which to update; None updates all.
        parts, proposals: passed to loss_and_grads (which losses train; fixed proposals)."""
        if sample is None:
            sample = self.next_sample()
        try:
            losses = self.model.loss_and_grads(sample["image"], sample["boxes"], sample["labels"],
                                               self.rng, proposals=proposals, parts=parts)
        except ValueError as e:               # activations or gradients overflowed
            if "NaN or Inf" not in str(e):
                raise
            raise self._diverged(f"non-finite values: {e}") from None
        grads = self.model.grads()                   # finite: loss_and_grads checks them
        if not math.isfinite(losses["loss"]):
            raise self._diverged(f"loss {losses['loss']:.4g}")
        self.optimizer.set_lr(learning_rate(self.iteration, self.tcfg))
        names = None if trainable is None else [k for k in self.model.params() if trainable(k)]
        self.optimizer.step(grads, names=names)
        if not all(np.isfinite(p).all() for p in self.model.params().values()):
            raise self._diverged(f"loss {losses['loss']:.4g}; the update overflowed the weights")
        self.iteration += 1
        return losses

    def _diverged(self, what):
        """The error for a step that went non-finite: no checkpoint is written after it, so the
        last one on disk (finite weights) stays."""
        return RuntimeError(f"training diverged at iteration {self.iteration} ({what}); lower "
                            f"the learning rate (--lr, now {self.tcfg.lr:g})")

    def save(self, path):
        """A checkpoint (weights, optimizer, random state, iteration) that `resume` continues."""
        save_checkpoint(path, self.model, self.optimizer, self.rng, self.iteration, self.tcfg,
                        self.data_id)

    def resume(self, path):
        """Continue from a checkpoint of the same run (the same TrainConfig, see load_checkpoint)."""
        self.iteration = load_checkpoint(path, self.model, self.optimizer, self.rng, self.tcfg,
                                         self.data_id)
        return self.iteration


# ---- BLAS threads ------------------------------------------------------------------------------------

# ---- checkpoints: model + optimizer + rng + iteration ---------------------------------------------

def save_checkpoint(path, model, optimizer, rng, iteration, tcfg, data_id=None):
    """Write everything a resumed run needs into one .npz, atomically.

    data_id: a JSON-able description of the training data (what --data opened, its size, seeds),
        kept so that a resume on other data is refused.
    """
    arrays = model.state_arrays()
    for name, value in optimizer.state_dict().items():
        arrays[f"opt/{name}"] = value
    arrays["iteration"] = np.array(iteration, np.int64)
    arrays["rng_state"] = np.array(json.dumps(rng.bit_generator.state))
    arrays["train_config"] = np.array(json.dumps(asdict(tcfg)))
    arrays["data_identity"] = np.array(json.dumps(data_id))
    atomic_savez(path, arrays)


def data_identity(samples, **described):
    """What training data a run used: the given description (e.g. --data, --split, seeds) plus the
    number of images and a fingerprint of their ids and objects, so another folder, split or
    seed does not pass for the same data."""
    if hasattr(samples, "fingerprint"):
        fingerprint = samples.fingerprint()
    else:
        import hashlib
        digest = hashlib.sha256()
        for r in samples:
            digest.update(f"{r.get('id')}:{len(r['labels'])}:".encode())
            digest.update(np.asarray(r["boxes"], np.float32).tobytes())
        fingerprint = digest.hexdigest()[:16]
    return dict(described, images=len(samples), fingerprint=fingerprint)


def load_checkpoint(path, model, optimizer, rng, tcfg=None, data_id=None):
    """Restore model weights, optimizer state and rng state from `path`; returns the iteration.

    With `tcfg`, the checkpoint's train config must agree with it in every field of
    RESUME_MUST_MATCH (else the resumed run would not be the run that was stopped), `iterations`
    excepted while the checkpoint's iteration is <= warmup + 1 (all steps taken had
    iteration <= warmup, where the schedule ignores the total): a ValueError lists the fields that
    differ.
    """
    arrays = read_npz(path)
    source = f"checkpoint {os.fspath(path)!r}"
    model.load_state_arrays(arrays, source=source)
    if "iteration" not in arrays or "rng_state" not in arrays:
        raise ValueError(f"{source}: holds weights only (no optimizer / rng state); cannot resume")
    iteration = arrays["iteration"]
    if iteration.shape != () or iteration.dtype.kind not in "iu" or int(iteration) < 0:
        raise ValueError(f"{source}: its iteration is not a whole number >= 0 "
                         f"({iteration.dtype} {iteration.shape})")
    if tcfg is not None:
        saved = stored_dict(arrays, "train_config", source)
        mine = json.loads(json.dumps(asdict(tcfg)))
        in_warmup = int(arrays["iteration"]) <= tcfg.warmup + 1      # steps 0 .. warmup taken at most
        differ = [k for k in RESUME_MUST_MATCH if saved.get(k) != mine[k]
                  and not (k == "iterations" and in_warmup)]
        if differ:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in differ)
            raise ValueError(f"{source}: cannot resume exactly with another train config ({detail}); "
                             "use the checkpoint's values, or start a new run without --resume")
    if data_id is not None and "data_identity" in arrays:
        saved_data = json.loads(str(arrays["data_identity"]))
        mine = json.loads(json.dumps(data_id))
        if saved_data is not None and saved_data != mine:
            keys = sorted(set(saved_data) | set(mine))
            detail = ", ".join(f"{k}: checkpoint {saved_data.get(k)!r} vs now {mine.get(k)!r}"
                               for k in keys if saved_data.get(k) != mine.get(k))
            raise ValueError(f"{source}: was trained on other data ({detail}); resume with the "
                             "same --data, --split, --train-images and --data-seed")
    try:
        optimizer.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("opt/")})
    except ValueError as e:
        raise ValueError(f"{source}: optimizer {e}") from None
    try:
        rng.bit_generator.state = json.loads(str(arrays["rng_state"]))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{source}: its random state cannot be restored ({type(e).__name__}: "
                         f"{e})") from None
    return int(iteration)


# ---- the loop ----------------------------------------------------------------------------------------

def train(model, samples, tcfg=None, checkpoint=None, resume=False, progress=True, data_id=None):
    """Train `model` on `samples` (dicts with image, boxes, labels), one Trainer.step at a time.

    Args:
        model: a FasterRCNN.
        samples: list of sample dicts (see frcnn_scratch.data), or a data.Dataset.
        tcfg: a TrainConfig (defaults if None).
        checkpoint: path of the checkpoint .npz (written every tcfg.checkpoint_every iterations and
            at the end); None writes none.
        resume: continue from `checkpoint` if it exists.
        progress: show a tqdm bar with the losses and images per second.
        data_id: a description of the data (data_identity), saved in checkpoints; resuming from a
            checkpoint of other data is refused.
    Returns:
        list of per-iteration loss dicts (of this call's iterations).
    """
    trainer = Trainer(model, samples, tcfg, data_id=data_id)
    tcfg = trainer.tcfg
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        trainer.resume(checkpoint)
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tcfg.iterations, initial=trainer.iteration, desc="train", unit="img",
                   dynamic_ncols=True)
    try:
        _loop(trainer, checkpoint, history, bar)          # threads: model's choice per image
    finally:
        if bar is not None:
            bar.close()
    return history


def _loop(trainer, checkpoint, history, bar):
    """Steps until tcfg.iterations: Trainer.step, checkpoints, the progress bar."""
    tcfg = trainer.tcfg
    while trainer.iteration < tcfg.iterations:
        history.append(trainer.step())
        done = trainer.iteration
        if checkpoint is not None and (done == tcfg.iterations or
                                       (tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0)):
            trainer.save(checkpoint)
        if bar is not None:
            bar.update(1)
            if done % 10 == 0 or done == tcfg.iterations:
                recent = history[-20:]
                bar.set_postfix({k: f"{np.mean([h[k] for h in recent]):.3f}"
                                 for k in ("loss", "rpn_cls", "rpn_reg", "head_cls", "head_reg")},
                                refresh=False)


def ground_truths(samples):
    """The objects of every image, in the image's own pixels: a Dataset's ground_truth(i), or a
    list of samples' boxes, labels and difficult flags."""
    if hasattr(samples, "ground_truth"):
        return [samples.ground_truth(i) for i in range(len(samples))]
    return [dict(boxes=s["boxes"], labels=s["labels"], difficult=s.get("difficult"))
            for s in samples]


def image_ids(samples):
    """The ids a results file uses for the images: a Dataset's, else 1..N."""
    return list(samples.image_ids) if hasattr(samples, "image_ids") else list(range(1, len(samples) + 1))


def detect_all(model, samples, progress=False):
    """model.predict on every sample; boxes mapped back to the image's own pixels (/ its scale)."""
    items = range(len(samples))
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="detect", unit="img", dynamic_ncols=True)
    detections = []
    for i in items:
        sample = samples[i]
        det = model.predict(sample["image"])              # threads: the model's choice per image
        det["boxes"] = (det["boxes"] / np.float32(sample.get("scale", 1.0))).astype(np.float32)
        detections.append(det)
    return detections


def score(detections, samples, num_classes, iou_threshold=0.5):
    """VOC AP at iou_threshold (all-point and the VOC07 11-point) and the COCO metrics.

    Returns:
        dict(mAP, ap, pr, npos: VOC all-point; mAP_07, ap_07: 11-point; coco: coco_evaluate's dict).
    """
    truths = ground_truths(samples)
    voc = evaluate_detections(detections, truths, iou_threshold=iou_threshold,
                              num_classes=num_classes)
    voc07 = evaluate_detections(detections, truths, iou_threshold=iou_threshold,
                                use_07_metric=True, num_classes=num_classes)
    coco = coco_evaluate(detections, truths, num_classes=num_classes, image_ids=image_ids(samples))
    return dict(voc, mAP_07=voc07["mAP"], ap_07=voc07["ap"], coco=coco)


def evaluate(model, samples, iou_threshold=0.5, progress=False):
    """Run the model on every sample and score it (`score`: VOC AP and the COCO metrics).

    Args:
        samples: a list of sample dicts, or a data.Dataset (images at the model's scale; detections
            are scored in each image's own pixels).
    Returns:
        (result dict, detections list in the images' own pixels).
    """
    detections = detect_all(model, samples, progress)
    return score(detections, samples, model.config.num_classes, iou_threshold), detections
