"""Occlusion pruning of ranked candidates (step 4 of :mod:`.projection_torch`) as one Triton kernel.

:func:`.projection_torch._prune_torch` (the reference) computes every candidate pair's distance (a ``C x C`` Gram
matrix per pivot), stores the occlusion tests as ``[C, P, C + 1]`` booleans (0.5 GiB per 32K pivots at ``C``
128) and then runs the greedy as ``C`` sequential rounds of tensor operations over all pivots: ~400 small kernel
launches per chunk, each queued behind whatever else the GPU runs (the layer-by-layer prefill that the builds
overlap). Here one program per pivot runs the greedy itself: it walks the pivot's candidates in rank order,
holding the kept ones' rows (at most ``M``) in registers, and tests each candidate against those alone
(``<= M`` dot products instead of ``C``). Same decisions as the reference: a candidate is kept unless an earlier
kept one ``r`` has ``alpha^2 d(r, c) < d(pivot, c)`` (float64 comparison when ``alpha != 1``), distances
``|c|^2 + |r|^2 - 2 c.r`` in float32, until ``M`` are kept; they can differ only where a distance's last float32
bits differ with the summation order.

Triton is optional: :func:`available` says whether this kernel can run on a tensor's device (CUDA with Triton
installed, or any device under ``TRITON_INTERPRET=1``, which runs it in numpy for the tests).
"""

from __future__ import annotations

import functools
import os

import torch


#: the candidate count is a compile-time constant of the kernel, padded up to a multiple of this
C_MULTIPLE = 32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_missing() -> bool:
    """Whether the triton package is not installed (its import fails)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return True
    return False


def available(device: torch.device) -> bool:
    """Whether :func:`prune` runs for tensors on ``device``: Triton imports, and the device is CUDA (or Triton
    interprets, on any device)."""
    return (device.type == "cuda" or _interpreting()) and not triton_missing()


@functools.lru_cache(maxsize=2)
def _kernel(interpreting: bool):
    """The jitted kernel (defined on first use: Triton is optional, and whether it interprets is fixed when a
    function is decorated)."""
    import triton
    import triton.language as tl

    @triton.jit
    def prune_kernel(cand_ptr, dpc_ptr, keys_ptr, out_ptr, alpha2, C: tl.constexpr, d: tl.constexpr,
                     DB: tl.constexpr, M: tl.constexpr, MB: tl.constexpr, ALPHA_ONE: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)
        dofs = tl.arange(0, DB)
        dmask = dofs < d
        slots = tl.arange(0, MB)
        kept = tl.zeros([MB, DB], dtype=tl.float32)  # rows of the kept candidates, slot = keep order
        kept_sq = tl.zeros([MB], dtype=tl.float32)
        kept_id = tl.full([MB], -1, dtype=tl.int64)
        nk = tl.zeros([1], dtype=tl.int32)  # kept so far
        for c in range(0, C):
            cid = tl.load(cand_ptr + p * C + c)
            lim = tl.load(dpc_ptr + p * C + c)
            x = tl.load(keys_ptr + tl.maximum(cid, 0) * d + dofs, mask=dmask, other=0.0)
            sq = tl.sum(x * x, axis=0)
            dot = tl.sum(kept * x[None, :], axis=1)
            dist = tl.maximum(sq + kept_sq - 2.0 * dot, 0.0)
            if ALPHA_ONE:
                hit = dist < lim
            else:
                hit = alpha2 * dist.to(tl.float64) < lim.to(tl.float64)
            n_hit = tl.sum((hit & (slots < nk)).to(tl.int32), axis=0)
            keep = (cid >= 0) & (n_hit == 0) & (nk < M)  # [1]
            sel = (slots == nk) & keep
            kept = tl.where(sel[:, None], x[None, :], kept)
            kept_sq = tl.where(sel, sq, kept_sq)
            kept_id = tl.where(sel, cid, kept_id)
            nk += keep.to(tl.int32)
        tl.store(out_ptr + p * M + slots, kept_id.to(tl.int32), mask=slots < M)

    return prune_kernel


#: floats of the kept rows (``MB x DB``) each thread of a program holds at most: :func:`warps_for` adds warps beyond
#: one only when the rows would need more registers than this (a spill to local memory costs more than the
#: cross-warp reductions)
KEPT_FLOATS_PER_THREAD = 128
#: threads per warp
WARP = 32


def warps_for(MB: int, DB: int) -> int:
    """Warps per program for ``MB`` kept rows of ``DB`` floats: the fewest (a power of two, at most 8) that keep
    :data:`KEPT_FLOATS_PER_THREAD` per thread. One program per pivot runs ``C`` sequential steps, each with two
    reductions over the row (``|x|^2`` and the ``<= M`` dot products): within one warp they need no shared-memory
    round trip and barrier per step, and four times as many programs fit an SM to hide the row loads' latency.
    H100, the default ``M`` 24 (``MB`` 32) and ``d`` 128 (one warp), 32,768 pivots x 128 candidates over 131,072
    keys (``docs/bench/scripts/prune_bench.py``, session 22): 4.03 ms with 1 warp, 9.80 ms with 2, 16.97 ms with 4
    (Triton's default, used before), 24.96 ms with 8; torch ops 21.44 ms. Larger rows are not measured."""
    w = 1
    while w < 8 and MB * DB > KEPT_FLOATS_PER_THREAD * WARP * w:
        w *= 2
    return w


def prune(cand: torch.Tensor, dpc: torch.Tensor, keys: torch.Tensor, M: int, alpha2: float,
          num_warps: int | None = None) -> torch.Tensor:
    """Occlusion pruning: ranked candidates ``cand [P, C]`` int64 (-1 = none), their float32 squared distances to
    the pivot ``dpc [P, C]``, keys ``[n, d]`` float32, all on one device -> ``[P, M]`` int32 kept ids in rank
    order, -1 padded (the output of :func:`.projection_torch._prune_torch`). ``num_warps`` per program: any count
    gives the same result; ``None``: :func:`warps_for`. Two variants timed on an H100 gave no gain and were
    removed: loading the next candidate's row while testing the current one (16.63 against 16.67 ms at 4 warps,
    session 20) and stopping a pivot at its first padding entry or at ``M`` kept (4.15 against 4.03 ms at one warp,
    session 22)."""
    P, C = cand.shape
    out = torch.empty((P, M), dtype=torch.int32, device=cand.device)
    if P == 0:
        return out
    if C == 0:
        return out.fill_(-1)
    import triton

    keys = keys.contiguous()
    pad = -C % C_MULTIPLE  # padding columns: never kept, and fewer distinct C to compile for
    if pad:
        cand = torch.nn.functional.pad(cand, (0, pad), value=-1)
        dpc = torch.nn.functional.pad(dpc, (0, pad), value=float("inf"))
    DB, MB = triton.next_power_of_2(keys.shape[1]), triton.next_power_of_2(M)
    kernel = _kernel(_interpreting())
    kernel[(P,)](cand.contiguous(), dpc.contiguous(), keys, out, float(alpha2), C=C + pad, d=keys.shape[1], DB=DB,
                 M=M, MB=MB, ALPHA_ONE=float(alpha2) == 1.0,
                 num_warps=warps_for(MB, DB) if num_warps is None else int(num_warps))
    return out
