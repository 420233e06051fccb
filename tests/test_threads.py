"""``threads.TransientWorkers``: background jobs on threads that exit when idle (freeing their OpenMP teams)."""
import os
import threading
import time

import numpy as np
import pytest

from retrieval_attention.threads import TransientWorkers


def _wait_until(cond, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.005)
    return True


def test_jobs_run_in_order_with_results_and_errors():
    pool = TransientWorkers(1, "t-order")
    seen = []
    futs = [pool.submit(lambda i=i: seen.append(i) or i * i) for i in range(20)]
    bad = pool.submit(lambda: 1 / 0)
    assert [f.result(timeout=10) for f in futs] == [i * i for i in range(20)]
    assert seen == list(range(20))  # one worker: submission order
    with pytest.raises(ZeroDivisionError):
        bad.result(timeout=10)
    assert _wait_until(lambda: pool.alive == 0)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_never_more_than_max_workers_and_none_left_when_idle(workers):
    pool = TransientWorkers(workers, "t-cap")
    lock = threading.Lock()
    running, peak = [0], [0]

    def job():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    before = {t.name for t in threading.enumerate()}
    for f in [pool.submit(job) for _ in range(4 * workers)]:
        f.result(timeout=10)
    assert peak[0] == workers
    assert _wait_until(lambda: pool.alive == 0)
    assert _wait_until(lambda: not any(t.name.startswith("t-cap") for t in threading.enumerate()
                                       if t.name not in before))
    assert pool.submit(lambda: 7).result(timeout=10) == 7  # a new thread starts on demand


def test_rejects_a_bad_worker_count():
    with pytest.raises(ValueError, match="max_workers"):
        TransientWorkers(0, "t-bad")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts OS threads through /proc")
def test_a_parallel_kernels_team_goes_with_its_thread():
    """The point of the class: a thread that ran a parallel numba kernel keeps an OpenMP team of OS threads while
    it lives; once the worker is idle it exits and the process has no more OS threads than before."""
    import numba

    from retrieval_attention.threads import parallel_kernels_concurrent

    if not parallel_kernels_concurrent() or numba.threading_layer() != "omp" or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs numba's omp layer with >= 2 threads")
    from retrieval_attention.index.kernels import choose_threading_layer

    def tasks():
        return len(os.listdir("/proc/self/task"))

    choose_threading_layer()  # the main thread's team exists before the count
    base = tasks()
    gate = threading.Event()
    pool = TransientWorkers(1, "t-team")

    def job():
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # whatever the main thread's count (tests change it)
        choose_threading_layer()  # a parallel launch from the worker thread: it gets its own team
        gate.wait(10)
        return np.int64(1)

    fut = pool.submit(job)
    assert _wait_until(lambda: tasks() >= base + 2)  # the worker and its team (>= 1 more thread)
    gate.set()
    fut.result(timeout=10)
    assert _wait_until(lambda: tasks() == base), (tasks(), base)


def test_background_stream_is_a_no_op_without_cuda(monkeypatch):
    import torch

    from retrieval_attention.threads import background_cuda_stream

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with background_cuda_stream() as s:
        assert s is None
    assert TransientWorkers(1, "t-nocuda").submit(lambda: 3).result(timeout=10) == 3


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_background_jobs_do_not_queue_behind_the_foregrounds_gpu_work():
    """A job's GPU work runs on a stream of its own: its host sync returns while a long kernel queued before it
    on the foreground's default stream is still running (with legacy default-stream semantics it would wait)."""
    import torch

    fg = torch.cuda.current_stream()
    torch.cuda._sleep(1000)  # warm up, then calibrate the busy kernel (cycles per second)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(50_000_000)
    torch.cuda.synchronize()
    cycles = int(50_000_000 * 4.0 / max(time.perf_counter() - t0, 1e-4))  # ~4 s

    def job():
        x = torch.arange(1000, device="cuda", dtype=torch.float32)
        total = float((x * 2).sum().cpu())  # a host sync on the job's stream
        return torch.cuda.current_stream() != fg, total, fg_done.query()

    pool = TransientWorkers(1, "t-stream")
    fg_done = torch.cuda.Event()
    fg_done.record(fg)
    job()  # loads the job's kernels first: with CUDA's lazy module loading, loading one synchronises the context
    pool.submit(job).result(timeout=60)
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    fg_done = torch.cuda.Event()
    fg_done.record(fg)
    other_stream, total, fg_finished_first = pool.submit(job).result(timeout=60)
    torch.cuda.synchronize()
    assert other_stream
    assert total == 999000.0
    assert not fg_finished_first, "the job's sync waited for the foreground's kernel"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_background_streams_are_reused_and_never_shared_at_once():
    import torch

    from retrieval_attention.threads import background_cuda_stream

    with background_cuda_stream() as a, background_cuda_stream() as b:
        assert a is not None and b is not None and a != b
        assert torch.cuda.current_stream() == b
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    with background_cuda_stream() as c:  # an idle one again, not a new stream
        assert c in (a, b)


def test_unknown_stream_priority_is_refused_early():
    from retrieval_attention.threads import background_cuda_stream

    with pytest.raises(ValueError, match="stream priority 'urgent'.*normal, high"):
        TransientWorkers(1, "t-prio", stream_priority="urgent")
    with pytest.raises(ValueError, match="stream priority"):
        with background_cuda_stream("urgent"):
            pass


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_high_priority_background_streams_are_kept_apart_from_normal_ones():
    import torch

    from retrieval_attention.threads import background_cuda_stream

    with background_cuda_stream("normal") as lo:
        pass
    with background_cuda_stream("high") as hi:
        assert torch.cuda.current_stream() == hi
    assert hi != lo
    assert hi.priority < lo.priority  # torch: lower is higher
    with background_cuda_stream("high") as again:
        assert again == hi
    got = TransientWorkers(1, "t-hi", stream_priority="high").submit(lambda: torch.cuda.current_stream().priority)
    assert got.result(timeout=30) == hi.priority
