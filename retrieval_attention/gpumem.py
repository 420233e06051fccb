"""How much CUDA memory is left under the process's budget (``torch.cuda.set_per_process_memory_fraction``, as
``--gpu-memory-budget`` sets it, or the card's size), for the parts that size their buffers by it: the
layer-by-layer prefill's hidden states (:mod:`.prefill`) and the background index builds' GPU chunks
(:mod:`.index.roar`)."""

from __future__ import annotations

import torch


def cuda_in_use() -> bool:
    """Whether CUDA is available and this process has initialised it (GPU work may be running; before that there
    is nothing to keep clear of or release, and asking must not create a CUDA context)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _indexed(dev: torch.device | int | str | None) -> torch.device | int | None:
    """``dev`` with its index: a bare ``"cuda"`` means the current device (torch's memory-fraction query refuses a
    device without an index)."""
    if isinstance(dev, str):
        dev = torch.device(dev)
    if isinstance(dev, torch.device) and dev.index is None:
        return torch.cuda.current_device()
    return dev


def cuda_unreserved(dev: torch.device | int | str | None = None) -> int:
    """Bytes the caching allocator can still reserve on CUDA device ``dev``: free device memory and the budget left
    under the process's memory fraction, whichever is smaller."""
    dev = _indexed(dev)
    free, total = torch.cuda.mem_get_info(dev)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(dev) if get_fraction is not None else 1.0
    return max(0, min(free, int(fraction * total) - torch.cuda.memory_reserved(dev)))


def cuda_headroom(dev: torch.device | int | str | None = None) -> int:
    """Bytes still allocatable on CUDA device ``dev``: :func:`cuda_unreserved` plus the allocator's cached free
    blocks (which a stream other than the one that freed them may not be able to use)."""
    dev = _indexed(dev)
    return cuda_unreserved(dev) + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)


#: :func:`release_if_tight` releases the allocator's cached blocks when less than this many bytes are left to reserve
RELEASE_BELOW_BYTES = 4 << 30


def release_if_tight(dev: torch.device | int | None = None) -> bool:
    """After a background job's GPU work (an index build on a CUDA stream of its own): release the caching
    allocator's free blocks when less than :data:`RELEASE_BELOW_BYTES` are left to reserve (the blocks a stream freed
    are reused by that stream only, so a finished build's would stay out of the prefill's reach). Returns whether
    it released; a no-op while the process has not initialised CUDA."""
    if not cuda_in_use():
        return False
    if cuda_unreserved(dev) >= RELEASE_BELOW_BYTES:
        return False
    torch.cuda.current_stream(dev).synchronize()  # the job's kernels are done with its blocks
    torch.cuda.empty_cache()
    return True


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device's queued work: on CUDA through pinned memory
    with a non-blocking copy (from pageable memory CUDA may synchronise the stream first); elsewhere ``t.to``."""
    device = torch.device(device)
    if t.device == device or t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def cuda_alloc_retries(cuda: bool = True) -> int:
    """The CUDA caching allocator's count of allocations it retried after freeing its cached blocks (a full
    device synchronisation each; torch's ``num_alloc_retries``) so far in this process; 0 when ``cuda`` is False
    (torch is then not asked)."""
    if not cuda:
        return 0
    return int(torch.cuda.memory_stats().get("num_alloc_retries", 0))
