"""Python garbage-collector pauses inside the decode window of ``bench decode`` (docs/BENCHMARKS.md, session 18):
runs ``retrieval-attention bench decode ARGS`` in process with a ``gc.callbacks`` timer, marks the window from
the first ``LeanDecoder``'s creation to its close, and prints the collections per generation inside it and the
timed steps' median / p90 / max. Needs ``--json FILE`` among the arguments (the steps are read from it).
Usage: ``python docs/bench/scripts/gc_pauses.py --shape smollm2 --context 4K --steps 128 --methods retrieval
--json /tmp/gc.json``."""
import gc
import json
import runpy
import sys
import time

import numpy as np

from retrieval_attention import decode_loop as DL

events, window = [], []
started = [0.0]


def timer(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        events.append((started[0], info["generation"], time.perf_counter() - started[0]))


gc.callbacks.append(timer)
init, close = DL.LeanDecoder.__init__, DL.LeanDecoder.close


def init_marked(self, *a, **k):
    init(self, *a, **k)
    window.append([time.perf_counter(), None])


def close_marked(self):
    if window and window[-1][1] is None:
        window[-1][1] = time.perf_counter()
    close(self)


DL.LeanDecoder.__init__, DL.LeanDecoder.close = init_marked, close_marked
json_path = sys.argv[sys.argv.index("--json") + 1]
sys.argv = ["retrieval-attention", "bench", "decode"] + sys.argv[1:]
try:
    runpy.run_module("retrieval_attention.cli", run_name="__main__")
except SystemExit:
    pass
a, b = window[0]
for g in (0, 1, 2):
    inside = sorted(dt for t, gg, dt in events if gg == g and a <= t <= b)
    every = sorted(dt for t, gg, dt in events if gg == g)
    print(f"gen {g}: {len(inside)} collections in the decode window (max {max(inside, default=0) * 1e3:.1f} ms); "
          f"{len(every)} in the whole run (max {max(every, default=0) * 1e3:.1f} ms)")
steps = np.array(json.load(open(json_path))[0]["decode_ms_steps"])
print(f"timed steps: median {np.median(steps):.1f}, p90 {np.percentile(steps, 90):.1f}, max {steps.max():.1f} ms")
