"""Host arrays backed by transparent huge pages (2 MiB) where the OS offers them.

The decode hot path reads random rows of every layer's keys, values and graph adjacency: at 128K tokens
that is ~25 GB of host memory touched a few KB at a time, so with 4 KiB pages nearly every row read also
misses the TLB and walks the page tables. Linux backs a region with 2 MiB pages when it is advised
``MADV_HUGEPAGE`` before its first touch (hosts whose ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``madvise`` do it only then; ``always`` does it anyway; ``never`` not at all). numpy advises its own large
allocations, but neither numba's nor torch's allocator does, so the big arrays are allocated here.

Set ``RA_HUGE_PAGES=0`` to turn the advice off (A/B measurements).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

import numpy as np

#: arrays smaller than this get no advice (a huge page needs a 2 MiB aligned 2 MiB span inside the array)
HUGE_PAGE_MIN_BYTES = 4 << 20
#: madvise(2) advice value (Linux)
MADV_HUGEPAGE = 14

_libc = None


def huge_pages_enabled() -> bool:
    """Whether arrays made here are advised (Linux, and ``RA_HUGE_PAGES`` is not ``0``)."""
    return sys.platform.startswith("linux") and os.environ.get("RA_HUGE_PAGES", "1") != "0"


def _madvise(addr: int, length: int, advice: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) == 0


def advise_huge(a: np.ndarray) -> np.ndarray:
    """Advise ``MADV_HUGEPAGE`` on the page-aligned span of ``a``'s buffer (effective for pages not yet
    touched); returns ``a``. A no-op for small arrays, off Linux, or when the advice is refused."""
    if not huge_pages_enabled() or a.nbytes < HUGE_PAGE_MIN_BYTES:
        return a
    page = mmap.PAGESIZE
    start = a.__array_interface__["data"][0]
    lo = (start + page - 1) // page * page
    hi = (start + a.nbytes) // page * page
    if hi > lo:
        try:
            _madvise(lo, hi - lo, MADV_HUGEPAGE)
        except (OSError, AttributeError):  # no libc / no madvise: plain pages
            pass
    return a


def huge_empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` advised for huge pages before its first touch."""
    return advise_huge(np.empty(shape, dtype))


def huge_full(shape, fill, dtype) -> np.ndarray:
    """``np.full(shape, fill, dtype)`` on huge pages."""
    a = huge_empty(shape, dtype)
    a.fill(fill)
    return a


def huge_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` on huge pages."""
    out = huge_empty(a.shape, a.dtype)
    out[...] = a
    return out


def huge_tensor(shape, dtype):
    """An uninitialised CPU ``torch.Tensor`` of ``shape`` and ``dtype`` whose storage is a huge-page-advised
    numpy buffer (any torch dtype, bfloat16 included)."""
    import torch

    n = 1
    for s in shape:
        n *= int(s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if n * itemsize < HUGE_PAGE_MIN_BYTES or not huge_pages_enabled():  # small (or empty): torch's own
        return torch.empty(tuple(int(s) for s in shape), dtype=dtype)
    buf = huge_empty(n * itemsize, np.uint8)
    return torch.from_numpy(buf).view(dtype).view(*shape)


def anon_huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory backed by transparent huge pages (``AnonHugePages`` of
    ``/proc/self/smaps_rollup``); None where the OS does not report it."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
