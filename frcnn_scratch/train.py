"""The training loop: one image per step (the paper's mini-batch), SGD with momentum, a warmup then
cosine learning rate, horizontal flips, a tqdm bar with the four losses, and checkpoints that
resume exactly (model, optimizer, random state and iteration in one .npz).

Same seed, same data, same config -> the same run, bit for bit; a run stopped and resumed from a
checkpoint continues as if it had never stopped.  For that, resuming needs the same TrainConfig as
the checkpoint in every field but checkpoint_every (checkpoint.RESUME_MUST_MATCH).  The total iterations
may change only while every step taken so far lies in the warmup (iteration <= warmup), where the
learning rate does not depend on the total; after that the cosine stretches over the total, so
another --iters would have given the steps already taken other learning rates.
"""
import contextlib
import math
import os

import numpy as np
from tqdm.auto import tqdm

from .checkpoint import hold, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data.transforms import hflip
from .nn import SGD


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


# ---- the loop ----------------------------------------------------------------------------------------

def train(model, samples, tcfg=None, checkpoint=None, resume=False, progress=True, data_id=None):
    """Train `model` on `samples` (dicts with image, boxes, labels), one Trainer.step at a time.

    Args:
        model: a FasterRCNN.
        samples: list of sample dicts (see frcnn_scratch.data), or a data.Dataset.
        tcfg: a TrainConfig (defaults if None).
        checkpoint: path of the checkpoint .npz (written every tcfg.checkpoint_every iterations and
            at the end); None writes none.  The path is held for this run (checkpoint.hold): a
            second run on it at the same time is refused.
        resume: continue from `checkpoint` if it exists.
        progress: show a tqdm bar with the losses and images per second.
        data_id: a description of the data (data_identity), saved in checkpoints; resuming from a
            checkpoint of other data is refused.
    Returns:
        list of per-iteration loss dicts (of this call's iterations).
    """
    trainer = Trainer(model, samples, tcfg, data_id=data_id)
    with contextlib.nullcontext() if checkpoint is None else hold(checkpoint):
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            trainer.resume(checkpoint)
        history = []
        bar = None
        if progress:
            bar = tqdm(total=trainer.tcfg.iterations, initial=trainer.iteration, desc="train",
                       unit="img", dynamic_ncols=True)
        try:
            _loop(trainer, checkpoint, history, bar)
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
