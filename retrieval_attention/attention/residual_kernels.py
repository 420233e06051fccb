"""Compiled pieces of the residual estimate (:mod:`.residual`) shared with the fused decode kernel
(:func:`retrieval_attention.index.decode_kernels.search_attend_batch`): the deterministic stratified draws
and the final log-sum-exp merge. Kept apart from :mod:`.residual` so the index kernels can use them without
an import cycle."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..index.kernels import elem

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0  # 2**-53: 53 random bits -> a float64 in [0, 1)


@njit(nogil=True, cache=True)
def _splitmix(state):
    """One splitmix64 step: returns (new_state, 64-bit output)."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return state, z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True)
def _seed(seed, n, h, i):
    s = np.uint64(seed)
    for x in (n, h, i):
        s, z = _splitmix(s ^ np.uint64(x))
        s = z
    return s


@njit(nogil=True, cache=True)
def draw_ids(seed, n, h, i, m, out):
    """``m`` stratified ids in ``[0, n)`` for (KV head ``h``, query ``i``) into ``out[:m]``: draw ``t`` is uniform
    in ``[t n / m, (t + 1) n / m)`` (the kernel's stream; every id has probability ``m / n``)."""
    st0 = _seed(seed, n, h, i)
    for t in range(m):
        out[t] = _draw(st0, t, n, m)


@njit(nogil=True, cache=True)
def _row(a, h, j, buf):
    """Row ``a[h, j]`` (float32, or uint16 bfloat16 bits) as float32 into ``buf``."""
    for t in range(a.shape[2]):
        buf[t] = elem(a, h, j, t)


@njit(nogil=True, cache=True)
def _draw(st0, t, n, m):
    """Draw ``t`` of the stream :func:`draw_ids` writes (splitmix64's state after ``t + 1`` steps is
    ``st0 + (t + 1) * golden``, so any draw is computed directly; a split of the draws needs no prefix)."""
    _, z = _splitmix(st0 + np.uint64(t) * _GOLDEN)
    u = np.float64(z >> np.uint64(11)) * _INV_2_53  # uniform in [0, 1) from the top 53 bits
    j = np.int64((t + u) * n / m)
    return min(j, n - 1)


@njit(nogil=True, cache=True)
def _finish(out, lse, h, i, mx, z, acc, weight, merge):
    """Write the residual of (head h, query i) from its max-subtracted sums (``mx``, ``z``, ``acc [Dv]``), or
    merge it into the partial already in ``out`` / ``lse`` (``merge``)."""
    Dv = out.shape[2]
    r_lse = mx + np.log(z * weight) if mx > -np.inf else -np.inf
    if not merge:
        lse[h, i] = r_lse
        for c in range(Dv):
            out[h, i, c] = acc[c] / z if mx > -np.inf else 0.0
        return
    if r_lse == -np.inf:  # nothing to add: the retrieved partial stands
        return
    a = np.float64(lse[h, i])
    top = max(a, r_lse)
    wa = np.exp(a - top) if a > -np.inf else 0.0
    wb = np.exp(r_lse - top)
    tot = wa + wb
    for c in range(Dv):
        out[h, i, c] = (wa * out[h, i, c] + wb * acc[c] / z) / tot
    lse[h, i] = top + np.log(tot)
