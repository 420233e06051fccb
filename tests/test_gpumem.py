"""GPU memory headroom rules (gpumem.py, roar.first_shrink) on simulated CUDA numbers."""
import pytest
import torch

from retrieval_attention import gpumem
from retrieval_attention.index import roar as R

G = 1 << 30


@pytest.fixture
def fake_cuda(monkeypatch):
    """A 24 GiB budget on a 140 GiB card; ``state`` sets reserved / allocated bytes."""
    state = {"reserved": 17 * G, "allocated": 16 * G, "emptied": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (120 * G, 140 * G))
    def fraction(dev=None):  # as torch's: a device without an index is refused
        if isinstance(dev, torch.device) and dev.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{dev}")
        return 24 / 140

    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", fraction, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: state["allocated"])

    class _Stream:
        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: _Stream())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: state.__setitem__("emptied", state["emptied"] + 1))
    return state


def test_headroom_counts_the_budget_and_cached_blocks(fake_cuda):
    assert gpumem.cuda_unreserved(0) == 7 * G  # 24 - 17 reserved
    assert gpumem.cuda_headroom(0) == 8 * G  # + 1 cached free


def test_headroom_of_a_device_without_index_is_the_current_ones(fake_cuda):
    """A bare ``"cuda"`` (as the index builds name the device) means the current device; the resident keys of a
    build may take a quarter of its headroom."""
    import numpy as np

    assert gpumem.cuda_headroom(torch.device("cuda")) == gpumem.cuda_headroom("cuda") == 8 * G
    keys = np.zeros((2, 10, 4), np.float32)
    assert R.KeysOnDevice(keys, 10, "cuda", False)._room() == R.BUILD_SHARE_OF_HEADROOM * 8 * G


def test_build_chunks_shrink_with_the_headroom(fake_cuda):
    # 8 GiB headroom: a quarter is 2 GiB = two 1 GiB score chunks -> full size
    assert R.first_shrink() == R.SHRINK_STEPS[0]
    fake_cuda["reserved"] = fake_cuda["allocated"] = 21 * G  # 3 GiB left: 0.75 GiB for the stage
    assert R.first_shrink() == 4
    fake_cuda["reserved"] = fake_cuda["allocated"] = 24 * G - (G >> 4)  # almost nothing: the smallest chunks
    assert R.first_shrink() == R.SHRINK_STEPS[-1]


def test_with_smaller_chunks_starts_at_the_first_fitting_step(fake_cuda):
    fake_cuda["reserved"] = fake_cuda["allocated"] = 21 * G
    seen = []

    def stage(shrink=1):
        seen.append(shrink)
        if shrink < 16:
            raise torch.OutOfMemoryError("simulated")
        return shrink

    assert R.with_smaller_chunks(stage) == 16
    assert seen == [4, 16]  # never the full size, then the retry with smaller chunks


def test_chunk_record_counts_stages_shrinks_and_retries(fake_cuda):
    """``chunk_record`` says what ``with_smaller_chunks`` did on its thread: the stages run, the largest divisor
    used and the out-of-memory errors retried; a nested record's counts go to the outer one as well, and nothing
    is recorded outside a record or on another thread."""
    import threading

    def stage(fail_below=1, shrink=1):
        if shrink < fail_below:
            raise torch.OutOfMemoryError("simulated")
        return shrink

    with R.chunk_record() as outer:
        assert R.with_smaller_chunks(stage) == 1
        assert outer == {"calls": 1, "max_shrink": 1, "oom_retries": 0}
        with R.chunk_record() as inner:
            fake_cuda["reserved"] = fake_cuda["allocated"] = 21 * G  # starts at 4
            assert R.with_smaller_chunks(stage, 16) == 16
        t = threading.Thread(target=R.with_smaller_chunks, args=(stage, 16))
        t.start()
        t.join()
    assert inner == {"calls": 1, "max_shrink": 16, "oom_retries": 1}
    assert outer == {"calls": 2, "max_shrink": 16, "oom_retries": 1}
    assert R.with_smaller_chunks(stage) == 4  # no record open: nothing to count, no error
    assert getattr(R._CHUNKS, "record", None) is None


def test_cached_blocks_are_released_only_when_the_budget_is_tight(fake_cuda):
    assert not gpumem.release_if_tight(0)  # 7 GiB left to reserve
    assert fake_cuda["emptied"] == 0
    fake_cuda["reserved"] = 22 * G
    assert gpumem.release_if_tight(0)
    assert fake_cuda["emptied"] == 1


def test_nothing_is_released_or_shrunk_without_cuda_in_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert not gpumem.release_if_tight()
    assert R.first_shrink() == R.SHRINK_STEPS[0]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_to_device_async_copies_the_values(device):
    """``to_device_async``: the same values on the target device (on CUDA through pinned memory, non-blocking),
    a tensor already there unchanged, and the source left as it was."""
    from retrieval_attention.gpumem import to_device_async

    src = torch.arange(1000, dtype=torch.int64) * 3 - 7
    out = to_device_async(src, device)
    assert out.device.type == device and torch.equal(out.cpu(), src) and torch.equal(src[:2], torch.tensor([-7, -4]))
    assert torch.equal(to_device_async(out, device), out)
    f = torch.randn(5, 7, dtype=torch.float64)
    assert torch.equal(to_device_async(f, device).cpu(), f)


def test_allocator_retries_are_read_from_torchs_memory_stats(monkeypatch):
    """``cuda_alloc_retries*`` come from the caching allocator's ``num_alloc_retries`` (0 when it has none yet, and
    without CUDA torch is not asked)."""
    stats = {"num_alloc_retries": 7}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a, **k: stats)
    assert gpumem.cuda_alloc_retries(True) == 7
    stats.clear()
    assert gpumem.cuda_alloc_retries(True) == 0
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a, **k: pytest.fail("asked without CUDA"))
    assert gpumem.cuda_alloc_retries(False) == 0
