"""How many threads the detector computes with: chosen by the work, the user's choice first.

Small images give small matrices (a 64-channel 12 x 20 map, 64 RoIs), where threads cost more than
they give: a 96 x 160 training step took 0.99 s with two OpenBLAS threads on a busy 2-core machine
and 0.067 s with one.  Large images give convolutions over hundreds of thousands of pixels, where
threads pay, up to a point: Python threads take turns at the GIL to start and finish each piece,
and past about six they wait more than they work (a 600 x 1000 step on a 16-core Xeon: 198-213
ms on 6 threads, 458 on 16).  `work_threads(height, width)` picks one thread below
SMALL_IMAGE_PIXELS and AUTO_MAX_THREADS (or all cores, if fewer) above; the model's training
step and prediction run under `for_image`.

The threads are this module's, not OpenBLAS's: under `for_image` OpenBLAS runs on one thread, and
the layers hand independent pieces of work (a band of output rows of a convolution, a block of
channels of a pooling layer) to `parallel`, a team of `workers()` threads (the caller and its
helpers).  NumPy releases the GIL
in its copies, ufuncs and matrix products, so the pieces run at once, and the copies around the
products (im2col, col2im, max pooling, ReLU) are spread over the cores too, which threads inside
OpenBLAS never do.  Each piece writes its own part of the output, and partial sums are added in a
fixed order: the results are the same, bit for bit, whatever the number of threads (tested).
`background` runs one independent stage beside the others (the training step labels its anchors
while the backbone runs, and runs the detector's side beside the RPN's loss and backward).

The user's setting wins: `set_threads(n)` (the command line's --threads), else OMP_NUM_THREADS or
OPENBLAS_NUM_THREADS in the environment (which also leave OpenBLAS's own count alone).
"""
import concurrent.futures
import contextlib
import ctypes
import functools
import glob
import os
import queue
import threading

import numpy as np

# Below this many pixels a training step is fastest on one thread.  Measured on a 2-core EPYC
# (whole training steps, median of 8, five processes each): 160 x 256 22.4-23.4 ms on one thread
# against 24.2-25.2 on two; 240 x 400 (96k pixels) 42.5-45.4 against 42.1-48.2, and 121 against
# 94-98 ms on 2-6 threads of a 16-core Xeon.
SMALL_IMAGE_PIXELS = 90_000
# Above it, this many threads at most (or the usable cores, if fewer).  More threads lose: a piece
# of work needs the GIL to start and to end, and with many threads they wait on it and on each
# other.  16-core Xeon (H100 host), training step ms on 1/2/3/4/6/8/16 threads, 3 lent machines:
# 600 x 1000 664/362/285/236-288/198-213/221-361/458, 480 x 640 308/229/160/142-172/131-164/
# 134-217/285.  A fourth, on 1/6/8/12/16 threads: 600 x 1000 605/172/192/258/241, 480 x 640
# 354/113/105/105/107.
AUTO_MAX_THREADS = 6
MAX_THREADS = 256

_chosen = None          # the user's thread count (set_threads), None: chosen by the work
_pools = {}                 # thread count -> its pool (background jobs; a region if the team is busy)
_the_team = None            # the helpers of parallel regions (_team)
_pool_lock = threading.Lock()
_local = threading.local()  # per calling thread: `workers` (set by using / for_image), scratch buffers


def usable_cores():
    """Cores this process may run on (its CPU affinity where the OS tells, else os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(n):
    """Fix the thread count for everything that follows (None: chosen by the work again).

    More threads than cores is allowed (up to MAX_THREADS; the results are the same) but slower.
    """
    global _chosen
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_THREADS:
            raise ValueError(f"threads: expected an int in 1..{MAX_THREADS} (this machine has "
                             f"{usable_cores()} usable cores) or None, got {n!r}")
        n = int(n)
    _chosen = n


def user_threads():
    """The user's thread count: set_threads, else OMP_NUM_THREADS / OPENBLAS_NUM_THREADS (a
    positive int), else None."""
    if _chosen is not None:
        return _chosen
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return min(int(value), MAX_THREADS)
    return None


def work_threads(height, width):
    """The threads for a (height, width) image: the user's choice (user_threads), else 1 for
    small images and AUTO_MAX_THREADS (at most the usable cores) for larger ones."""
    chosen = user_threads()
    if chosen is not None:
        return chosen
    if int(height) * int(width) < SMALL_IMAGE_PIXELS:
        return 1
    return max(1, min(usable_cores(), AUTO_MAX_THREADS))


@functools.lru_cache(maxsize=None)
def _openblas_functions(names):
    """The first tuple of functions of `names` (a tuple of tuples of symbol names) that numpy's
    bundled OpenBLAS has all of, or None where it cannot be found.  Looked up once (a folder
    listing and a dlopen: 20 us, paid by every prediction's `for_image` before)."""
    folder = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(folder, "*openblas*")):
        try:
            lib = ctypes.CDLL(path)                 # already loaded by numpy: the same library
        except OSError:
            continue
        for group in names:
            if all(hasattr(lib, name) for name in group):
                return tuple(getattr(lib, name) for name in group)
    return None


