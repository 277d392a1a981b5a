"""Keep freed tensor memory inside the process instead of handing it back to the kernel after every use.

PyTorch's CPU tensors come from ``malloc``. glibc serves each block above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` on free, and it trims the
top of its heap back to the kernel; a training step allocates and frees activations and gradients of
tens of MiB each, so the kernel faults in and zeroes the same amount of memory again at every
step. On the 2-core demo machine that was 16-30 % of stage 1's CPU time, all of it *system* time,
and the fix cut stage 1 from 187 s to 147 s (benchmarks/RESULTS.md, "Demo speed"). :func:`retain_freed_memory` turns both off, so freed blocks
are reused by the next step. The cost: the process's resident memory stays at its peak instead of
shrinking between steps (peak RSS measured +4-8 % on stage 1, +20 % on realignment).

Set ``CLIPOPT_RETAIN_FREED_MEMORY=0`` to keep glibc's defaults (e.g. in a long-lived process that
should give memory back between jobs). Only glibc is affected: elsewhere (musl, macOS, Windows) the
call does nothing and returns ``False``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "CLIPOPT_RETAIN_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h> mallopt parameters
_NEVER_TRIM = 2**31 - 1  # bytes of free heap top before glibc trims: an int, so ~2 GiB is the largest


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse: no ``mmap`` per large block, no heap trimming.

    Call once per process, before the heavy work (it is idempotent). Returns ``True`` when the
    settings were applied, ``False`` when the C library is not glibc or ``$CLIPOPT_RETAIN_FREED_MEMORY``
    is ``0``.
    """
    if os.environ.get(ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; both settings are process-wide and affect later allocations only
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
