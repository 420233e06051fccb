"""CPU thread hygiene: one place that decides how many threads torch, numba and BLAS/OpenMP use.

Oversubscription (several libraries each starting one thread per core, or parallel jobs without limits)
was measured to slow CPU jobs by more than 20x, so every entry point calls :func:`configure_threads`.
"""

from __future__ import annotations

import os

_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on (respects CPU affinity / cgroup pinning)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_CONFIGURED: int | None = None


def configure_threads(n: int | None = None) -> int:
    """Set torch, numba and BLAS/OpenMP thread counts to ``n`` (default: ``RA_NUM_THREADS`` or all cores).

    Environment variables are only set when absent, so a user's explicit limits win. A call without ``n``
    after an explicit one keeps the explicit count (library code calls it defensively). Returns the count.
    """
    global _CONFIGURED
    if n is None and _CONFIGURED is not None:
        return _CONFIGURED
    if n is None:
        n = int(os.environ.get("RA_NUM_THREADS", 0)) or available_cores()
    n = max(1, int(n))
    for var in _ENV_VARS:
        os.environ.setdefault(var, str(n))
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # numba missing or already-launched pool with a smaller size
        pass
    _CONFIGURED = n
    return n


def parallel_kernels_concurrent() -> bool:
    """Whether numba's threading layer runs parallel kernels launched from several Python threads at once (``omp``,
    ``tbb``: yes; ``workqueue``: no, it aborts). The layer is chosen at the first parallel launch: if none has run
    yet a tiny kernel runs now to make that choice."""
    import numba

    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        pass
    from .index.kernels import choose_threading_layer

    choose_threading_layer()
    return numba.threading_layer() != "workqueue"
