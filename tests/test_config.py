"""RetrievalConfig: the automatic index-training query count."""

import pytest

from retrieval_attention.config import RetrievalConfig
from retrieval_attention.index.roar import auto_train_queries


def test_train_queries_default_is_automatic():
    cfg = RetrievalConfig()
    assert cfg.max_train_queries is None
    for n in (1000, 8192, 32768, 131072):
        assert cfg.train_queries(n) == auto_train_queries(n)
    assert cfg.train_queries(131072) > cfg.train_queries(8192)


def test_train_queries_explicit_count_wins():
    assert RetrievalConfig(max_train_queries=100).train_queries(131072) == 100


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_train_queries_bad_value(bad):
    with pytest.raises(ValueError, match="max_train_queries"):
        RetrievalConfig(max_train_queries=bad)


@pytest.mark.parametrize("params,msg", [({"M": 0}, "M must"), ({"bogus": 1}, "bogus")])
def test_bad_index_params_are_refused_on_construction(params, msg):
    with pytest.raises(ValueError, match=msg):
        RetrievalConfig(index="roar", index_params=params)


@pytest.mark.parametrize("kw,msg", [({"residual_on": "gpu"}, "residual_on must be one of auto, device, cpu"),
                                    ({"residual_refresh": 0}, "residual_refresh must be a positive integer"),
                                    ({"build_workers": 0}, "build_workers must be a positive integer"),
                                    ({"build_priority": "urgent"}, "unknown stream priority 'urgent'"),
                                    ({"decode_compile": "yes"}, "decode_compile must be True, False or None"),
                                    ({"residual_refresh": 2.5}, "residual_refresh")])
def test_bad_residual_placement_is_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RetrievalConfig(**kw)


def test_build_workers_and_decode_compile_follow_the_device_unless_set(monkeypatch):
    """``None`` (the defaults): two background builds and compiled decode ops with CUDA, one build and plain ops
    on the CPU; an explicit value wins either way."""
    import torch

    cfg = RetrievalConfig()
    assert cfg.build_workers is None and cfg.decode_compile is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.resolved_build_workers() == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.resolved_build_workers() == 2
    assert RetrievalConfig(build_workers=1).resolved_build_workers() == 1
    assert RetrievalConfig(build_workers=3).resolved_build_workers() == 3
    for dev, want in (("cpu", False), ("cuda", True), ("cuda:1", True), (torch.device("cpu"), False),
                      (torch.device("cuda", 0), True)):
        assert cfg.resolved_decode_compile(dev) is want
        assert RetrievalConfig(decode_compile=False).resolved_decode_compile(dev) is False
        assert RetrievalConfig(decode_compile=True).resolved_decode_compile(dev) is True
