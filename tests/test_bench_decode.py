"""bench decode on a tiny random model (CPU): records, table and plot get written; bad input refused."""

import json

import pytest

from retrieval_attention.bench.decode import parse_contexts, parse_size
from retrieval_attention.cli import main
from retrieval_attention.config import DEFAULT_RESIDUAL_SAMPLES, RetrievalConfig


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
                    "peak_gpu_bytes", "peak_gpu_reserved_bytes", "host_bytes", "oom"):
            assert key in r
        assert r["decode_ms_per_token"] > 0 and not r["oom"]
        steps = r["decode_ms_steps"]  # every timed step, whose median is the headline number
        assert len(steps) == 3 and abs(sorted(steps)[1] - r["decode_ms_per_token"]) <= 0.01
    ret = recs[1]
    assert ret["kv_cpu_bytes"] > 0 and 0 < ret["kv_device_bytes"] < recs[0]["kv_device_bytes"]
    assert ret["residual_samples"] == DEFAULT_RESIDUAL_SAMPLES and ret["search_params"] == {}
    assert png.stat().st_size > 1000


def test_bench_decode_residual_and_ef_options(tmp_path):
    js = tmp_path / "d.json"
    args = ["bench", "decode", "--shape", "tiny", "--context", "2K", "--steps", "2", "--warmup", "1",
            "--methods", "retrieval", "--index", "roar", "--n-sink", "16", "--window", "64", "--json", str(js)]
    assert main(args + ["--residual-samples", "0", "--ef", "8", "--max-train-queries", "64"]) == 0
    (narrow,) = json.loads(js.read_text())
    assert narrow["residual_samples"] == 0 and narrow["search_params"] == {"ef": 8}
    assert narrow["max_train_queries"] == 64 and narrow["align_train_queries"] is True
    assert narrow["build_workers"] == RetrievalConfig().resolved_build_workers() == 1  # no CUDA here
    assert narrow["decode_compile"] is False  # auto: off on the CPU
    from retrieval_attention.index.kernels import CYCLE_COUNTER

    if CYCLE_COUNTER:  # where the fused search calls' time went, per token
        sc = narrow["search_call_ms"]
        assert set(sc) == {"wall", "kernel", "python", "start", "busy_max", "busy_mean", "join", "idle"}
        assert sc["wall"] >= sc["kernel"] * 0.99 > 0 and sc["kernel"] * 1.01 >= sc["busy_max"] >= sc["busy_mean"] > 0
        assert abs(sc["python"] - (sc["wall"] - sc["kernel"])) < 1e-9
    assert narrow["build_priority"] == "normal"
    assert narrow["prefill_handoff_wait_s"] == 0.0 <= narrow["prefill_handoff_s"]  # no device to wait for here
    assert narrow["handoff"] == "sync"  # "auto" off a GPU
    chunks = narrow["index_build_chunks"]  # one roar build per retrieval layer; no GPU stages to shrink here
    assert chunks["builds"] > 0 and chunks["shrunk_builds"] == chunks["oom_retries"] == 0
    assert narrow["cuda_alloc_retries"] == narrow["cuda_alloc_retries_to_first_step"] == 0  # no CUDA allocator
    assert main(args + ["--ef", "64", "--no-align", "--build-workers", "2", "--build-priority", "high",
                        "--build-schedule", "after_prefill"]) == 0
    assert json.loads(js.read_text())[0]["align_train_queries"] is False
    assert json.loads(js.read_text())[0]["build_workers"] == 2
    assert json.loads(js.read_text())[0]["build_priority"] == "high"
    assert json.loads(js.read_text())[0]["build_schedule"] == "after_prefill"
    assert main(args + ["--ef", "64"]) == 0
    (wide,) = json.loads(js.read_text())
    assert wide["scanned_fraction"] > narrow["scanned_fraction"]  # the beam width reaches the search
    assert wide["residual_on"] == "cpu" and wide["residual_device_bytes"] == 0  # "auto" off a GPU
    assert main(args + ["--ef", "64", "--residual-on", "device"]) == 0
    (dev,) = json.loads(js.read_text())
    assert dev["residual_on"] == "device" and dev["residual_device_bytes"] > 0
    assert dev["kv_device_bytes"] == wide["kv_device_bytes"] + dev["residual_device_bytes"]  # counted as device KV
    # index options reach the index (roar:M=4 -> a sparser graph: fewer keys scanned at the same ef)
    args[args.index("roar")] = "roar:M=4"
    assert main(args + ["--ef", "64"]) == 0
    (sparse,) = json.loads(js.read_text())
    assert sparse["index"] == "roar:M=4" and sparse["scanned_fraction"] < wide["scanned_fraction"]


