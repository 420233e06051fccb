#!/bin/bash
# The next GPU-host run (docs/BENCHMARKS.md, session 18, "left undone"): (0) the CUDA tests of session 18's changes
# (the background-stream test's new version, the GPU kNN with group maxima), (1) where a standalone layer build spends
# its 2.4 s (host cProfile and device operators; layer_build_profile.py), (2) the GPU kNN's top-k through group
# maxima (roar.topk_rows) against torch.topk (knn_topk.py), (3) 128K at the defaults (same-run reference for this
# machine; bench decode now also records peak_gpu_reserved_bytes; the pruning in Triton), then with the torch pruning
# (roar:prune=torch, session 18's), with the builds' streams at high priority
# (--build-priority high), and offload/full for the ratios, (4) 512K at the
# defaults (not measured since session 11's 72.2 ms; do the builds on their own streams still fit the budget?); it
# outlives one call: poll again with `bash .carry/run/device_s19_next.sh 540` within 30 s of each return.
# For the device tool: carry .carry/f (the faiss wheel) and .carry/run (this script and device_lib.sh).
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 -m pytest -q -p no:cacheprovider tests/test_threads.py tests/test_decode_kernels.py tests/test_index.py tests/test_prune_triton.py -k "background or priority or knn_cuda or topk_rows or nearest_rows or triton" > $RUN/out/tests.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 > $RUN/out/layer_build.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 prune=torch > $RUN/out/layer_build_tp.log 2>&1
python3 docs/bench/scripts/knn_topk.py 8192 131072 8192 524288 > $RUN/out/knn_topk.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
${B%128K}512K --steps 32 --warmup 2 --methods retrieval --index roar --json $RUN/out/d512k.json > $RUN/out/d512k.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar:prune=torch --json $RUN/out/d128k_tp.json > $RUN/out/d128k_tp.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --build-priority high --json $RUN/out/d128k_hi.json > $RUN/out/d128k_hi.log 2>&1
EOS
device_poll "${1:-540}" layer_build layer_build_tp knn_topk d128k d512k ref d128k_tp d128k_hi
