"""Settings of the `frcnn` process itself, which the library leaves to its host.

`frcnn` (cli.main) and the fresh processes of `frcnn bench-model --memory` make them; a program
that imports frcnn_scratch keeps its own.
"""
import ctypes


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for the next allocation instead of handing it back.

    A training step frees and re-allocates the same activation arrays (tens of MB at 480 x 640 and
    up) every step.  By default glibc returns such blocks to the kernel and asks again for fresh,
    zeroed pages, so every step pays page faults, more so with threads faulting at once (figures:
    docs/performance.md).  Kept in the heap, the memory is reused, and the peak is what it was.
    Only a process the command owns does this: a library should leave its host's allocator alone.
    Returns whether the setting took; False where the C library has no mallopt (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3              # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2 << 30))
