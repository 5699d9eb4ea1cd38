"""Checkpoints: a model's weights, config and class names in one .npz, and a training run's
state (optimizer, random state, iteration, data identity) beside them, so that a run stopped and
resumed continues as if it had never stopped.

Every file is written through a temporary file, fsync'ed and renamed (`atomic_savez`): a kill or a
power loss leaves the previous checkpoint, never a truncated one.  Nothing is ever unpickled.
"""
import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import asdict

import numpy as np

from .config import Config


# ---- crash-safe files ------------------------------------------------------------------------------


def atomic_savez(path, arrays):
    """np.savez to `path` through a temporary file in the same folder and os.replace.

    A crash or kill mid-write leaves the old file (or none), never a truncated one: the data is
    fsync'ed before the rename and the folder after it, so a power loss cannot leave a renamed but
    empty file either.  The temporary file is named after the checkpoint and the writing process
    (.NAME.tmp-PID-XXXX.npz); those of processes that are gone (a killed run) are removed on the
    next save.  The file gets the permissions the umask gives new files (mkstemp's are 0600).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp-"
    _remove_stale_temporaries(folder, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0o022)      # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:             # a folder that cannot be opened (some platforms): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(folder, prefix):
    """Remove .NAME.tmp-PID-*.npz files left by processes that no longer run."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".npz")):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:             # alive, but another user's
        return True
    return True


def read_npz(path):
    """All arrays of an .npz file as a dict; an unreadable file is one clear ValueError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if not zipfile.is_zipfile(path):                  # np.load would suggest allow_pickle: not helpful
        raise ValueError(f"checkpoint {path!r} is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, ValueError, ...
        raise ValueError(f"checkpoint {path!r} is not a readable .npz file ({type(e).__name__}: {e})") from None


def stored_dict(arrays, key, source):
    """The JSON object saved under `key` of a checkpoint's arrays, as a dict.

    A missing key, text that is not JSON, or JSON that is not an object is one ValueError naming
    `source` (the checkpoint path).
    """
    if key not in arrays:
        raise ValueError(f"{source}: no {key} in the file; not a frcnn checkpoint")
    try:
        value = json.loads(str(arrays[key]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: its {key} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source}: its {key} is JSON but not an object of fields: {value!r:.80}")
    return value


# ---- a model: weights, config, class names ------------------------------------------------------


def model_arrays(model):
    """The arrays a model file holds: every parameter under "param/<name>" and the config as JSON."""
    arrays = {f"param/{k}": v for k, v in model.params().items()}
    arrays["config"] = np.array(json.dumps(model.config.to_dict()))
    arrays["class_names"] = np.array(json.dumps(list(model.class_names)))
    return arrays


def save_model(model, path):
    """Write a model's weights, config and class names to `path` (.npz), atomically."""
    atomic_savez(path, model_arrays(model))


def load_model_arrays(model, arrays, source="checkpoint", strict=True):
    """Copy parameters from `arrays` (as model_arrays writes them) after checking the config.

    strict: every config field must match (resuming a run); else only the fields that make
    the network what it is (not Config.TEST_TIME_FIELDS or Config.TRAINING_FIELDS).
    """
    saved = stored_dict(arrays, "config", source)
    saved = {**Config().to_dict(), **saved}     # files from before a field existed: its default
    mine = json.loads(json.dumps(model.config.to_dict()))
    free = () if strict else Config.TEST_TIME_FIELDS + Config.TRAINING_FIELDS
    differ = sorted(k for k in set(saved) | set(mine)
                    if saved.get(k) != mine.get(k) and k not in free)
    if differ:
        detail = ", ".join(f"{k}: file {saved.get(k)!r} vs model {mine.get(k)!r}" for k in differ[:4])
        raise ValueError(f"{source}: saved with a different config ({detail})")
    for name, param in model.params().items():
        key = f"param/{name}"
        if key not in arrays or arrays[key].shape != param.shape:
            raise ValueError(f"{source}: parameter {name!r} missing or of another shape")
        value = arrays[key]
        if value.dtype != param.dtype:
            raise ValueError(f"{source}: parameter {name!r} is {value.dtype}, not {param.dtype}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{source}: parameter {name!r} holds NaN or Inf")
        param[...] = value


def load_weights(model, path):
    """Load weights saved by `save_model`; refuses a file whose network differs (any config field
    but the test-time and training-only ones)."""
    load_model_arrays(model, read_npz(path), source=f"checkpoint {os.fspath(path)!r}",
                      strict=False)


def load_model(cls, path, backend=None, overrides=None, fast=True):
    """A new model built from the config and class names stored in `path`, with its weights.

    cls: the model class (FasterRCNN); backend, fast: passed to it.
    overrides: dict of Config.TEST_TIME_FIELDS to change (score and NMS thresholds, test-time
        proposal counts, max detections, the input scale); a field that changes the network
        is refused, named.
    """
    arrays = read_npz(path)
    source = f"checkpoint {os.fspath(path)!r}"
    saved = stored_dict(arrays, "config", source)
    overrides = dict(overrides or {})
    fixed = sorted(k for k in overrides if k not in Config.TEST_TIME_FIELDS)
    if fixed:
        raise ValueError(f"--set {', '.join(fixed)}: fixed by the trained network; a trained "
                         f"model can change only {', '.join(Config.TEST_TIME_FIELDS)}")
    try:
        config = Config.from_dict({**saved, **overrides})
    except ValueError as e:                           # names the field; add the file
        raise ValueError(f"{source}: {e}") from None
    names = None
    if "class_names" in arrays:
        try:
            names = json.loads(str(arrays["class_names"]))
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: its class_names are not valid JSON ({e})") from None
        if not isinstance(names, list):
            raise ValueError(f"{source}: its class_names are not a list of names")
    try:
        model = cls(config, backend=backend, class_names=names, fast=fast)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    load_model_arrays(model, arrays, source=source, strict=False)
    return model


# ---- a training run: model + optimizer + rng + iteration ------------------------------------------

# Every TrainConfig field changes what a step does, except checkpoint_every (only when files are
# written): seed (image order, flips, sampling), lr / warmup / final_lr_fraction / iterations (the
# schedule: cosine over `iterations`), momentum / weight_decay (the update), flip (the data).
# `iterations` may differ while every step taken lies in the warmup, where the learning rate does
# not depend on the total (after it, the cosine stretches over the total).
RESUME_MUST_MATCH = ("iterations", "lr", "momentum", "weight_decay", "warmup", "final_lr_fraction",
                     "flip", "seed")


def save_checkpoint(path, model, optimizer, rng, iteration, tcfg, data_id=None):
    """Write everything a resumed run needs into one .npz, atomically.

    data_id: a JSON-able description of the training data (what --data opened, its size, seeds),
        kept so that a resume on other data is refused.
    """
    arrays = model_arrays(model)
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
    load_model_arrays(model, arrays, source=source)
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