def _openblas_thread_functions():
    """(get, set) of numpy's bundled OpenBLAS thread count, or None where it cannot be found."""
    return _openblas_functions((
        ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
        ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
        ("openblas_get_num_threads", "openblas_set_num_threads")))


def openblas_kernels():
    """The kernels numpy's OpenBLAS runs its matrix products on ("Haswell" for AVX2, "SkylakeX"
    for AVX-512, ...): its own choice for this CPU, or OPENBLAS_CORETYPE's where the environment
    sets it.  None where numpy uses another BLAS."""
    found = _openblas_functions((("scipy_openblas_get_corename64_",),
                                 ("scipy_openblas_get_corename",), ("openblas_get_corename",)))
    if found is None:
        return None
    found[0].restype = ctypes.c_char_p
    return found[0]().decode(errors="replace")


@contextlib.contextmanager
def blas_threads(n=1):
    """Run a block with `n` OpenBLAS threads, then restore the previous count.

    Environment variables only act before numpy is loaded, so this calls OpenBLAS's own setter
    (as threadpoolctl does).  It does nothing where the user chose (OPENBLAS_NUM_THREADS /
    OMP_NUM_THREADS) or where numpy uses another BLAS.
    """
    functions = None
    if "OPENBLAS_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        functions = _openblas_thread_functions()
    if functions is None:
        yield
        return
    get, set_ = functions
    previous = get()
    if previous != int(n):
        set_(int(n))
    try:
        yield
    finally:
        if get() != previous:
            set_(previous)


def workers():
    """Threads `parallel` spreads work over now, in the calling thread (1 outside `using` /
    `for_image`; two Python threads running two models each have their own count)."""
    return getattr(_local, "workers", 1)


@contextlib.contextmanager
def using(n):
    """Run a block with `parallel` on `n` threads and OpenBLAS on one (no threads inside threads)."""
    previous = workers()
    _local.workers = max(1, int(n))
    try:
        with blas_threads(1):
            yield
    finally:
        _local.workers = previous


def for_image(height, width):
    """The context the model computes one (height, width) image in: using(work_threads(...))."""
    return using(work_threads(height, width))


def parallel(fn, items):
    """[fn(item) for item in items], on up to workers() threads; results in the items' order.

    The calls must be independent (each writes its own part of an output).  An exception in one
    is raised here (the first item's, when several fail), after every call has ended.
    """
    items, n = list(items), workers()
    if n <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    team = _team()
    if not team.lock.acquire(blocking=False):     # another thread's region holds it: a pool
        return list(_pool(n).map(fn, items))
    try:
        return team.run(fn, items, n)
    finally:
        team.lock.release()


class _Region:
    """One parallel region: [fn(item) for item in items], its items handed out one at a time to
    the threads that work on it (the caller, and up to `seats` helpers)."""

    def __init__(self, fn, items, seats):
        self.fn, self.items, self.seats = fn, items, seats
        self.results, self.errors = [None] * len(items), []
        self._order = iter(range(len(items)))     # next() on it is atomic under the GIL
        self._left = len(items)                   # items not yet ended
        self._lock = threading.Lock()
        self.ended = threading.Event()            # every item has ended
        self.stopped = False                      # Ctrl-C: no more items are taken

    def join(self):
        """A helper's turn: work on the region if it still has a seat for one."""
        with self._lock:
            if self.seats <= 0:
                return
            self.seats -= 1
        self.work()

    def work(self):
        for k in self._order:
            if self.stopped:
                return
            try:
                self.results[k] = self.fn(self.items[k])
            except BaseException as e:            # raised by the caller (run)
                self.errors.append((k, e))
                if not isinstance(e, Exception):
                    self.stopped = True           # Ctrl-C: nobody takes more items
                    return
            finally:
                with self._lock:
                    self._left -= 1
                    if self._left == 0:
                        self.ended.set()


class _Job:
    """A background() call on a helper of the team: .result() waits for it, like a Future's."""

    def __init__(self, fn, args):
        self._fn, self._args = fn, args
        self._value, self._error = None, None
        self.ended = threading.Event()

    def run(self):
        try:
            self._value = self._fn(*self._args)
        except BaseException as e:        # raised where the result is read, as a Future does
            self._error = e
        finally:
            self._fn = self._args = None
            self.ended.set()

    def result(self):
        self.ended.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Done:
    """The result of a call made at once (background() on one thread), read like a Future's."""

    def __init__(self, fn, args):
        self._value, self._error = None, None
        try:
            self._value = fn(*args)
        except Exception as e:            # raised where the result is read, as a Future does
            self._error = e

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


