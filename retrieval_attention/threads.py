"""CPU thread hygiene: one place that decides how many threads torch, numba and BLAS/OpenMP use.

Oversubscription (several libraries each starting one thread per core, or parallel jobs without limits)
was measured to slow CPU jobs by more than 20x, so every entry point calls :func:`configure_threads`.
"""

from __future__ import annotations

import contextlib
import os
import threading

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


class TransientWorkers:
    """Run jobs on at most ``max_workers`` background threads that exit as soon as no job is queued.

    Background work (index builds, graph insertions) runs numba's parallel kernels, and under the ``omp``
    threading layer a thread that launched one keeps an OpenMP team for as long as it lives. libgomp counts
    the threads of every team: when they outnumber the cores it stops spin-waiting between parallel regions
    (its throttled spin count), so the decode loop's workers fall asleep between layer calls and every call
    pays their wake-up (``docs/bench/scripts/idle_team_wakeup.py``: +56 us before the first worker starts per
    call on the dev VM with one idle pool thread, back to normal once that thread exits). The idle threads of a
    ``ThreadPoolExecutor`` never exit; these do, which frees their teams.

    ``submit(fn, *args, **kwargs)`` returns a :class:`concurrent.futures.Future`. Jobs run in submission order,
    each inside :func:`background_cuda_stream` (its GPU work, if any, does not queue behind the foreground's) of
    ``stream_priority``. At interpreter exit the running jobs finish and the queued ones are cancelled."""

    def __init__(self, max_workers: int, name: str, stream_priority: str = "normal"):
        import collections

        if int(max_workers) < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        check_stream_priority(stream_priority)
        self.max_workers = int(max_workers)
        self.name = name
        self.stream_priority = stream_priority
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._alive = 0  # threads started and not yet returned
        self._started = 0

    @property
    def alive(self) -> int:
        """Worker threads running now (0 when idle: none lingers)."""
        return self._alive

    def submit(self, fn, /, *args, **kwargs):
        from concurrent.futures import Future

        fut: Future = Future()
        with self._lock:
            if _SHUTTING_DOWN:
                raise RuntimeError(f"{self.name}: cannot start background work while the interpreter exits")
            self._queue.append((fut, fn, args, kwargs))
            if self._alive < self.max_workers:
                self._alive += 1
                self._started += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._started}").start()
        return fut

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue or _SHUTTING_DOWN:
                    for fut, *_ in self._queue:  # only at exit: nobody will use their results
                        fut.cancel()
                    self._queue.clear()
                    self._alive -= 1
                    return
                fut, fn, args, kwargs = self._queue.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                with background_cuda_stream(self.stream_priority):
                    result = fn(*args, **kwargs)
                fut.set_result(result)
                del result
            except BaseException as e:  # handed to whoever waits on the future
                fut.set_exception(e)
            del fut, fn, args, kwargs  # drop references (e.g. large arrays) before waiting for the next job


#: idle background streams per (CUDA device, priority), reused by :func:`background_cuda_stream` (as many exist as
#: jobs ever ran at once): the caching allocator keeps a freed block for the stream that used it, so a fresh stream
#: per job would strand each job's cached blocks
_IDLE_STREAMS: dict = {}
_STREAMS_LOCK = threading.Lock()


#: CUDA stream priorities of background work by name (torch: a lower number is a higher priority; values beyond the
#: device's range map to its nearest end). "high": the GPU's block scheduler starts the background kernels' blocks
#: before pending blocks of the foreground's (normal-priority) kernels
STREAM_PRIORITIES = {"normal": 0, "high": -1}


def check_stream_priority(priority: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``priority`` is a key of :data:`STREAM_PRIORITIES`."""
    if priority not in STREAM_PRIORITIES:
        raise ValueError(f"unknown stream priority {priority!r}; choose one of {', '.join(STREAM_PRIORITIES)}")


@contextlib.contextmanager
def background_cuda_stream(priority: str = "normal"):
    """Context manager: the block's CUDA work runs on a background stream of the current device (one not in use
    by another block, non-blocking, of ``priority``: a key of :data:`STREAM_PRIORITIES`), synchronised when the
    block ends. It does nothing without CUDA or while the process has not initialised CUDA (no foreground GPU work
    to keep clear of; a CPU-only run on a GPU host does not pay for a CUDA context). Yields the stream or None.

    For background threads (index builds, graph insertions). A thread's default CUDA stream is the device's
    legacy default stream, shared with the foreground: there every kernel of a build queued behind the layer-by-
    layer prefill's, and each host synchronisation of the build (a result copied back, a ``nonzero``) waited for
    all the prefill work queued before it; in the decode loop an insertion's kNN would delay the step's kernels."""
    import torch

    from .gpumem import cuda_in_use

    check_stream_priority(priority)
    if not cuda_in_use():
        yield None
        return
    key = (torch.cuda.current_device(), priority)
    with _STREAMS_LOCK:
        idle = _IDLE_STREAMS.setdefault(key, [])
        stream = idle.pop() if idle else None
    if stream is None:
        stream = torch.cuda.Stream(key[0], priority=STREAM_PRIORITIES[priority])
    try:
        with torch.cuda.stream(stream):
            yield stream
    finally:
        stream.synchronize()
        with _STREAMS_LOCK:
            _IDLE_STREAMS[key].append(stream)


_SHUTTING_DOWN = False


def _on_exit() -> None:
    global _SHUTTING_DOWN
    _SHUTTING_DOWN = True


try:  # runs before non-daemon threads are joined (as concurrent.futures does), so queued jobs are dropped
    import threading as _threading

    _threading._register_atexit(_on_exit)
except (AttributeError, RuntimeError):  # pragma: no cover - other interpreters / already exiting
    pass