def test_bench_decode_rejects_unknown_method():
    assert main(["bench", "decode", "--shape", "tiny", "--context", "100", "--methods", "fast"]) == 2


def test_bench_decode_dtype_spellings(capsys):
    from retrieval_attention.bench.decode import DTYPES

    assert {DTYPES[k] for k in ("bf16", "fp16", "fp32")} == {"bfloat16", "float16", "float32"}
    with pytest.raises(SystemExit) as e:  # argparse: names the valid choices instead of a traceback
        main(["bench", "decode", "--shape", "tiny", "--dtype", "bfloat"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("bad, msg", [(["--residual-samples", "-1"], "--residual-samples must be >= 0"),
                                      (["--ef", "0"], "--ef must be >= 1"),
                                      (["--max-train-queries", "0"], "--max-train-queries must be >= 1"),
                                      (["--build-workers", "0"], "--build-workers must be >= 1"),
                                      (["--ef", "32", "--index", "flat"], "--ef is the beam width of roar"),
                                      (["--index", "roar:M"], "is not of the form key=value")])
def test_bench_decode_rejects_bad_budgets(bad, msg, capsys):
    assert main(["bench", "decode", "--shape", "tiny", "--context", "900", "--methods", "retrieval"] + bad) == 2
    assert msg in capsys.readouterr().err


def test_bench_decode_prefill_and_decode_modes(tmp_path):
    """--prefill layerwise/forward and --decode lean/hf: same JSON keys, the modes recorded."""
    recs = {}
    for prefill, decode in (("layerwise", "lean"), ("forward", "hf")):
        js = tmp_path / f"{prefill}-{decode}.json"
        rc = main(["bench", "decode", "--shape", "tiny", "--context", "600", "--steps", "3", "--warmup", "1",
                   "--methods", "full,retrieval,streaming", "--index", "flat", "--n-sink", "16", "--window", "64",
                   "--prefill", prefill, "--prefill-chunk", "250", "--decode", decode, "--json", str(js)])
        assert rc == 0
        recs[prefill] = json.loads(js.read_text())
    lean, hf = recs["layerwise"], recs["forward"]
    assert [r["prefill_mode"] for r in lean] == ["layerwise"] * 3 and [r["prefill_mode"] for r in hf] == ["forward"] * 3
    assert [r["decode_mode"] for r in lean] == ["hf", "lean", "lean"]  # full attention always decodes through transformers
    assert [r["decode_mode"] for r in hf] == ["hf"] * 3
    for a, b in zip(lean, hf):
        assert set(b) <= set(a) and a["decode_ms_per_token"] > 0 and not a["oom"]
        assert a["kv_device_bytes"] == b["kv_device_bytes"] and a["kv_cpu_bytes"] == b["kv_cpu_bytes"]
    assert lean[1]["scanned_fraction"] == hf[1]["scanned_fraction"] == 1.0  # flat index scans the whole store


def test_ratio_lines_use_the_same_run():
    from retrieval_attention.bench.decode import ratio_lines

    recs = [
        dict(context=1024, method="full", index=None, oom=True, gpu_memory_budget="24GB"),
        dict(context=1024, method="full", index=None, oom=False, gpu_memory_budget=None, decode_ms_per_token=80.0,
             kv_device_bytes=1000),
        dict(context=1024, method="offload", index=None, oom=False, gpu_memory_budget="24GB", decode_ms_per_token=400.0),
        dict(context=1024, method="retrieval", index="roar", oom=False, gpu_memory_budget="24GB",
             decode_ms_per_token=40.0, kv_device_bytes=20),
    ]
    (line,) = ratio_lines(recs)
    assert "0.50x the time of full (no budget)" in line and "10.0x faster than offload" in line
    assert "device KV 2.00% of full's" in line
    assert ratio_lines(recs[:1]) == []


def test_host_memory_guard_records_instead_of_crashing(tmp_path, monkeypatch):
    """A method whose CPU-resident KV cannot fit the host's memory is recorded as OOM (host memory), not run."""
    import retrieval_attention.bench.decode as D

    from transformers import LlamaConfig

    cfg = LlamaConfig(**D.SHAPES["llama3-8b"])
    # 128K tokens of an 8B model in bf16: 16 GiB of KV, plus 32 layers x 8 graphs x 24 edges x 4 bytes per token
    assert D.host_bytes_needed(cfg, "offload", 131072, 2) == 16 * 2**30
    assert D.host_bytes_needed(cfg, "retrieval", 131072, 2) == 16 * 2**30 + 32 * 8 * 131072 * 24 * 4
    assert D.host_bytes_needed(cfg, "full", 131072, 2) == D.host_bytes_needed(cfg, "streaming", 131072, 2) == 0
    monkeypatch.setattr(D, "available_host_bytes", lambda: 1 << 20)  # 1 MiB "available"
    js = tmp_path / "d.json"
    rc = main(["bench", "decode", "--shape", "tiny", "--context", "600", "--steps", "2", "--warmup", "1",
               "--methods", "retrieval,streaming", "--index", "flat", "--n-sink", "16", "--window", "64",
               "--json", str(js)])
    assert rc == 0
    ret, stream = json.loads(js.read_text())
    assert ret["oom"] and ret["oom_reason"] == "host memory" and ret["host_bytes_needed"] > 1 << 20
    assert not stream["oom"] and stream["decode_ms_per_token"] > 0  # device-resident KV: not limited


@pytest.mark.parametrize("shape, embedded", [("smollm2", "smollm2"), ("gemma3-270m", "gemma3-270m")])
def test_shape_presets_match_the_embedded_models(shape, embedded):
    """A shape preset has the real model's attention layout: the same config values as the embedded GGUF's."""
    import transformers as tf

    from retrieval_attention.bench.decode import shape_config
    from retrieval_attention.models import ModelNotAvailable, embedded_gguf_path

    try:
        path = embedded_gguf_path(embedded)
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    real = tf.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    preset = shape_config(shape)
    assert preset.model_type == real.model_type
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "sliding_window", "layer_types",
                "query_pre_attn_scalar", "rope_parameters", "tie_word_embeddings"):
        assert getattr(preset, key, None) == getattr(real, key, None), key


def test_bench_decode_gemma3_shape_retrieves_on_global_layers_only(tmp_path):
    """A Gemma-3-shaped model (sliding + global layers): prefill and decode go through the transformers forward;
    the global layers keep exactly sink + window tokens on the device, the sliding layers their own window."""
    js = tmp_path / "g.json"
    rc = main(["bench", "decode", "--shape", "tiny-gemma3", "--context", "600", "--steps", "2", "--warmup", "1",
               "--methods", "full,retrieval,streaming", "--index", "flat", "--n-sink", "16", "--window", "64",
               "--json", str(js)])
    assert rc == 0
    full, ret, stream = json.loads(js.read_text())
    assert ret["prefill_mode"] == "forward" and ret["decode_mode"] == "hf"
    assert ret["kv_cpu_bytes"] > 0 and stream["kv_cpu_bytes"] == 0
    assert ret["kv_device_bytes"] == stream["kv_device_bytes"]
    # per token and layer: 2 KV heads x head_dim 32, keys + values, float32. Each of the 3 decode steps (warm-up +
    # steps) appends its input token: the 2 global layers hold 603 tokens in full's cache, 16 + 64 in retrieval's
    per_token = 2 * 32 * 2 * 4
    assert full["kv_device_bytes"] - ret["kv_device_bytes"] == 2 * (600 + 3 - (16 + 64)) * per_token


def test_bench_decode_refuses_layerwise_prefill_of_unsupported_models(capsys):
    assert main(["bench", "decode", "--shape", "tiny-gemma3", "--context", "600", "--methods", "retrieval",
                 "--prefill", "layerwise"]) == 2
    err = capsys.readouterr().err
    assert "--prefill layerwise" in err and "gemma3_text" in err and "--prefill forward" in err


def test_bench_decode_variants_reuse_the_prefill_and_do_not_accumulate(tmp_path):
    """--variant: one prefill + build, then one record per variant with its own settings and measurements."""
    js = tmp_path / "v.json"
    rc = main(["bench", "decode", "--shape", "tiny", "--context", "2K", "--steps", "3", "--warmup", "1",
               "--methods", "retrieval", "--index", "roar", "--n-sink", "16", "--window", "64", "--ef", "64",
               "--variant", "ef=8,top_k=16", "--variant", "residual_samples=0", "--variant", "residual_on=device",
               "--json", str(js)])
    assert rc == 0
    base, narrow, no_res, dev = json.loads(js.read_text())
    assert [r["variant"] for r in (base, narrow, no_res, dev)] == [None, "ef=8,top_k=16", "residual_samples=0",
                                                                   "residual_on=device"]
    for r in (narrow, no_res, dev):  # the same prefill and index build, decoding on from the previous timing
        assert r["prefill_s"] == base["prefill_s"] and r["index_build_s"] == base["index_build_s"]
        assert r["decode_ms_per_token"] > 0 and not r["oom"]
    assert [r["decode_start"] for r in (narrow, no_res, dev)] == [2048 + 4, 2048 + 8, 2048 + 12]
    assert narrow["search_params"] == {"ef": 8} and narrow["top_k"] == 16
    assert narrow["scanned_fraction"] < base["scanned_fraction"]  # measured over the variant's own steps
    # each variant starts from the run's own settings: ef 64 and top_k 100 are back after the narrow one
    assert no_res["search_params"] == {"ef": 64} and no_res["top_k"] == 100 and no_res["residual_samples"] == 0
    assert dev["residual_samples"] == DEFAULT_RESIDUAL_SAMPLES
    assert base["residual_on"] == "cpu" and dev["residual_on"] == "device" and dev["residual_device_bytes"] > 0
    assert base["decode_compile"] is False and dev["decode_compile"] is False


def test_parse_variant_decode_compile():
    from retrieval_attention.bench.decode import parse_variant

    assert parse_variant("decode_compile=on,ef=96") == {"decode_compile": True, "ef": 96}
    assert parse_variant("decode_compile=0") == {"decode_compile": False}


@pytest.mark.parametrize("bad, msg", [(["--variant", "efx=3"], "unknown key 'efx'"),
                                      (["--variant", "ef=0"], "ef must be >= 1"),
                                      (["--variant", "top_k=many"], "top_k must be an integer"),
                                      (["--variant", "residual_on=gpu"], "residual_on must be one of"),
                                      (["--variant", "decode_compile=maybe"], "decode_compile must be 1 or 0"),
                                      (["--variant", "ef"], "is not KEY=VALUE"),
                                      (["--variant", "ef=8", "--index", "flat"], "has no roar"),
                                      (["--variant", "ef=8", "--methods", "full"], "add retrieval to --methods")])
def test_bench_decode_rejects_bad_variants(bad, msg, capsys):
    args = ["bench", "decode", "--shape", "tiny", "--context", "900", "--methods", "retrieval"]
    if "--methods" in bad:
        args = args[:-2]
    assert main(args + bad) == 2
    assert msg in capsys.readouterr().err

