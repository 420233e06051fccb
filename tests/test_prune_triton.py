"""The Triton occlusion pruning (index/prune_triton.py) against the torch reference (projection_torch._prune_torch):
on CUDA when there is one, and under Triton's interpreter (numpy, any machine with triton installed) in a
subprocess, since whether Triton interprets is fixed when its kernel is decorated."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from retrieval_attention.index import IndexError_, make_index
from retrieval_attention.index import prune_triton as PT
from retrieval_attention.index.projection_torch import _prune, _prune_torch

HAS_TRITON = not PT.triton_missing()
CUDA = torch.cuda.is_available()


def _case(P, C, n, d, seed, device="cpu"):
    """Random ranked candidates: ``cand [P, C]`` (-1 padded at a random cut per row), squared distances to a random
    pivot that is not among them (+inf at padding), keys ``[n, d]`` with two duplicated rows (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    kh = torch.randn(n, d, generator=g)
    kh[1] = kh[0]
    piv = torch.randint(0, n, (P,), generator=g)
    cand = torch.stack([torch.randperm(n, generator=g)[:C + 1] for _ in range(P)])
    cand = torch.stack([row[row != p][:C] for row, p in zip(cand, piv)])  # the pivot is not its own candidate
    cut = torch.randint(0, C + 1, (P,), generator=g)
    cand[torch.arange(C)[None, :] >= cut[:, None]] = -1
    dpc = ((kh[cand.clamp_min(0)] - kh[piv][:, None]) ** 2).sum(-1)
    dpc = torch.where(cand >= 0, dpc, torch.full_like(dpc, float("inf")))
    order = torch.argsort(dpc, dim=1, stable=True)  # ranked: nearest first, padding last
    cand, dpc = cand.gather(1, order), dpc.gather(1, order)
    return cand.to(device), dpc.to(device), kh.to(device)


@pytest.mark.skipif(not CUDA or not HAS_TRITON, reason="needs CUDA and triton")
@pytest.mark.parametrize("alpha2", [1.0, 1.44])
@pytest.mark.parametrize("P,C,n,d,M", [(3000, 128, 5000, 128, 24), (500, 40, 300, 64, 8), (64, 7, 50, 20, 24)])
def test_triton_prune_matches_the_torch_reference_on_cuda(P, C, n, d, M, alpha2):
    cand, dpc, kh = _case(P, C, n, d, seed=P + C, device="cuda")
    got = PT.prune(cand, dpc, kh, M, alpha2)
    want = _prune_torch(cand, dpc, kh, M, alpha2)
    for warps in (1, 2, 4, 8):
        assert PT.prune(cand, dpc, kh, M, alpha2, num_warps=warps).equal(got)
    assert got.dtype == torch.int32 and got.shape == (P, M)
    same = (got == want).all(1).float().mean().item()
    assert same >= 0.999, same  # rows may differ only where a distance's last float32 bits do
    assert (got >= 0).sum() > 0
    assert _prune(cand, dpc, kh, M, alpha2, prune="auto").equal(got)  # auto takes Triton on CUDA


_INTERPRETED = """
import torch, sys
sys.path.insert(0, {tests!r})
from test_prune_triton import _case
from retrieval_attention.index import prune_triton as PT
from retrieval_attention.index.projection_torch import _prune, _prune_torch
bad = 0
cases = [(24, 30, 80, 16, 6, 1.0, 0), (16, 20, 40, 12, 5, 1.44, 1), (8, 9, 30, 8, 24, 1.0, 2)]
for (P, C, n, d, M, alpha2, seed) in cases:
    cand, dpc, kh = _case(P, C, n, d, seed)
    a = PT.prune(cand, dpc, kh, M, alpha2)
    bad += int((a != _prune_torch(cand, dpc, kh, M, alpha2)).any(1).sum())
    assert PT.prune(cand, dpc, kh, M, alpha2, num_warps=4).equal(a)
    assert _prune(cand, dpc, kh, M, alpha2).equal(a)  # auto: Triton interprets on the CPU
print("rows differing", bad)
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_prune_matches_the_torch_reference_interpreted():
    code = _INTERPRETED.format(tests=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rows differing 0" in out.stdout


def test_auto_prune_is_torch_where_triton_cannot_run():
    cand, dpc, kh = _case(20, 10, 40, 8, seed=3)
    if not PT._interpreting():
        assert not PT.available(torch.device("cpu"))
        assert _prune(cand, dpc, kh, 4, 1.0).equal(_prune_torch(cand, dpc, kh, 4, 1.0))
    with pytest.raises(ValueError, match="prune must be one of auto, torch, triton"):
        _prune(cand, dpc, kh, 4, 1.0, prune="numba")


def test_roar_prune_option_is_checked(monkeypatch):
    with pytest.raises(IndexError_, match="prune must be one of"):
        make_index("roar", prune="cuda")
    monkeypatch.setattr(PT, "triton_missing", lambda: True)
    with pytest.raises(IndexError_, match="prune='triton' needs the triton package"):
        make_index("roar", prune="triton")
    assert make_index("roar", prune="auto").prune == "auto"


def test_warps_per_program_grow_only_with_the_kept_rows():
    """One warp for the default rows (``M`` 24 -> 32 slots of 128 floats: measured fastest); more, in powers of two up
    to 8, only where the kept rows would exceed ``KEPT_FLOATS_PER_THREAD`` registers per thread."""
    assert PT.warps_for(32, 128) == 1 and PT.warps_for(8, 64) == 1 and PT.warps_for(1, 1) == 1
    assert PT.warps_for(64, 128) == PT.warps_for(32, 256) == 2
    assert PT.warps_for(64, 256) == 4 and PT.warps_for(256, 256) == 8 and PT.warps_for(1024, 1024) == 8
    for MB in (1, 8, 32, 64, 128, 256):
        for DB in (16, 64, 128, 256):
            w = PT.warps_for(MB, DB)
            assert w in (1, 2, 4, 8)
            assert MB * DB <= PT.KEPT_FLOATS_PER_THREAD * PT.WARP * w or w == 8
            assert w == 1 or MB * DB > PT.KEPT_FLOATS_PER_THREAD * PT.WARP * (w // 2)


@pytest.mark.skipif(not CUDA or not HAS_TRITON, reason="needs CUDA and triton")
def test_roar_graphs_built_with_triton_and_torch_pruning_agree_on_cuda():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 6000, 64)).astype(np.float32)
    tq = rng.standard_normal((4, 1500, 64)).astype(np.float32)
    a = make_index("roar", prune="triton", projection="torch").build(keys, tq)
    b = make_index("roar", prune="torch", projection="torch").build(keys, tq)
    assert (a._adj == b._adj).all(-1).mean() >= 0.999


def test_auto_prune_falls_back_to_torch_when_triton_fails(monkeypatch):
    """``prune="auto"`` where Triton should run but cannot (e.g. a GPU it cannot compile for): a warning, the torch
    result, and no further Triton tries; ``prune="triton"`` propagates the error."""
    from retrieval_attention.index import projection_torch as P

    cand, dpc, kh = _case(20, 10, 40, 8, seed=5)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(PT, "available", lambda dev: True)
    monkeypatch.setattr(PT, "prune", broken)
    monkeypatch.setattr(P, "_TRITON_FAILED", False)
    with pytest.warns(RuntimeWarning, match="Triton pruning kernel failed.*no kernel image"):
        got = _prune(cand, dpc, kh, 4, 1.0)
    assert got.equal(_prune_torch(cand, dpc, kh, 4, 1.0))
    assert _prune(cand, dpc, kh, 4, 1.0).equal(got) and len(calls) == 1  # off for the process
    with pytest.raises(RuntimeError, match="no kernel image"):
        _prune(cand, dpc, kh, 4, 1.0, prune="triton")
