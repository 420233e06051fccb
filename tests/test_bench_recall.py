"""Tests of the recall benchmark: vector capture on a tiny random Llama, the recall / attention-error metrics,
and ``bench recall``'s outputs on a synthetic capture. No model weights needed."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from retrieval_attention.bench import capture as capmod
from retrieval_attention.bench import recall as rb
from retrieval_attention.bench.common import markdown_table, parse_index_spec, parse_int_list, update_doc_section
from retrieval_attention.index import make_index
from retrieval_attention.index.base import KVIndex, register_index, INDEX_REGISTRY


# ---------------------------------------------------------------------------------------------------------------
# capture on a tiny random Llama
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=4096, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def test_capture_keys_match_dynamic_cache(tiny_llama):
    from transformers import DynamicCache

    m = tiny_llama
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    cap = capmod.capture_vectors(m, ids, n_decode=4, progress=False)
    assert sorted(cap["layers"]) == [0, 1]
    cache = DynamicCache(config=m.config)
    with torch.inference_mode():
        m(input_ids=ids, use_cache=True, **{capmod._cache_kwarg(m): cache})
    for i in range(2):
        a = cap["layers"][i]
        ref = cache.layers[i].keys[0].numpy()
        assert a["keys"].shape == (2, 40, 16) and a["keys"].dtype == np.float32
        np.testing.assert_allclose(a["keys"], ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a["values"], cache.layers[i].values[0].numpy(), rtol=0, atol=1e-6)
        assert a["prefill_queries"].shape == (4, 40, 16)
        assert a["decode_queries"].shape == (4, 4, 16)
        assert a["new_keys"].shape == (2, 4, 16)
    assert cap["meta"]["scaling"]["0"] == pytest.approx(16**-0.5)
    assert len(cap["meta"]["generated_ids"]) == 4


def test_capture_queries_match_independent_rope(tiny_llama):
    """Decode queries equal q_proj output (forward hook) rotated with the model's rotary embedding."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = tiny_llama
    n, T = 30, 3
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(2))
    cap = capmod.capture_vectors(m, ids, n_decode=T, progress=False)
    gen = cap["meta"]["generated_ids"]

    # independent run with plain sdpa: hook q_proj / k_proj of layer 1, rotate with rotary_emb at the positions
    seen = {}
    attn = m.model.layers[1].self_attn
    h1 = attn.q_proj.register_forward_hook(lambda mod, i, o: seen.setdefault("q", []).append(o.detach().clone()))
    h2 = attn.k_proj.register_forward_hook(lambda mod, i, o: seen.setdefault("k", []).append(o.detach().clone()))
    try:
        cache = DynamicCache(config=m.config)
        kw = capmod._cache_kwarg(m)
        with torch.inference_mode():
            m(input_ids=ids, use_cache=True, **{kw: cache})
            for t, tok in enumerate(gen):
                m(input_ids=torch.tensor([[tok]]), use_cache=True, **{kw: cache})
    finally:
        h1.remove()
        h2.remove()
    assert m.config._attn_implementation == "sdpa"
    qs = torch.cat(seen["q"], 1)  # [1, n+T, Hq*d]
    ks = torch.cat(seen["k"], 1)
    pos = torch.arange(n + T)[None]
    q = qs.view(1, n + T, 4, 16).transpose(1, 2)
    k = ks.view(1, n + T, 2, 16).transpose(1, 2)
    cos, sin = m.model.rotary_emb(q, pos)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    np.testing.assert_allclose(cap["layers"][1]["decode_queries"], q_rot[0, :, n:].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(cap["layers"][1]["prefill_queries"], q_rot[0, :, :n].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(cap["layers"][1]["new_keys"], k_rot[0, :, n:].numpy(), rtol=0, atol=1e-5)


def test_capturing_restores_implementation_and_matches_sdpa(tiny_llama):
    m = tiny_llama
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = m(input_ids=ids).logits
    assert m.config._attn_implementation == "sdpa"
    with capmod.capturing(m) as rec:
        assert m.config._attn_implementation == capmod.ATTN_NAME
        with torch.inference_mode():
            out = m(input_ids=ids).logits
    assert m.config._attn_implementation == "sdpa"
    assert rec.calls == 2 and sorted(rec.prefill) == [0, 1]
    torch.testing.assert_close(out, ref)
    # restored even when the block raises; nothing recorded outside the block
    with pytest.raises(RuntimeError, match="boom"):
        with capmod.capturing(m):
            raise RuntimeError("boom")
    assert m.config._attn_implementation == "sdpa"
    assert capmod._ACTIVE == []


def test_capture_file_roundtrip(tiny_llama, tmp_path):
    cap = capmod.capture_vectors(tiny_llama, list(range(1, 25)), n_decode=2, layers=[1], progress=False)
    assert sorted(cap["layers"]) == [1]
    p = capmod.save_capture(tmp_path / "c.npz", cap)
    with capmod.load_capture(p) as c:
        assert c.layers == [1] and c.has_values
        lv = c.layer(1)
        np.testing.assert_array_equal(lv.keys, cap["layers"][1]["keys"])
        assert lv.decode_queries.shape == (4, 2, 16)
        with pytest.raises(KeyError):
            c.layer(0)


def test_capture_cache_path_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("RA_CACHE_DIR", str(tmp_path))
    a = capmod.capture_cache_path("smollm2", 8192, 32)
    assert a.parent == tmp_path / "captures"
    assert a != capmod.capture_cache_path("smollm2", 4096, 32) != capmod.capture_cache_path("smollm2", 8192, 16)
    assert capmod.capture_cache_path("/x/a/model.gguf", 8, 1) != capmod.capture_cache_path("/y/a/model.gguf", 8, 1)


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
def test_recall_per_query():
    exact = np.array([[[0, 1, 2, 3]], [[4, 5, 6, 7]]])
    approx = np.array([[[3, 2, 9, 8]], [[4, 4, 4, -1]]])
    r = rb.recall_per_query(approx, exact, 10)
    np.testing.assert_allclose(r, [[0.5], [0.25]])  # duplicates and -1 count nothing extra
    assert rb.recall_per_query(exact, exact, 10).min() == 1.0


def _synthetic_layer(rng, Hkv=2, G=2, n=400, d=16, T=6, with_values=True):
    from retrieval_attention.bench.capture import LayerVectors

    keys = rng.standard_normal((Hkv, n, d)).astype(np.float32)
    return LayerVectors(
        layer=0,
        keys=keys,
        prefill_queries=rng.standard_normal((Hkv * G, n, d)).astype(np.float32),
        decode_queries=(2 * rng.standard_normal((Hkv * G, T, d))).astype(np.float32),
        values=rng.standard_normal((Hkv, n, d)).astype(np.float32) if with_values else None,
        new_keys=rng.standard_normal((Hkv, T, d)).astype(np.float32) if with_values else None,
        new_values=rng.standard_normal((Hkv, T, d)).astype(np.float32) if with_values else None,
        scaling=d**-0.5,
    )


def test_attention_reference_matches_naive_and_limits():
    rng = np.random.default_rng(0)
    lv = _synthetic_layer(rng)
    sink, window = 10, 50
    ref = rb.AttentionReference(lv, sink, window)
    n, T = 400, 6
    # naive full attention, query head 3 (KV head 1), step 4: positions 0 .. n+4
    h, t = 3, 4
    K = np.concatenate([lv.keys[1], lv.new_keys[1, : t + 1]])
    V = np.concatenate([lv.values[1], lv.new_values[1, : t + 1]])
    s = K.astype(np.float64) @ lv.decode_queries[h, t] * lv.scaling
    p = np.exp(s - s.max())
    o = (p / p.sum()) @ V
    np.testing.assert_allclose(ref.full[h, t].numpy(), o, rtol=1e-6, atol=1e-9)
    n_idx = n - sink - window
    all_ids = np.broadcast_to(np.arange(n_idx), (4, T, n_idx))
    assert ref.rel_error(all_ids).max() < 1e-10  # static + every indexed key = full attention
    none = np.full((4, T, 5), -1)
    e_none = ref.rel_error(none)
    assert (e_none > 1e-3).all()
    exact_ids, _ = make_index("flat").build(np.ascontiguousarray(lv.keys[:, sink : n - window])).search(
        lv.decode_queries, 50
    )[:2]
    assert ref.rel_error(exact_ids).mean() < e_none.mean()


def _spec(name, budgets, param=None, **params):
    return rb.IndexSpec(name, name, params, param, budgets)


class _FakeCapture:
    def __init__(self, layers):
        self._l = layers
        self.layers = sorted(layers)
        self.meta = {"model": "synthetic", "context": 400, "n_kv_heads": 2, "head_dim": 16}
        self.has_values = layers[self.layers[0]].values is not None

    def layer(self, i):
        return self._l[i]


class _PrefixIndex(KVIndex):
    """Test index: exact top-k among the first ``limit`` keys only (a budget that deliberately limits recall)."""

    budget_params = ("limit",)

    def __init__(self) -> None:  # no parameters: a spec with any is rejected
        super().__init__()

    def _build(self, keys, train_queries):
        self._keys = keys

    def _search(self, queries, k, limit=None):
        from retrieval_attention.index.flat import exact_topk

        m = self.n_keys if limit is None else min(limit, self.n_keys)
        ids, scores = exact_topk(np.ascontiguousarray(self._keys[:, :m]), queries, k, queries.shape[0] // self.n_kv_heads)
        return ids, scores, np.full(queries.shape[:2], m, np.int64)

    def _add(self, new_keys):
        self._keys = np.concatenate([self._keys, new_keys], 1)

    def memory_bytes(self):
        return int(self._keys.nbytes)

    def state(self):
        return {"keys": self._keys}

    def load_state(self, arrays):
        self._keys = arrays["keys"]


@pytest.fixture
def prefix_index():
    """Register ``_test_prefix`` for one test only (other tests may iterate over every registered index)."""
    register_index("_test_prefix")(_PrefixIndex)
    try:
        yield "_test_prefix"
    finally:
        INDEX_REGISTRY.pop("_test_prefix", None)


def test_run_benchmark_flat_exact_and_limited_budget_below_one(prefix_index):
    rng = np.random.default_rng(1)
    cap = _FakeCapture({0: _synthetic_layer(rng), 3: _synthetic_layer(rng)})
    specs = [_spec("flat", [None]), _spec("_test_prefix", [60, 340], "limit")]
    recs = rb.run_benchmark(cap, specs, [0, 3], sink=10, window=50, max_train_queries=64, progress=False)
    by = {(r["index"], r["budget"]): r for r in recs}
    f = by[("flat", None)]
    assert f["recall_at_100"] == 1.0 and f["recall_at_10"] == 1.0 and f["worst_recall_at_100"] == 1.0
    assert f["scanned_fraction"] == 1.0 and f["n_indexed"] == 340 and f["n_train_queries"] == 64
    assert f["memory_bytes"] == 2 * 340 * 16 * 4 and f["attn_rel_error"] is not None
    lim = by[("_test_prefix", 60)]
    assert lim["scanned_fraction"] == pytest.approx(60 / 340)
    assert lim["recall_at_100"] < 0.5 and lim["worst_recall_at_100"] <= lim["recall_at_100"]
    assert lim["attn_rel_error"] > f["attn_rel_error"]
    assert by[("_test_prefix", 340)]["recall_at_100"] == 1.0
    assert set(lim["per_layer_recall_at_100"]) == {"0", "3"}
    # interpolation between the two budgets, n/a outside the measured range
    v = rb.recall_at_scanned(recs, "_test_prefix", 0.5)
    assert lim["recall_at_100"] < v < 1.0
    assert rb.recall_at_scanned(recs, "_test_prefix", 0.05) is None
    assert rb.recall_at_scanned(recs, "flat", 1.0) == 1.0


def test_resolve_specs_budgets_and_unknown(prefix_index):
    specs = rb.resolve_specs("flat,_test_prefix", ["limit=5,7", "flat:unused=1"], quick=False, strict=True)
    assert [(s.label, s.budgets) for s in specs] == [("flat", [None]), ("_test_prefix", [5, 7])]
    with pytest.raises(ValueError, match="not registered"):
        rb.resolve_specs("flat,nope", None, quick=False, strict=True)
    warned = []
    specs = rb.resolve_specs("flat,nope", None, quick=False, strict=False, warn=warned.append)
    assert [s.label for s in specs] == ["flat"] and warned
    # per-index default sweeps (hnsw starts at ef = k) unless a sweep is given for the parameter
    if {"roar", "hnsw"} <= set(INDEX_REGISTRY):
        d = {s.label: s.budgets for s in rb.resolve_specs("roar,hnsw", None, quick=False, strict=True)}
        assert min(d["hnsw"]) == 100 and min(d["roar"]) < 100
        d = {s.label: s.budgets for s in rb.resolve_specs("roar,hnsw", ["ef=50,60"], quick=False, strict=True)}
        assert d == {"roar": [50, 60], "hnsw": [50, 60]}
        d = {s.label: s.budgets for s in rb.resolve_specs("roar,hnsw", ["hnsw:ef=300"], quick=True, strict=True)}
        assert d == {"roar": rb.QUICK_BUDGETS["ef"], "hnsw": [300]}
    assert parse_index_spec("roar:graph_per=kv_head:M=16") == ("roar", {"graph_per": "kv_head", "M": 16})
    assert parse_int_list("0,4,8-10") == [0, 4, 8, 9, 10]


# ---------------------------------------------------------------------------------------------------------------
# run(): files
# ---------------------------------------------------------------------------------------------------------------
def _synthetic_capture_file(path, layers=(0, 1, 2), n=420, T=5, Hkv=2, G=3, d=16):
    rng = np.random.default_rng(7)
    cap = {"layers": {}, "meta": {"model": "synthetic", "context": n, "n_decode": T, "n_layers": len(layers),
                                  "n_query_heads": Hkv * G, "n_kv_heads": Hkv, "head_dim": d,
                                  "scaling": {str(i): d**-0.5 for i in layers}, "generated_ids": []}}
    for i in layers:
        cap["layers"][i] = {
            "keys": rng.standard_normal((Hkv, n, d)), "values": rng.standard_normal((Hkv, n, d)),
            "prefill_queries": rng.standard_normal((Hkv * G, n, d)),
            "decode_queries": rng.standard_normal((Hkv * G, T, d)),
            "new_keys": rng.standard_normal((Hkv, T, d)), "new_values": rng.standard_normal((Hkv, T, d)),
        }
    return capmod.save_capture(path, cap)


def _args(argv):
    p = argparse.ArgumentParser()
    rb.add_arguments(p)
    return p.parse_args(argv)


def test_run_writes_json_png_markdown_and_docs(tmp_path, capsys, prefix_index):
    capf = _synthetic_capture_file(tmp_path / "cap.npz")
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\n## Decode latency\n\nkeep me\n\n## Index recall\n\nold table\n\n## Other\n\nkeep too\n")
    out = tmp_path / "o"
    rc = rb.run(_args([
        "--capture", str(capf), "--indexes", "flat,_test_prefix", "--budget", "limit=30,120,300",
        "--layers", "0,2", "--sink", "20", "--window", "60", "--no-progress",
        "--json", str(out / "r.json"), "--plot", str(out / "r.png"), "--markdown", str(out / "r.md"),
        "--update-docs", "--docs", str(docs),
    ]))
    assert rc == 0
    recs = json.loads((out / "r.json").read_text())
    assert len(recs) == 4
    for r in recs:
        for key in ("index", "budget", "recall_at_100", "recall_at_10", "scanned_fraction", "search_us_per_head",
                    "build_s", "memory_bytes", "worst_recall_at_100", "context", "model", "attn_rel_error"):
            assert key in r
        assert r["context"] == 420 and r["layers"] == [0, 2] and r["n_indexed"] == 340
    flat = [r for r in recs if r["index"] == "flat"][0]
    assert flat["recall_at_100"] == 1.0 and flat["scanned_fraction"] == 1.0
    low = [r for r in recs if r["budget"] == 30][0]
    assert low["recall_at_100"] < 1.0
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "r.md").read_text()
    assert "| flat" in md and "limit=30" in md
    assert "limit=30" in capsys.readouterr().out
    text = docs.read_text()
    assert "old table" not in text and "keep me" in text and "keep too" in text
    assert text.index("## Decode latency") < text.index("## Index recall") < text.index("## Other")
    assert "limit=120" in text and "CPU cores" in text
    assert recs[0]["command"].startswith("retrieval-attention") and "machine" in recs[0]

    # re-render from the JSON without measuring: same tables
    capsys.readouterr()
    docs2 = tmp_path / "B2.md"
    assert rb.run(_args(["--from-json", str(out / "r.json"), "--update-docs", "--docs", str(docs2)])) == 0
    assert capsys.readouterr().out.strip() == md.strip()
    assert "limit=120" in docs2.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text('[{"index": "x"}]')
    assert rb.run(_args(["--from-json", str(bad)])) == 2


def test_run_rejects_bad_layers_and_context(tmp_path):
    capf = _synthetic_capture_file(tmp_path / "cap.npz", layers=(0,))
    assert rb.run(_args(["--capture", str(capf), "--indexes", "flat", "--layers", "5", "--no-progress"])) == 2
    assert rb.run(_args(["--capture", str(capf), "--indexes", "flat", "--no-progress"])) == 2  # 420 < 128+512
    assert rb.run(_args(["--capture", str(capf), "--indexes", "nope", "--no-progress"])) == 2


def test_markdown_and_doc_section_helpers(tmp_path):
    t = markdown_table(["a", "b"], [["x", 1], ["yy", None]])
    assert t.splitlines()[1] == "|:---|--:|"
    p = update_doc_section(tmp_path / "new.md", "Index recall", "body")
    assert p.read_text() == "# Benchmarks\n\n## Index recall\n\nbody\n"
    update_doc_section(p, "Index recall", "new body\n```\n## not a heading\n```")
    update_doc_section(p, "Index recall", "final")
    assert p.read_text() == "# Benchmarks\n\n## Index recall\n\nfinal\n"


def test_ivf_centroid_products_are_reported():
    from retrieval_attention.index import available_indexes

    keys = np.random.default_rng(3).standard_normal((2, 2000, 16)).astype(np.float32)
    assert rb.coarse_centroids(make_index("flat").build(keys)) is None
    if "ivf" not in available_indexes():
        pytest.skip("ivf index not registered")
    ncent = rb.coarse_centroids(make_index("ivf").build(keys))
    assert isinstance(ncent, int) and 1 < ncent < 2000


def test_summary_rows_interpolate_and_add_centroid_row(tmp_path):
    def rec(index, budget, scanned, recall, cent=None):
        return {"index": index, "budget": budget, "budget_param": "nprobe", "scanned_fraction": scanned,
                "scanned_fraction_with_centroids": None if cent is None else scanned + cent,
                "recall_at_100": recall, "recall_at_10": recall, "worst_recall_at_100": recall - 0.1,
                "worst_layer": 3, "worst_head": 1, "build_s": 0.5, "memory_bytes": 2**20, "search_us_per_head": 1.0,
                "attn_rel_error": None}

    recs = [rec("ivf", 4, 0.04, 0.5, 0.03), rec("ivf", 8, 0.16, 0.9, 0.03)]
    rows = rb.summary_rows(recs)
    assert [r[0] for r in rows] == ["ivf", "ivf (+centroids)"]
    # log-interpolation: 8% is halfway between 4% and 16% in log space
    assert rows[0][1] == "0.700"
    # the centroid row counts 3% more scanned (7% .. 19%): at 8% it is near its lowest budget
    want = 0.5 + 0.4 * (np.log(0.08) - np.log(0.07)) / (np.log(0.19) - np.log(0.07))
    assert rows[1][1] == f"{want:.3f}"
    assert "L3 h1" in rows[0][3] and "nprobe=8" in rows[0][3]
    png = rb.plot_recall(recs, tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_run_reports_bad_index_parameters(tmp_path, capsys, prefix_index):
    capf = _synthetic_capture_file(tmp_path / "cap.npz", layers=(0,))
    rc = rb.run(_args(["--capture", str(capf), "--indexes", "flat,_test_prefix:bogus=1", "--sink", "20",
                       "--window", "60", "--no-progress"]))
    assert rc == 2 and "_test_prefix:bogus=1" in capsys.readouterr().err


def test_select_layers_for_partial_captures(monkeypatch, tmp_path):
    from types import SimpleNamespace

    llama = SimpleNamespace(num_hidden_layers=30)
    assert capmod.select_layers(llama, None) == list(range(30))
    assert capmod.select_layers(llama, 6) == [0, 6, 12, 17, 23, 29]
    assert capmod.select_layers(llama, [5, 1, 5]) == [1, 5]
    with pytest.raises(ValueError, match="30 layers"):
        capmod.select_layers(llama, [30])
    mixed = SimpleNamespace(num_hidden_layers=12, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2)
    assert capmod.select_layers(mixed, 3) == [5, 11]  # only the full-attention layers hold retrievable keys
    monkeypatch.setenv("RA_CACHE_DIR", str(tmp_path))
    paths = {capmod.capture_cache_path("m", 8, 1, layers=x) for x in (None, 6, [0, 6], list(range(40)))}
    assert len(paths) == 4


def test_captures_record_rope_and_the_benchmark_aligns_training_queries(tiny_llama, tmp_path, prefix_index,
                                                                         monkeypatch):
    """A capture records each layer's RoPE frequencies; run_benchmark rotates the training queries it builds with
    exactly as the retrieval cache does (align_to_decode from their positions to the prompt length), or not."""
    from retrieval_attention.rope import align_to_decode, rope_inv_freq

    cap = capmod.capture_vectors(tiny_llama, list(range(1, 61)), n_decode=2, progress=False)
    for i in (0, 1):
        assert cap["meta"]["rope_inv_freq"][str(i)] == rope_inv_freq(tiny_llama, i).tolist()
    path = capmod.save_capture(tmp_path / "c.npz", cap)
    seen = []
    monkeypatch.setattr(_PrefixIndex, "_build", lambda self, keys, tq: (seen.append(tq.copy()),
                                                                         setattr(self, "_keys", keys)))
    with capmod.load_capture(path) as c:
        rope = rb.capture_rope(c)
        assert torch.equal(rope[1], rope_inv_freq(tiny_llama, 1))
        for spread in (None, 16):
            rb.run_benchmark(c, [_spec("_test_prefix", [None], "limit")], [1], sink=4, window=8, max_train_queries=24,
                             attn_error=False, progress=False, align_spread=spread)
        raw, aligned = seen[-3], seen[-1]  # (the warm-up build comes first in each run)
        where = rb.subsample_positions(60, 24)
        want = align_to_decode(torch.from_numpy(raw), torch.from_numpy(where), 60, rope[1], 16, seed=1).numpy()
        np.testing.assert_allclose(aligned, want, atol=1e-5)
        assert not np.allclose(aligned, raw, atol=1e-2)
        np.testing.assert_array_equal(raw, c.layer(1).prefill_queries[:, where])


@pytest.mark.parametrize("n,m", [(60, 24), (8192, 4096), (131072, 8192), (131071, 8192), (524288, 16384),
                                 (100003, 4097)])
def test_recall_benchmark_subsamples_the_caches_training_positions(n, m):
    """bench recall trains on the positions the cache trains on (float32 grids had picked other positions near
    n = 2**17); they are strictly increasing, first and last included, ``round(i (n-1) / (m-1))`` exactly."""
    from fractions import Fraction

    from retrieval_attention.cache import train_positions

    got = rb.subsample_positions(n, m)
    np.testing.assert_array_equal(got, train_positions(n, m).numpy())
    assert len(got) == m and got[0] == 0 and got[-1] == n - 1 and (np.diff(got) > 0).all()
    np.testing.assert_array_equal(got, [round(Fraction(i * (n - 1), m - 1)) for i in range(m)])
    np.testing.assert_array_equal(rb.subsample_positions(n, 0), np.arange(n))
