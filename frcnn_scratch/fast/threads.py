"""The thread team: how many threads the detector computes with, and how work is shared out.

Small images give small matrices, where threads cost more than they give; large images give
convolutions over hundreds of thousands of pixels, where threads pay, up to a point (Python
threads take turns at the GIL to start and finish each piece).  `work_threads(height, width)`
picks one thread below SMALL_IMAGE_PIXELS and AUTO_MAX_THREADS (or all cores, if fewer) above; the
model's training step and prediction run under `for_image`.

The threads are this module's, not OpenBLAS's: under `for_image` OpenBLAS runs on one thread, and
the layers hand independent pieces of work (a band of output rows of a convolution, a block of
channels of a pooling layer) to `parallel`, a team of `workers()` threads (the caller and its
helpers).  NumPy releases the GIL in its copies, ufuncs and matrix products, so the pieces run at
once, and the copies around the products (im2col, col2im, max pooling, ReLU) are spread over the
cores too, which threads inside OpenBLAS never do.  Each piece writes its own part of the output,
and partial sums are added in a fixed order: the results are the same, bit for bit, whatever the
number of threads (tested).  `background` runs one independent stage beside the others.

The user's setting wins: `set_threads(n)` (the command line's --threads), else OMP_NUM_THREADS or
OPENBLAS_NUM_THREADS in the environment (which also leave OpenBLAS's own count alone).
Measurements behind the constants: docs/performance.md, "Threads".
"""
import concurrent.futures
import contextlib
import os
import queue
import threading

import numpy as np
from threadpoolctl import ThreadpoolController

# Below this many pixels a training step is fastest on one thread.
SMALL_IMAGE_PIXELS = 90_000
# Above it, this many threads at most (or the usable cores, if fewer): with more, pieces of work
# wait on the GIL and on each other more than they compute.
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


# ---- numpy's BLAS threads (threadpoolctl) -----------------------------------------------------

_blas_lock = threading.RLock()
_blas = None                # numpy's BLAS libraries (threadpoolctl), found on first use
_blas_asked = []            # the counts asked for by blas_threads blocks running now, in order
_blas_before = None         # the count before the first of them


def _blas_libraries():
    """threadpoolctl's controller of the BLAS libraries loaded now (numpy's), made once."""
    global _blas
    with _blas_lock:
        if _blas is None:
            _blas = ThreadpoolController().select(user_api="blas")
        return _blas


def blas_thread_count():
    """The thread count numpy's BLAS runs its products on now (None where none is found)."""
    counts = [lib.get_num_threads() for lib in _blas_libraries().lib_controllers]
    return counts[0] if counts else None


def openblas_kernels():
    """The kernels numpy's OpenBLAS runs its matrix products on ("Haswell" for AVX2, "SkylakeX"
    for AVX-512, ...): its own choice for this CPU, or OPENBLAS_CORETYPE's where the environment
    sets it.  None where numpy uses another BLAS."""
    for info in _blas_libraries().info():
        if info.get("internal_api") == "openblas":
            return info.get("architecture")
    return None


def _set_blas_threads(n):
    """Set the count from whichever Python thread calls (under _blas_lock).  threadpoolctl (3.7
    on) lets only the first thread that set OpenBLAS's process-wide count set it again and
    silently ignores the others: a prediction on a second thread then kept OpenBLAS's default
    count, and its sums differed from the same prediction on the main thread.  blas_threads
    already decides who sets what, so each call takes that control first."""
    for lib in _blas_libraries().lib_controllers:
        if lib.get_num_threads() != n:
            release = getattr(type(lib), "clear_controlling_thread", None)
            if release is not None:
                release(force=True)
            lib.set_num_threads(n)


@contextlib.contextmanager
def blas_threads(n=1):
    """Run a block with `n` BLAS threads, then restore the previous count.

    The count is one for the whole process (OpenBLAS has no per-thread setting), so blocks that
    run at once on several Python threads share it: the count of the block begun last holds
    until it ends, and the count from before the first block comes back when the last one ends
    (a block ending while another runs must not change the count under it: that changed the sums
    of a concurrent prediction).  Environment variables act only before numpy is loaded, so this
    calls the library's own setter through threadpoolctl.  It does nothing where the user chose
    (OPENBLAS_NUM_THREADS / OMP_NUM_THREADS) or where no BLAS library is found.
    """
    global _blas_before
    if "OPENBLAS_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in os.environ or \
            not _blas_libraries().lib_controllers:
        yield
        return
    asked = (object(), int(n))
    with _blas_lock:
        if not _blas_asked:
            _blas_before = blas_thread_count()
        _blas_asked.append(asked)
        _set_blas_threads(asked[1])
    try:
        yield
    finally:
        with _blas_lock:
            _blas_asked.remove(asked)
            _set_blas_threads(_blas_asked[-1][1] if _blas_asked else _blas_before)


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
    the caller works instead of waiting (faster than an executor: docs/performance.md).  The items are handed
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
    without that helper, which joins them when fn is done.
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