class _Team:
    """Helper threads that work through one list of items together with the caller.

    A parallel region costs one wake-up per helper, not a queued task and a future per item, and
    the caller works instead of waiting (training steps on 4 threads of a 16-core Xeon: 254 against
    276 ms at 600 x 1000, 148 against 188 at 480 x 640, with an executor).  The items are handed
    out one at a time, so a slow item does not hold up the rest, and the caller waits for the items
    to end, not for its helpers to come: a helper busy with a background job (`background`) joins
    the regions that start meanwhile when it is done, and until then the others take its share.
    There is one team; a region on n threads wakes n - 1 of its helpers, and the team grows to the
    largest n asked for (so a program that tries 2, 4 and 8 threads holds 7 helpers, not 11).
    """

    def __init__(self):
        self.lock = threading.Lock()              # one region at a time
        self.queues = []                          # one per helper: wake-ups (None) and jobs
        self._region = None                       # the region running now, if any
        self._grow_lock = threading.Lock()        # (a background job may grow it meanwhile)

    def _grow(self, helpers):
        with self._grow_lock:
            while len(self.queues) < helpers:
                tasks = queue.SimpleQueue()
                self.queues.append(tasks)
                threading.Thread(target=self._helper, args=(tasks,), daemon=True,
                                 name="frcnn-team").start()

    def _helper(self, tasks):
        while True:
            task = tasks.get()
            if task is None:                      # a wake-up: the region running now, if any
                region = self._region
                if region is not None:
                    region.join()
            else:
                task.run()                        # a background job

    def submit(self, job, helper):
        """Run a _Job on helper `helper` (0-based), after what it was given before."""
        self._grow(helper + 1)
        self.queues[helper].put(job)

    def run(self, fn, items, n):
        """[fn(item) for item in items] on n threads: the caller and n - 1 helpers."""
        region = _Region(fn, items, seats=min(n, len(items)) - 1)
        self._grow(n - 1)
        self._region = region
        try:
            for tasks in self.queues[:region.seats]:
                tasks.put(None)
            region.work()                         # the caller is one of the team
            if not region.stopped:
                region.ended.wait()
        except BaseException:
            region.stopped = True                 # Ctrl-C while it waits: helpers take no more
            raise
        finally:
            self._region = None
        if region.errors:
            stop = [e for e in region.errors if not isinstance(e[1], Exception)]   # Ctrl-C first
            raise min(stop or region.errors, key=lambda e: e[0])[1]
        return region.results


def background(fn, *args):
    """Start fn(*args) beside the calling thread's own work; .result() waits for it and returns it
    (or raises its exception).  On one thread (workers() == 1) it runs at once, here.

    For a stage that needs nothing the next stages compute: the training step labels the anchors
    (they need only the boxes and the image size) while the backbone runs, and runs the
    detector's side while the RPN's loss and backward run.  fn runs on the last helper of the
    team that `parallel` wakes on workers() threads (one thread of its own: workers() is 1
    there), so the threads never outnumber workers(): the regions that start while it runs go on
    without that helper, which joins them when fn is done.  (Two cores of an EPYC, 600 x 1000: the
    RPN's side, twice as long as the detector's, ran on one thread beside it and then alone, and
    the two sides took 24-26 ms of a step; with the helper joining, 19-21.  Before that, a pool
    thread beside a team of all the cores: three threads on two cores.)
    """
    n = workers()
    if n <= 1:
        return _Done(fn, args)
    job = _Job(fn, args)
    _team().submit(job, helper=n - 2)
    return job


def wait(job):
    """Wait until a job of background() has ended, whatever its outcome (nothing is raised)."""
    if isinstance(job, _Job):
        job.ended.wait()


def _pool(n):
    """The pool of exactly n threads (made on first use, then kept)."""
    with _pool_lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="frcnn")
        return pool


def _team():
    """The team of helper threads (made on first use, then kept)."""
    global _the_team
    with _pool_lock:
        if _the_team is None:
            _the_team = _Team()
        return _the_team


def _forget_threads():
    """In a forked child only the forking thread exists: the team's helpers and the pools' workers
    are gone, and a region would wait for them forever.  Start afresh there."""
    global _the_team, _pools, _pool_lock
    _the_team, _pools, _pool_lock = None, {}, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)


def scratch(size, dtype, slot="columns"):
    """A reusable 1-D buffer of at least `size` elements for the calling thread (no new pages per
    call: im2col columns are rebuilt band after band into the same memory); one per `slot` name,
    for a piece of work that needs two at once."""
    dtype = np.dtype(dtype)
    key = (dtype.str, slot)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buffer = buffers.get(key)
    if buffer is None or buffer.size < size:
        buffer = buffers[key] = np.empty(int(size), dtype)
    return buffer[:int(size)]


def chunks(n, pieces):
    """Split range(n) into at most `pieces` contiguous (start, stop) ranges of near-equal size."""
    pieces = max(1, min(int(pieces), int(n)))
    bounds = [n * k // pieces for k in range(pieces + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
