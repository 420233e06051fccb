"""Huge-page host arrays: right shapes, dtypes and contents; the advice reaches the kernel where THP allows it."""

import os

import numpy as np
import pytest
import torch

from retrieval_attention import hostmem


def test_huge_arrays_are_ordinary_arrays():
    a = hostmem.huge_empty((3, 1 << 20, 2), np.uint16)  # 12 MiB: advised
    assert a.shape == (3, 1 << 20, 2) and a.dtype == np.uint16 and a.flags.c_contiguous and a.flags.writeable
    f = hostmem.huge_full((5, 7), -1, np.int32)  # small: plain
    assert (f == -1).all() and f.dtype == np.int32
    src = np.random.default_rng(0).standard_normal((4, 300_000)).astype(np.float32)
    c = hostmem.huge_copy(src[:, ::2])  # non-contiguous source
    assert c.flags.c_contiguous and np.array_equal(c, src[:, ::2])
    small = np.zeros(10)
    assert hostmem.advise_huge(small) is small


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_huge_tensor_holds_any_dtype(dtype):
    t = hostmem.huge_tensor((2, 1 << 20, 4), dtype)
    assert t.shape == (2, 1 << 20, 4) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    x = torch.randn(2, 1 << 20, 4).to(dtype)
    t.copy_(x)
    assert torch.equal(t, x)
    t[1, 5] = 3.0  # views of the same storage
    assert float(t[1, 5, 0]) == 3.0
    for shape in ((2, 0, 4), (3, 5, 7)):  # empty and small: plain tensors of the same kind
        e = hostmem.huge_tensor(shape, dtype)
        assert e.shape == shape and e.dtype == dtype and e.is_contiguous()


def test_huge_pages_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RA_HUGE_PAGES", "0")
    assert not hostmem.huge_pages_enabled()
    monkeypatch.setenv("RA_HUGE_PAGES", "1")
    assert hostmem.huge_pages_enabled() == os.uname().sysname.startswith("Linux")


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise") or hostmem.anon_huge_page_bytes() is None,
                    reason="transparent huge pages unavailable here")
def test_advised_memory_gets_huge_pages():
    before = hostmem.anon_huge_page_bytes()
    a = hostmem.huge_full((64 << 20,), 1, np.uint8)  # touched after the advice
    after = hostmem.anon_huge_page_bytes()
    assert a.sum() == 64 << 20
    assert after - before >= 2 << 20  # at least one 2 MiB page (normally all 32)
