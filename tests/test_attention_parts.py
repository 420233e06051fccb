"""The three attention pieces against plain references on fresh random inputs."""

import numpy as np
import pytest
import torch

from retrieval_attention.attention.cpu import retrieved_attention
from retrieval_attention.attention.device import attention_with_lse
from retrieval_attention.attention.merge import merge_partial, merge_reference


def _partial(scores, values):
    lse = torch.logsumexp(scores, -1)
    ok = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(ok, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.where(ok.unsqueeze(-1), (p.unsqueeze(-1) * values).sum(-2), torch.zeros(()))
    return out, lse


@pytest.mark.parametrize("seed", range(6))
def test_merge_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    na, nb, D = (int(x) for x in torch.randint(0, 40, (3,), generator=g))
    D = D + 1
    sa = torch.randn(5, na, generator=g, dtype=torch.float64) * 10
    sb = torch.randn(5, nb, generator=g, dtype=torch.float64) * 10 + 30  # very different magnitudes
    # some -inf scores (masked keys), some fully masked rows
    if na:
        sa[0] = float("-inf")
        sa[1, : na // 2] = float("-inf")
    if nb:
        sb[2] = float("-inf")
    va = torch.randn(5, na, D, generator=g, dtype=torch.float64)
    vb = torch.randn(5, nb, D, generator=g, dtype=torch.float64)
    oa, la = _partial(sa, va)
    ob, lb = _partial(sb, vb)
    out, lse = merge_partial(oa, la, ob, lb)
    ref_out, ref_lse = merge_reference(sa, va, sb, vb)
    assert torch.allclose(out.double(), ref_out, atol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse.double()[fin], ref_lse[fin], rtol=1e-6)


def test_merge_both_empty_is_zero_and_minus_inf():
    o = torch.randn(3, 4)
    l = torch.full((3,), float("-inf"))
    out, lse = merge_partial(o * 0, l, o * 0, l)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out, lse = merge_partial(o, torch.zeros(3), o * 0, l)  # one empty side returns the other
    assert torch.allclose(out, o) and torch.allclose(lse, torch.zeros(3))


@pytest.mark.parametrize("seed", range(4))
def test_device_attention_with_lse_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G, L, S, D = 2, 3, 3, 4, 37, 16
    q = torch.randn(B, Hkv * G, L, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    valid = torch.rand(B, 1, L, S, generator=g) > 0.3
    valid[0, 0, 1] = False  # a fully masked row
    out, lse = attention_with_lse(q, k, v, 0.25, valid)
    kr = k.repeat_interleave(G, 1).double()
    vr = v.repeat_interleave(G, 1).double()
    s = (q.double() @ kr.transpose(-1, -2)) * 0.25
    s = s.masked_fill(~valid, float("-inf"))
    ref_out, ref_lse = _partial(s, vr.unsqueeze(2).expand(B, Hkv * G, L, S, D))
    assert torch.allclose(out.double(), ref_out, atol=1e-5)
    assert torch.isneginf(lse[0, :, 1]).all() and (out[0, :, 1] == 0).all()
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse.double()[fin], ref_lse[fin], atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_retrieved_attention_matches_reference(seed):
    rng = np.random.default_rng(seed)
    Hkv, G, L, N, D, k = 2, 2, 3, 50, 8, 7
    keys = rng.standard_normal((Hkv, N, D)).astype(np.float32)
    vals = torch.from_numpy(rng.standard_normal((Hkv, N, D)).astype(np.float32))
    q = rng.standard_normal((Hkv * G, L, D)).astype(np.float32)
    ids = np.stack([[rng.choice(N, k, replace=False) for _ in range(L)] for _ in range(Hkv * G)])
    ids[0, 0, 3:] = -1  # padding
    ids[1, 1, :] = -1  # nothing retrieved
    kvh = np.arange(Hkv * G) // G
    scores = np.einsum("hld,hlkd->hlk", q, keys[kvh[:, None, None], np.maximum(ids, 0)])
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    v_sel = vals[torch.from_numpy(kvh)[:, None, None], torch.from_numpy(np.maximum(ids, 0))]
    out, lse = retrieved_attention(scores, ids, v_sel, 0.5)
    for h in range(Hkv * G):
        for l in range(L):
            sel = ids[h, l][ids[h, l] >= 0]
            if len(sel) == 0:
                assert torch.isneginf(lse[h, l]) and (out[h, l] == 0).all()
                continue
            s = torch.from_numpy(keys[kvh[h], sel] @ q[h, l]).double() * 0.5
            p = torch.softmax(s, 0)
            ref = (p.unsqueeze(-1) * vals[kvh[h], sel].double()).sum(0)
            assert torch.allclose(out[h, l].double(), ref, atol=1e-5)
            assert abs(lse[h, l].item() - torch.logsumexp(s, 0).item()) < 1e-4
