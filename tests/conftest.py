import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture
def build_queries(monkeypatch):
    """The training queries every ``CPUStore.build`` receives, in call order (clones; the builds still run)."""
    from retrieval_attention.cache import CPUStore

    seen = []
    orig = CPUStore.build

    def spy(self, keys, values, train_queries, background=False, group=None, hold=False):
        seen.append(train_queries.detach().clone())
        return orig(self, keys, values, train_queries, background, group, hold)

    monkeypatch.setattr(CPUStore, "build", spy)
    return seen
