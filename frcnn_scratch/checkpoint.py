"""Checkpoints: a model's weights, config and class names in one .npz, and a training run's
state (optimizer, random state, iteration, data identity) beside them, so that a run stopped and
resumed continues as if it had never stopped.

Every file is written through a temporary file, fsync'ed and renamed (`atomic_savez`): a kill or a
power loss leaves the previous checkpoint, never a truncated one.  Nothing is ever unpickled.
"""
import contextlib
import hashlib
import json
import os
import stat
import tempfile
import threading
import zipfile
from collections.abc import Mapping
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
    A symlink is written through (its target gets the new file; the link stays), and a path that
    exists but is not a regular file (a device, a FIFO, a folder) is refused, never replaced.
    """
    path = os.path.realpath(os.fspath(path)) if os.path.islink(path) else os.fspath(path)
    if os.path.lexists(path):
        check_regular_file(path)
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
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:     # a full disk names no file: name it
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise


_held = {}                      # real path -> [thread id, depth]: the paths this process holds
_held_lock = threading.Lock()


@contextlib.contextmanager
def hold(path):
    """Hold `path` for one writer while the block runs: a lock file .NAME.lock beside it (beside
    a symlink's target), created whole (a hard link) holding this process's id.  Another live
    process's lock is refused by name; a lock whose process is gone (a killed run) is stale and
    taken over.  The lock is removed when the block ends.  The thread that holds a path may hold
    it again inside (the command line holds it before it reads data, then train() does);
    another thread of the same process is refused like another run."""
    path = os.path.realpath(os.fspath(path))
    me = threading.get_ident()
    with _held_lock:
        mine = _held.get(path)
        if mine is not None and mine[0] != me:
            raise ValueError(f"checkpoint {path!r} is being written by another thread of this "
                             f"process; wait for it, or choose another --checkpoint")
        if mine is not None:
            mine[1] += 1
    if mine is not None:
        try:
            yield path
        finally:
            with _held_lock:
                mine[1] -= 1
        return
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with _held_lock:                    # two threads of this process: one takes the lock file
        for _ in range(3):
            try:
                _create_with_pid(lock)
            except FileExistsError:
                owner = _lock_owner(lock)
                if owner is not None and owner != os.getpid() and _process_alive(owner):
                    raise ValueError(f"checkpoint {path!r} is being written by another run "
                                     f"(process {owner}, lock {lock}); wait for it, or choose "
                                     f"another --checkpoint") from None
                try:
                    os.remove(lock)                       # stale: its process is gone
                except FileNotFoundError:
                    pass
                continue
            break
        else:
            raise ValueError(f"checkpoint {path!r}: cannot take its lock {lock}")
        _held[path] = [me, 1]
    try:
        yield path
    finally:
        with _held_lock:
            del _held[path]
            if _lock_owner(lock) == os.getpid():
                os.remove(lock)


def _create_with_pid(lock):
    """Create `lock` holding this process's id, whole or not at all (FileExistsError if it
    exists): the id is written to a temporary file first and hard-linked into place, so another
    process never reads an empty lock and takes it for a stale one."""
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(lock)}.", dir=os.path.dirname(lock))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        os.chmod(tmp, 0o644)
        os.link(tmp, lock)                        # atomic, and fails if the lock exists
    finally:
        os.remove(tmp)


def _lock_owner(lock):
    """The process id written in a lock file, or None (unreadable, empty, half-written)."""
    try:
        with open(lock) as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


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


def check_regular_file(path, what="checkpoint"):
    """`path` if it exists and is a regular file (a symlink to one counts): a FIFO would block a
    reader forever, /dev/zero would fill memory, and a device node must never be replaced."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what} {path!r} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise ValueError(f"{what} {path!r} is {kind}")
    return path


# Bytes an array of a checkpoint may hold when its shape is not known in advance (the config,
# class names, random state and train settings are JSON strings of a few kB).
SMALL_ARRAY_BYTES = 1 << 20


