"""The residual estimate (attention mass of the keys retrieval did not return): compiled kernel vs the numpy
reference, exactness for small stores, unbiasedness, determinism."""

import numpy as np
import pytest

from retrieval_attention.attention.residual import estimate_residual, residual_attention_ref
from retrieval_attention.index.bf16 import bf16_bits_to_f32, f32_to_bf16_bits


def _data(seed, Hkv=2, G=3, L=2, D=16, n=400, k=20):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((Hkv, n + 7, D)).astype(np.float32)  # rows past n must never be read
    vals = rng.standard_normal((Hkv, n + 7, D + 4)).astype(np.float32)
    keys[:, n:] = np.nan
    vals[:, n:] = np.nan
    q = rng.standard_normal((Hkv * G, L, D)).astype(np.float32)
    kvh = np.arange(Hkv * G) // G
    top = np.stack([[rng.choice(n, k, replace=False) for _ in range(L)] for _ in range(Hkv * G)]).astype(np.int64)
    top[0, 0, -3:] = -1  # padding of a short result list
    return keys, vals, q, kvh, top, n


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("m", [8, 50])
def test_kernel_matches_reference(bf16, m):
    for seed in range(3):
        keys, vals, q, kvh, top, n = _data(seed)
        if bf16:
            keys, vals = f32_to_bf16_bits(np.nan_to_num(keys)), f32_to_bf16_bits(np.nan_to_num(vals))
        o, l = estimate_residual(keys, vals, q, kvh, top, n, m, 0.3, seed=seed)
        o2, l2 = residual_attention_ref(keys, vals, q, kvh, top, n, m, 0.3, seed)
        np.testing.assert_allclose(o, o2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(l, l2, rtol=1e-5, atol=1e-5)
        assert np.isfinite(o).all() and np.isfinite(l).all()


def _exact_residual(keys, vals, q, kvh, top, n, scaling):
    s = np.einsum("hld,hnd->hln", q.astype(np.float64), keys[kvh, :n].astype(np.float64)) * scaling
    keep = np.ones_like(s, bool)
    for h in range(q.shape[0]):
        for i in range(q.shape[1]):
            keep[h, i, top[h, i][top[h, i] >= 0]] = False
    w = np.where(keep, np.exp(s), 0.0)
    out = np.einsum("hln,hnd->hld", w, vals[kvh, :n].astype(np.float64)) / w.sum(-1, keepdims=True)
    return out, np.log(w.sum(-1))


def test_small_store_is_exact():
    """n <= k + m: every non-retrieved key is used with weight 1, i.e. the exact attention over the rest."""
    keys, vals, q, kvh, top, _ = _data(4, n=60, k=20)
    o, l = estimate_residual(keys, vals, q, kvh, top, 60, 40, 0.3)
    eo, el = _exact_residual(keys, vals, q, kvh, top, 60, 0.3)
    np.testing.assert_allclose(o, eo, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l, el, rtol=1e-5, atol=1e-5)


def test_unbiased_numerator_and_denominator():
    """Averaged over seeds, exp(lse) and exp(lse) * out converge to the exact residual sums."""
    keys, vals, q, kvh, top, n = _data(5, n=600, k=30)
    scaling = 0.2
    eo, el = _exact_residual(keys, vals, q, kvh, top, n, scaling)
    z = num = 0.0
    seeds = 600
    for s in range(seeds):
        o, l = estimate_residual(keys, vals, q, kvh, top, n, 64, scaling, seed=s)
        z = z + np.exp(l.astype(np.float64))
        num = num + np.exp(l.astype(np.float64))[..., None] * o
    z, num = z / seeds, num / seeds
    np.testing.assert_allclose(np.log(z), el, atol=0.03)
    np.testing.assert_allclose(num / z[..., None], eo, atol=0.05)


def test_deterministic_and_seeded():
    keys, vals, q, kvh, top, n = _data(6)
    a = estimate_residual(keys, vals, q, kvh, top, n, 16, 0.3, seed=1)
    b = estimate_residual(keys, vals, q, kvh, top, n, 16, 0.3, seed=1)
    c = estimate_residual(keys, vals, q, kvh, top, n, 16, 0.3, seed=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_all_draws_retrieved_or_empty():
    keys, vals, q, kvh, top, n = _data(7, n=30, k=30)
    top[:] = np.arange(30)  # everything retrieved: nothing left to estimate
    o, l = estimate_residual(keys, vals, q, kvh, top, 30, 8, 0.3)
    assert np.isneginf(l).all() and (o == 0).all()
    o, l = estimate_residual(keys, vals, q, kvh, top, 0, 8, 0.3)
    assert np.isneginf(l).all()


def test_bf16_bits_exact_roundtrip():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    b = f32_to_bf16_bits(x)
    assert np.array_equal(f32_to_bf16_bits(bf16_bits_to_f32(b)), b)


@pytest.mark.parametrize("index", ["flat", "roar"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_store_attend_with_residual(index, dtype):
    """CPUStore.attend = retrieval + residual: exact over the whole store when k + m >= n; with m = 0 it is the
    plain top-k attention; a fork's attend agrees with its base store's."""
    import torch

    from retrieval_attention.cache import CPUStore
    from retrieval_attention.config import RetrievalConfig

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    Hkv, G, D, n = 2, 3, 16, 120
    keys = torch.randn(Hkv, n, D).to(dt)
    vals = torch.randn(Hkv, n, D).to(dt)
    tq = torch.randn(Hkv * G, 64, D)
    q = torch.randn(Hkv * G, 1, D)
    kf, vf = keys.float(), vals.float()
    s = torch.einsum("hld,hnd->hln", q, kf.repeat_interleave(G, 0)) * 0.25
    exact_lse = torch.logsumexp(s, -1)
    exact_out = torch.einsum("hln,hnd->hld", torch.softmax(s, -1), vf.repeat_interleave(G, 0))

    def store(m):
        st = CPUStore(RetrievalConfig(index=index, top_k=10, residual_samples=m, exact_below=0))
        st.build(keys, vals, tq)
        return st

    out, lse, _ = store(200).attend(q.numpy(), G, 0.25, 10)  # k + m >= n: the residual is exact
    torch.testing.assert_close(torch.from_numpy(out), exact_out, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(torch.from_numpy(lse), exact_lse, rtol=1e-4, atol=1e-4)
    plain = store(0).attend(q.numpy(), G, 0.25, 10)
    est = store(32).attend(q.numpy(), G, 0.25, 10)
    assert (est[1] > plain[1]).all()  # the estimate adds mass: lse grows
    fork = store(32).fork()
    f = fork.attend(q.numpy(), G, 0.25, 10)
    np.testing.assert_allclose(f[0], est[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f[1], est[1], rtol=1e-5, atol=1e-5)


def test_draws_are_stratified_and_layers_differ():
    """One draw per stratum of n/m positions (the whole context is covered); stores of different layers draw
    different positions for the same step (a region missed by one layer is not missed by all)."""
    from retrieval_attention.attention.residual import draw_ids
    from retrieval_attention.cache import CPUStore
    from retrieval_attention.config import RetrievalConfig

    n, m = 1000, 64
    out = np.empty(m, np.int64)
    for seed in range(5):
        draw_ids(seed, n, 0, 0, m, out)
        t = np.arange(m)
        assert (out >= (t * n) // m).all() and (out < -(-(t + 1) * n // m)).all()  # draw t inside stratum t
    counts = np.zeros(n)
    for seed in range(3000):
        draw_ids(seed, n, 1, 0, m, out)
        counts[out] += 1
    np.testing.assert_allclose(counts / 3000, m / n, atol=0.03)  # every key drawn with probability m / n
    cfg = RetrievalConfig(index="flat")
    assert CPUStore(cfg, 3).residual_seed != CPUStore(cfg, 4).residual_seed


@pytest.mark.parametrize("n_split", [2, 3, 7])
@pytest.mark.parametrize("small", [False, True])
def test_split_draws_match_one_pass(n_split, small):
    """Cutting each (KV head, query)'s draws into ranges (more parallel tasks) gives the same estimate."""
    from retrieval_attention.attention.residual import residual_attention

    keys, vals, q, kvh, top, n = _data(11, n=60 if small else 400)
    m = 50 if small else 64
    res = []
    for s in (1, n_split):
        o = np.empty((q.shape[0], q.shape[1], vals.shape[2]), np.float32)
        lse = np.empty(q.shape[:2], np.float32)
        residual_attention(keys, vals, q, kvh.astype(np.int64), top, n, m, 0.3, 5, o, lse, s, False)
        res.append((o, lse))
    np.testing.assert_allclose(res[1][0], res[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res[1][1], res[0][1], rtol=1e-6, atol=1e-6)
    o2, l2 = residual_attention_ref(keys, vals, q, kvh, top, n, m, 0.3, 5)
    np.testing.assert_allclose(res[1][0], o2, rtol=1e-5, atol=1e-5)


def test_add_residual_into_equals_merge_partial():
    """The in-place merge equals merge_partial(retrieved, estimate), including empty retrieved parts."""
    import torch

    from retrieval_attention.attention.merge import merge_partial
    from retrieval_attention.attention.residual import add_residual_into

    keys, vals, q, kvh, top, n = _data(12)
    rng = np.random.default_rng(0)
    out = rng.standard_normal((q.shape[0], q.shape[1], vals.shape[2])).astype(np.float32)
    lse = rng.standard_normal(q.shape[:2]).astype(np.float32) * 3
    out[1, 0], lse[1, 0] = 0.0, -np.inf  # nothing retrieved for this head
    r_o, r_l = estimate_residual(keys, vals, q, kvh, top, n, 32, 0.3, seed=3)
    eo, el = merge_partial(*(torch.from_numpy(x) for x in (out, lse, r_o, r_l)))
    add_residual_into(out, lse, keys, vals, q, kvh, top, n, 32, 0.3, seed=3)
    np.testing.assert_allclose(out, eo.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, el.numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        add_residual_into(out.astype(np.float64), lse, keys, vals, q, kvh, top, n, 32, 0.3)


# ---- the residual on the model's device (lean decode loop, residual_on="device") ----------------------------
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("n,m", [(400, 8), (400, 50), (60, 50)])  # (60, 50): n <= k + m, the exact residual
def test_device_residual_equals_cpu_estimate(bf16, n, m):
    """A sample drawn by draw_sample, scored by residual_partial, is the CPU estimate of the same step: the same
    draws, weight and retrieved ids left out (two sequences of different sizes in one batch)."""
    import torch

    from retrieval_attention.attention.residual_device import draw_sample, residual_partial, sample_capacity

    k, scaling = 20, 0.3
    for seed in range(3):
        batch = [_data(10 * seed + b, L=1, n=n - 7 * b, k=k) for b in range(2)]
        C = sample_capacity(m, k)
        Hkv, D = batch[0][0].shape[0], batch[0][0].shape[2]
        Dv = batch[0][1].shape[2]
        rk, rv = torch.zeros((2, Hkv, C, D)), torch.full((2, Hkv, C, Dv), 7.0)  # rows past the sample: finite junk
        rid, rlw = torch.empty((2, Hkv, C), dtype=torch.int32), torch.empty(2)
        refs = []
        for b, (keys, vals, q, kvh, top, nb) in enumerate(batch):
            if bf16:
                keys = f32_to_bf16_bits(np.nan_to_num(keys))
                vals = f32_to_bf16_bits(np.nan_to_num(vals))
            v_t = torch.from_numpy(vals.view(np.int16)).view(torch.bfloat16) if bf16 else torch.from_numpy(vals)
            ids, kr, vr, lw = draw_sample(keys, v_t, nb, m, k, seed)
            assert ids.shape == (Hkv, C) and kr.shape[1] == (nb if nb <= k + m else m)
            rid[b], rlw[b] = ids, lw
            rk[b, :, :kr.shape[1]], rv[b, :, :vr.shape[1]] = kr, vr
            refs.append(residual_attention_ref(keys, vals, q, kvh, top, nb, m, scaling, seed))
        q = torch.from_numpy(np.stack([x[2] for x in batch]))  # [B, Hq, 1, D]
        top = torch.from_numpy(np.stack([x[4] for x in batch]).astype(np.int32))
        out, lse = residual_partial(q, rk, rv, rid, rlw, top, scaling)
        for b, (o_ref, l_ref) in enumerate(refs):
            np.testing.assert_allclose(out[b].numpy(), o_ref, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(lse[b].numpy(), l_ref, rtol=1e-5, atol=1e-5)


def test_device_residual_all_retrieved_or_empty():
    """Nothing left to estimate (every drawn id retrieved, or an empty sample): out 0, lse -inf, no NaN."""
    import torch

    from retrieval_attention.attention.residual_device import residual_partial

    q = torch.randn(1, 4, 1, 8)
    rk, rv = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    rid = torch.tensor([[[0, 1, 2, -1, -1], [-1, -1, -1, -1, -1]]], dtype=torch.int32)
    top = torch.tensor([0, 1, 2, -1], dtype=torch.int32).expand(1, 4, 1, 4).contiguous()
    out, lse = residual_partial(q, rk, rv, rid, torch.zeros(1), top, 0.5)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("bf16", [False, True])
def test_exact_tail_residual(bf16):
    """lo: the exact residual over the non-retrieved ids lo..n-1 (kernel == reference == the plain formula)."""
    keys, vals, q, kvh, top, n = _data(11, n=300, k=20)
    if bf16:
        keys, vals = f32_to_bf16_bits(np.nan_to_num(keys)), f32_to_bf16_bits(np.nan_to_num(vals))
    lo = 240
    o, l = estimate_residual(keys, vals, q, kvh, top, n, 8, 0.3, seed=3, lo=lo)
    o2, l2 = residual_attention_ref(keys, vals, q, kvh, top, n, 8, 0.3, 3, lo=lo)
    np.testing.assert_allclose(o, o2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l, l2, rtol=1e-5, atol=1e-5)
    kf, vf = bf16_bits_to_f32(keys) if bf16 else keys, bf16_bits_to_f32(vals) if bf16 else vals
    top_shifted = np.where(top >= lo, top - lo, -1)  # the formula over rows lo..n-1, retrieved ids left out
    eo, el = _exact_residual(kf[:, lo:n], vf[:, lo:n], q, kvh, top_shifted, n - lo, 0.3)
    np.testing.assert_allclose(o, eo, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(l, el, rtol=1e-4, atol=1e-4)
    o3, l3 = estimate_residual(keys, vals, q, kvh, top, n, 8, 0.3, lo=n)  # nothing past n
    assert np.isneginf(l3).all() and (o3 == 0).all()


def test_device_sample_plus_exact_tail_is_unbiased():
    """The lean loop's estimate between redraws: a device sample drawn when the store had n0 keys (weight n0 / m)
    plus the CPU's exact residual over the keys added since (ids n0..n-1). Averaged over seeds, its numerator and
    denominator converge to the exact residual over all n keys."""
    import torch

    from retrieval_attention.attention.merge import merge_partial
    from retrieval_attention.attention.residual_device import draw_sample, residual_partial

    keys, vals, q, kvh, top, n = _data(12, L=1, n=600, k=30)
    n0, m, k, scaling = 560, 64, 30, 0.3
    eo, el = _exact_residual(keys, vals, q, kvh, top, n, scaling)
    tail_o, tail_l = estimate_residual(keys, vals, q, kvh, top, n, m, scaling, lo=n0)
    num, den = np.zeros_like(eo), np.zeros_like(el)
    S = 300
    for seed in range(S):
        ids, kr, vr, lw = draw_sample(keys, torch.from_numpy(vals), n0, m, k, seed)
        rk, rv = torch.zeros((kr.shape[0], ids.shape[1], kr.shape[2])), torch.zeros((vr.shape[0], ids.shape[1], vr.shape[2]))
        rk[:, :m], rv[:, :m] = kr, vr
        o, l = residual_partial(torch.from_numpy(q)[None], rk[None], rv[None], ids[None], torch.tensor([lw]),
                                torch.from_numpy(top.astype(np.int32))[None], scaling)
        o, l = merge_partial(o[0], l[0], torch.from_numpy(tail_o), torch.from_numpy(tail_l))
        w = np.exp(l.double().numpy())
        den += w
        num += w[..., None] * o.double().numpy()
    np.testing.assert_allclose(den / S, np.exp(el), rtol=0.05)
    np.testing.assert_allclose(num / den[..., None], eo, atol=0.05)
