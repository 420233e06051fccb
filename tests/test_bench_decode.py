"""bench decode on a tiny random model (CPU): records, table and plot get written; bad input refused."""

import json

import pytest

from retrieval_attention.bench.decode import parse_contexts, parse_size
from retrieval_attention.cli import main


def test_parsers():
    assert parse_contexts("8K,32k,1M,100") == [8192, 32768, 1 << 20, 100]
    assert parse_size("24GB") == 24 << 30 and parse_size("512MiB") == 512 << 20
    with pytest.raises(ValueError):
        parse_contexts(" , ")


def test_bench_decode_tiny_writes_json_and_plot(tmp_path):
    js, png = tmp_path / "d.json", tmp_path / "d.png"
    rc = main(["bench", "decode", "--shape", "tiny", "--context", "900", "--steps", "3", "--warmup", "1",
               "--methods", "full,retrieval,streaming", "--index", "flat", "--n-sink", "16", "--window", "64",
               "--json", str(js), "--plot", str(png)])
    assert rc == 0
    recs = json.loads(js.read_text())
    assert [r["method"] for r in recs] == ["full", "retrieval", "streaming"]
    for r in recs:
        for key in ("method", "index", "context", "decode_ms_per_token", "prefill_s", "index_build_s",
                    "peak_gpu_bytes", "host_bytes", "oom"):
            assert key in r
        assert r["decode_ms_per_token"] > 0 and not r["oom"]
    ret = recs[1]
    assert ret["kv_cpu_bytes"] > 0 and 0 < ret["kv_device_bytes"] < recs[0]["kv_device_bytes"]
    assert png.stat().st_size > 1000


def test_bench_decode_rejects_unknown_method():
    assert main(["bench", "decode", "--shape", "tiny", "--context", "100", "--methods", "fast"]) == 2