class NpzArrays(Mapping):
    """The arrays of an .npz checkpoint, each read only when asked for, never the whole file.

    Before an array is decompressed its header is read and checked: `shapes` (name -> the shape
    the model needs) fixes the shape of those it names, and any other array may hold at most
    SMALL_ARRAY_BYTES; an archive whose member declares more, or is not what it declares, is
    refused by name.  Use as a context manager (or call close()).
    """

    def __init__(self, path, shapes=None):
        self.path = check_regular_file(path)
        self.source = f"checkpoint {self.path!r}"
        self.shapes = dict(shapes or {})
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError):
            raise ValueError(f"{self.source} is not an .npz archive") from None
        self._members = {info.filename[:-4]: info for info in self._zip.infolist()
                         if info.filename.endswith(".npy")}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._zip.close()

    def __iter__(self):
        return iter(self._members)

    def __len__(self):
        return len(self._members)

    def __contains__(self, key):
        return key in self._members

    def __getitem__(self, key):
        if key not in self._members:
            raise KeyError(key)
        info = self._members[key]
        try:
            with self._zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
            self._check_size(key, shape, dtype, info)
            with self._zip.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as e:
            if str(e).startswith(self.source):
                raise
            raise ValueError(f"{self.source} is not a readable .npz file: its {key!r} "
                             f"({type(e).__name__}: {e})") from None

    def _check_size(self, key, shape, dtype, info):
        nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        want = self.shapes.get(key)
        if dtype.hasobject:
            raise ValueError(f"{self.source}: its {key!r} holds Python objects; not a frcnn "
                             f"checkpoint")
        if want is not None and tuple(shape) != tuple(want):
            raise ValueError(f"{self.source}: its {key!r} has shape {tuple(shape)}, the model's "
                             f"is {tuple(want)}")
        if want is None and nbytes > SMALL_ARRAY_BYTES:
            raise ValueError(f"{self.source}: its {key!r} declares {nbytes:,} bytes, more than "
                             f"a checkpoint's {key!r} can hold")
        if nbytes > info.file_size:
            raise ValueError(f"{self.source}: its {key!r} is truncated ({info.file_size:,} of "
                             f"{nbytes:,} bytes)")


def read_npz(path, shapes=None):
    """The arrays of an .npz checkpoint (NpzArrays: each read and size-checked when asked for)."""
    return NpzArrays(path, shapes)


