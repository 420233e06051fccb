"""bench kernels: runs end to end on a tiny shape, records what it claims, exact search has recall 1."""

import json

from retrieval_attention.cli import main
from retrieval_attention.config import DEFAULT_RESIDUAL_SAMPLES


def test_bench_kernels_records(tmp_path, capsys):
    out = tmp_path / "k.json"
    rc = main(["bench", "kernels", "--keys", "1K", "--shape", "tiny", "--ef", "16,64", "--steps", "2",
               "--threads", "1", "--json", str(out), "--markdown", str(tmp_path / "k.md")])
    assert rc == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["ef"] for r in recs] == [16, 64]
    for r in recs:
        assert r["keys"] == 1024 and r["query_heads"] == 4 and r["kv_heads"] == 2 and r["head_dim"] == 32
        assert 0 < r["scanned_fraction"] <= 1 and 0 <= r["recall_at_k"] <= 1 and r["layer_ms"] > 0
        assert r["build_s"] >= r["knn_s"] >= 0 and r["memory_bytes"] > 0
        assert r["residual_samples"] == DEFAULT_RESIDUAL_SAMPLES and 0 <= r["residual_ms"] < r["layer_ms"]
    assert recs[1]["scanned_fraction"] > recs[0]["scanned_fraction"]  # a wider beam scans more
    assert "| keys / KV head |" in (tmp_path / "k.md").read_text()
    from retrieval_attention.index.kernels import CYCLE_COUNTER

    for r in recs:  # the fused call's parts (x86-64): the busiest worker's task time within the call
        if not CYCLE_COUNTER:
            assert r["call_parts_ms"] is None
            continue
        p = r["call_parts_ms"]
        assert set(p) == {"python", "start", "busy_max", "busy_mean", "join", "idle"}
        assert all(v >= 0 for v in p.values()) and 0 < p["busy_mean"] <= p["busy_max"] + 1e-9
        # each part <= its call's time, so their medians <= the median call (a sum of medians need not be)
        assert max(p["start"], p["busy_max"], p["join"], p["python"]) <= 1.01 * r["layer_ms"]

    assert main(["bench", "kernels", "--keys", "1K", "--shape", "tiny", "--index", "flat", "--ef", "1",
                 "--steps", "2", "--threads", "1", "--json", str(out), "--storage", "float32",
                 "--residual-samples", "0"]) == 0
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["recall_at_k"] == 1.0 and rec["scanned_fraction"] == 1.0
    assert rec["residual_samples"] == 0 and rec["residual_ms"] == 0.0


def test_bench_kernels_residual_on_device(tmp_path):
    """--residual-on device times the CPU part of the device residual: the exact attention over the last keys."""
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--keys", "1K", "--shape", "tiny", "--ef", "32", "--steps", "2", "--threads", "1",
                 "--residual-on", "device", "--residual-refresh", "16", "--json", str(out),
                 "--markdown", str(tmp_path / "k.md")]) == 0
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["residual_on"] == "device" and rec["residual_refresh"] == 16 and 0 <= rec["residual_ms"] < rec["layer_ms"]
    assert "exact, last 16 keys" in (tmp_path / "k.md").read_text()


def test_bench_kernels_thread_sweep(tmp_path):
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--keys", "1K", "--shape", "tiny", "--ef", "32", "--steps", "2",
                 "--threads", "1,2", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["threads"] for r in recs] == [1, 2]
    assert recs[0]["scanned_fraction"] == recs[1]["scanned_fraction"]  # same searches, only the workers differ
    assert all(r["ns_per_key_thread"] > 0 for r in recs)
    assert recs[0]["worker_imbalance"] == 1.0 and recs[1]["worker_imbalance"] >= 1.0  # one worker: balanced


def test_bench_kernels_layers_in_turn(tmp_path):
    """--layers: several independent layers (own data and index) called in turn each step, as decoding does."""
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--keys", "1K", "--shape", "tiny", "--ef", "32", "--steps", "3",
                 "--threads", "1", "--layers", "3", "--json", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["layers"] == 3 and rec["timed_calls"] == 9
    assert main(["bench", "kernels", "--keys", "1K", "--shape", "tiny", "--ef", "32", "--steps", "3",
                 "--threads", "1", "--json", str(out)]) == 0
    (one,) = json.loads(out.read_text())["records"]
    assert one["layers"] == 1 and one["timed_calls"] == 3
    # the first layer's data is the one-layer run's; the other layers are new draws, so the means differ
    assert rec["scanned_fraction"] != one["scanned_fraction"]


def test_bench_kernels_bad_input(capsys):
    assert main(["bench", "kernels", "--threads", "0,4"]) == 2
    assert "--threads takes positive integers" in capsys.readouterr().err
    assert main(["bench", "kernels", "--shape", "nope"]) == 2
    assert "unknown --shape" in capsys.readouterr().err
    assert main(["bench", "kernels", "--keys", "64", "--shape", "tiny"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert main(["bench", "kernels", "--keys", "1K", "--shape", "tiny", "--residual-samples", "-1"]) == 2
    assert "--residual-samples must be >= 0" in capsys.readouterr().err
    assert main(["bench", "kernels", "--keys", "1K", "--shape", "tiny", "--residual-refresh", "0"]) == 2
    assert "--residual-refresh must be >= 1" in capsys.readouterr().err
    assert main(["bench", "kernels", "--keys", "1K", "--shape", "tiny", "--layers", "0"]) == 2
    assert "--layers" in capsys.readouterr().err
