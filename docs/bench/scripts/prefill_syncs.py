"""Where the layer-by-layer prefill waits for the device (CUDA): every synchronising call, by source line.

Runs the prefill of a random-weight Llama-3-8B-shaped model cut to a few layers under
``torch.cuda.set_sync_debug_mode("warn")`` (torch warns at each call that synchronises the host with the device:
blocking copies, ``.item()``, ``nonzero``...) and prints the count per source line, for each hand-off mode. A
synchronisation makes the host wait for the layer's queued work, so the device idles while the host then queues
the next kernels.

    python docs/bench/scripts/prefill_syncs.py [CONTEXT=16384] [LAYERS=4]

The index builds are held until the prefill is done (``build_schedule="after_prefill"``), so the prefill's wall time
compares the hand-off modes alone.
"""

import sys
import time
import warnings
from collections import Counter

import torch

from retrieval_attention.bench.decode import shape_config
from retrieval_attention.config import RetrievalConfig
from retrieval_attention.integration import make_cache
from retrieval_attention.prefill import layerwise_prefill


def main() -> None:
    ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    n_layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    import transformers as tf

    cfg = shape_config("llama3-8b")
    cfg.num_hidden_layers = n_layers
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), device="cuda")
    for handoff in ("sync", "async") * 2:  # the first round warms up (kernels loaded, allocator filled)
        # roar: also compiles numba's build kernels (cached on disk) for the runs after it; the builds wait until the
        # prefill is done, so they do not share the device with it
        cache = make_cache(model, RetrievalConfig(index="roar", dense_layers=(0,), handoff=handoff,
                                                  build_schedule="after_prefill"))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as seen, torch.no_grad():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                layerwise_prefill(model, ids, cache)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        where = Counter(f"{w.filename.split('site-packages/')[-1].split('src/')[-1]}:{w.lineno} "
                        f"{str(w.message).splitlines()[0][:70]}" for w in seen)
        st = cache.stats()
        print(f"\nhandoff={handoff}: prefill {wall:.2f} s, hand-off {st['handoff_s']:.2f} s (waiting "
              f"{st['handoff_wait_s']:.2f} s, landing {st['handoff_land_s']:.2f} s on its thread), "
              f"{len(seen)} synchronising calls")
        for k, n in where.most_common(20):
            print(f"  {n:5d}  {k}")


if __name__ == "__main__":
    main()
