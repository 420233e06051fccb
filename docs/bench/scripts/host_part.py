"""Host work of the lean decode step per layer outside the search call (docs/BENCHMARKS.md, session 10).

A random-weight model with the Llama-3-8B attention shape (32 query / 8 KV heads, head_dim 128; 4 small layers,
float32, CPU), 8,192 prompt tokens, roar; 200 decode steps; prints the mean time per layer call of
``LeanDecoder._op_cpu_part`` and of its ``CPUStore.attend`` (search + attention + residual), the rest being the
host bookkeeping this session trimmed (evicting the token that leaves the window, copies of the results).
Usage: ``python docs/bench/scripts/host_part.py [threads]``."""
import sys
import time

from retrieval_attention.threads import configure_threads

configure_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from retrieval_attention import cache as C  # noqa: E402
from retrieval_attention.config import RetrievalConfig  # noqa: E402
from retrieval_attention.decode_loop import LeanDecoder  # noqa: E402
from retrieval_attention.integration import make_cache  # noqa: E402
from retrieval_attention.prefill import layerwise_prefill  # noqa: E402

LAYERS, STEPS = 4, 200
torch.manual_seed(0)
cfg = tf.LlamaConfig(hidden_size=1024, intermediate_size=1024, num_hidden_layers=LAYERS, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=1000, max_position_embeddings=1 << 16)
model = tf.LlamaForCausalLM(cfg).eval()
model.set_attn_implementation("sdpa")
cache = make_cache(model, RetrievalConfig(index="roar", exact_below=0, dense_layers=()))
with torch.no_grad():
    logits = layerwise_prefill(model, torch.randint(0, 1000, (1, 8192)), cache)
if hasattr(cache, "wait_for_builds"):  # (builds run in the background only on CUDA)
    cache.wait_for_builds()
spent = {"attend": 0.0, "cpu_part": 0.0}
attend = C.CPUStore.attend


def timed_attend(self, *a, **k):
    t0 = time.perf_counter()
    r = attend(self, *a, **k)
    spent["attend"] += time.perf_counter() - t0
    return r


C.CPUStore.attend = timed_attend
with LeanDecoder(model, cache) as dec:
    tok = logits.argmax(-1, keepdim=True)
    for _ in range(3):  # warm-up
        tok = dec.step(tok).argmax(-1, keepdim=True)
    cpu_part = dec._op_cpu_part

    def timed_cpu_part(i):
        t0 = time.perf_counter()
        cpu_part(i)
        spent["cpu_part"] += time.perf_counter() - t0

    dec._op_cpu_part = timed_cpu_part  # the step's ops look the method up on the instance
    spent["attend"] = 0.0
    for _ in range(STEPS):
        tok = dec.step(tok).argmax(-1, keepdim=True)
calls = STEPS * LAYERS
print(f"per layer call: host part {spent['cpu_part'] / calls * 1e6:.0f} us, of it store.attend "
      f"{spent['attend'] / calls * 1e6:.0f} us, rest {(spent['cpu_part'] - spent['attend']) / calls * 1e6:.0f} us")