def stored_json(arrays, key, source, kind=dict):
    """The JSON value saved under `key` of a checkpoint's arrays, which must be a `kind` (dict,
    list, ...; None allowed when kind is a tuple holding type(None)).  A missing key, text that
    is not JSON, or JSON of another type is one ValueError naming `source` and the key."""
    if key not in arrays:
        raise ValueError(f"{source}: no {key} in the file; not a frcnn checkpoint")
    value = arrays[key]
    if value.shape != () or value.dtype.kind != "U":
        raise ValueError(f"{source}: its {key} is not a JSON string ({value.dtype} {value.shape})")
    try:
        value = json.loads(str(value))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{source}: its {key} is not valid JSON ({type(e).__name__}: "
                         f"{str(e)[:80]})") from None
    if not isinstance(value, kind):
        words = {dict: "an object", list: "a list", type(None): "null"}
        want = " or ".join(words.get(k, k.__name__) for k in
                           (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{source}: its {key} is JSON but not {want}: {value!r:.80}")
    return value


def stored_dict(arrays, key, source):
    """The JSON object saved under `key` (stored_json with kind=dict)."""
    return stored_json(arrays, key, source, dict)


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
    """Copy parameters from `arrays` (an NpzArrays, as model_arrays writes them) after checking
    the config; each parameter's shape is checked before it is read.

    strict: every config field must match (resuming a run); else only the fields that make
    the network what it is (not Config.TEST_TIME_FIELDS or Config.TRAINING_FIELDS).
    """
    saved = stored_dict(arrays, "config", source)
    defaults = json.loads(json.dumps(Config().to_dict()))   # files from before a field existed
    saved = {**defaults, **saved}
    mine = json.loads(json.dumps(model.config.to_dict()))
    free = () if strict else Config.TEST_TIME_FIELDS + Config.TRAINING_FIELDS
    differ = sorted(k for k in set(saved) | set(mine)
                    if saved.get(k) != mine.get(k) and k not in free)
    if differ:
        detail = ", ".join(f"{k}: file {saved.get(k)!r} vs model {mine.get(k)!r}" for k in differ[:4])
        raise ValueError(f"{source}: saved with a different config ({detail})")
    params = model.params()
    arrays.shapes.update({f"param/{name}": p.shape for name, p in params.items()})
    values = {}
    for name, param in params.items():                  # every one checked before any is copied
        key = f"param/{name}"
        if key not in arrays:
            raise ValueError(f"{source}: parameter {name!r} missing")
        values[name] = value = arrays[key]
        if value.dtype != param.dtype:
            raise ValueError(f"{source}: parameter {name!r} is {value.dtype}, not {param.dtype}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{source}: parameter {name!r} holds NaN or Inf")
    for name, param in params.items():
        param[...] = values[name]


def load_weights(model, path):
    """Load weights saved by `save_model`; refuses a file whose network differs (any config field
    but the test-time and training-only ones)."""
    with read_npz(path) as arrays:
        load_model_arrays(model, arrays, source=arrays.source, strict=False)


def load_model(cls, path, backend=None, overrides=None, fast=True):
    """A new model built from the config and class names stored in `path`, with its weights.

    cls: the model class (FasterRCNN); backend, fast: passed to it.
    overrides: dict of Config.TEST_TIME_FIELDS to change (score and NMS thresholds, test-time
        proposal counts, max detections, the input scale); a field that changes the network
        is refused, named.  A bad value is blamed on --set, a bad stored one on the file.
    """
    overrides = dict(overrides or {})
    fixed = sorted(k for k in overrides if k not in Config.TEST_TIME_FIELDS)
    if fixed:
        raise ValueError(f"--set {', '.join(fixed)}: fixed by the trained network; a trained "
                         f"model can change only {', '.join(Config.TEST_TIME_FIELDS)}")
    with read_npz(path) as arrays:
        source = arrays.source
        saved = stored_dict(arrays, "config", source)
        try:
            config = Config.from_dict(saved)
        except ValueError as e:                           # names the field; add the file
            raise ValueError(f"{source}: {e}") from None
        try:
            config = config.replace(**overrides)
        except ValueError as e:
            raise ValueError(f"--set: {e}") from None
        names = None
        if "class_names" in arrays:
            names = stored_json(arrays, "class_names", source, list)
            if not all(isinstance(n, str) and n.strip() for n in names):
                raise ValueError(f"{source}: its class_names are not a list of non-empty names")
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
    differ.  With `data_id`, the checkpoint's data identity must be the same.
    """
    with read_npz(path) as arrays:                     # the run's checks before any copy
        source = arrays.source
        iteration = checkpoint_iteration(arrays, source)
        check_run(arrays, source, tcfg, data_id, iteration)
        load_model_arrays(model, arrays, source=source)
        arrays.shapes.update({f"opt/velocity.{k}": p.shape for k, p in model.params().items()})
        try:
            optimizer.load_state_dict({k[4:]: arrays[k] for k in arrays if k.startswith("opt/")})
        except ValueError as e:
            raise ValueError(f"{source}: optimizer {e}") from None
        try:
            rng.bit_generator.state = stored_dict(arrays, "rng_state", source)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{source}: its random state cannot be restored ({type(e).__name__}: "
                             f"{e})") from None
    return iteration


def checkpoint_iteration(arrays, source):
    """The iteration a training checkpoint reached (its arrays, an NpzArrays)."""
    if "iteration" not in arrays or "rng_state" not in arrays:
        raise ValueError(f"{source}: holds weights only (no optimizer / rng state); cannot resume")
    iteration = arrays["iteration"]
    if iteration.shape != () or iteration.dtype.kind not in "iu" or int(iteration) < 0:
        raise ValueError(f"{source}: its iteration is not a whole number >= 0 "
                         f"({iteration.dtype} {iteration.shape})")
    return int(iteration)


def check_run(arrays, source, tcfg, data_id, iteration):
    """Refuse to resume a checkpoint with another train config (RESUME_MUST_MATCH) or on other
    data (its data identity); the same checks whether the run is finished or not."""
    if tcfg is not None:
        saved = stored_dict(arrays, "train_config", source)
        mine = json.loads(json.dumps(asdict(tcfg)))
        in_warmup = iteration <= tcfg.warmup + 1          # steps 0 .. warmup taken at most
        differ = [k for k in RESUME_MUST_MATCH if saved.get(k) != mine[k]
                  and not (k == "iterations" and in_warmup)]
        if differ:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in differ)
            raise ValueError(f"{source}: cannot resume exactly with another train config ({detail}); "
                             "use the checkpoint's values, or start a new run without --resume")
    if data_id is not None and "data_identity" in arrays:
        saved_data = stored_json(arrays, "data_identity", source, (dict, type(None)))
        mine = json.loads(json.dumps(data_id))
        if saved_data is not None and saved_data != mine:
            keys = sorted(set(saved_data) | set(mine))
            detail = ", ".join(f"{k}: checkpoint {saved_data.get(k)!r} vs now {mine.get(k)!r}"
                               for k in keys if saved_data.get(k) != mine.get(k))
            raise ValueError(f"{source}: was trained on other data ({detail}); resume with the "
                             "same --data, --split, --train-images and --data-seed")
