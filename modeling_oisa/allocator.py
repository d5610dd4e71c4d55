"""
How the C allocator hands memory to a CPU run. glibc serves every block above 32 MiB with its own `mmap` and gives it
back to the system when freed, so the next tensor of that size starts as fresh pages that the kernel zeroes on first
touch. OISA-1B allocates such blocks by the hundred per frame (a 10-frame ViT layer's MLP output alone is 168 MiB in
float32): `reuse_freed_memory` keeps freed memory in the process for the next block instead. Measured on OISA-1B's
vision pass and pixel decoder: 1.2x to 1.3x and 1.2x to 1.6x faster, peak memory 8% to 9% higher
(benchmarks/RESULTS.md).
"""

import ctypes
import logging
import os
import sys


logger = logging.getLogger(__name__)

# mallopt parameters of glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# free memory at the top of the heap kept for reuse before any is given back (the largest value mallopt takes)
TRIM_THRESHOLD_BYTES = 2**31 - 1


def reuse_freed_memory() -> bool:
    """
    Makes glibc's malloc keep freed blocks for reuse: no block gets its own `mmap` (`M_MMAP_MAX` 0), and up to 2 GiB of
    free memory stays in the process (`M_TRIM_THRESHOLD`). A process-wide setting, for the process that runs the model
    (`oisa segment`, `oisa app` and `eval.py` call it); memory in use is unchanged, the process's resident
    size stays near its peak. Returns whether it applied: False, with nothing changed, off Linux, without glibc, or
    where the environment sets `OISA_REUSE_FREED_MEMORY=0` (glibc's defaults kept, say for a process that must give
    memory back between jobs).
    """
    if not sys.platform.startswith("linux") or os.environ.get("OISA_REUSE_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        gnu_get_libc_version = ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError):
        return False  # not glibc (musl has no gnu_get_libc_version)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    gnu_get_libc_version.restype = ctypes.c_char_p
    logger.debug("glibc %s: freed memory kept for reuse: %s", gnu_get_libc_version().decode(), applied)
    return applied
