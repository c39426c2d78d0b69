"""Keep freed CPU memory inside the process for reuse instead of handing it back to the OS.

glibc's malloc serves every block over 32 MiB with a fresh ``mmap`` and unmaps it on
``free``. A training step at the paper's sizes allocates and frees hundreds of such blocks
(the discriminator's feature maps are up to 0.5 GB each), so the kernel page-faults and
zeroes them again on every step: on 2 CPU cores the Deep GAN step spent 28 s of system time
out of 43 s of wall time doing that. With mmap off and trimming off, freed blocks stay in
the heap and are reused: 43 -> 26 s per step, no page faults from the third step on, and the
same resident memory step after step (Deep 10.3 GB over steps 2-5, High 2.2 GB over 12
steps; a Deep inference loop 0.8 GB). The cost is that memory freed at the peak is never
returned to the OS before the process exits, and a workload that re-allocates one block
size between small allocations can leave holes it does not reuse; set
``CONCHSHELL_SYSTEM_MALLOC=1`` to keep glibc's defaults.

The effect is process-wide, so only the command-line entry points (training, inference,
evaluation, feature extraction, the benchmark) turn it on; code that imports the library
decides for itself. Other C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt(M_TRIM_THRESHOLD, -1) turns trimming off altogether (mallopt(3)).
NEVER_TRIM = -1
OPT_OUT_VARIABLE = "CONCHSHELL_SYSTEM_MALLOC"

_applied = False


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    # Looked up once: find_library runs ldconfig, and the benchmark asks before every reading.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it, and only glibc's mallopt means this
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS now (glibc ``malloc_trim``); return whether
    any were. Lets a peak-memory reading start from live data while freed memory is kept."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (once per process); return whether it is on.

    Off when the environment sets ``CONCHSHELL_SYSTEM_MALLOC=1``, or on any C library but
    glibc.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT_VARIABLE, "") not in ("", "0"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # Both calls return 1 on success. Without mmap, big blocks come from the heap; without
    # trimming, the heap keeps what is freed at its top.
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    return _applied
