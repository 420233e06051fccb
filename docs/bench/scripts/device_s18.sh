#!/bin/bash
# Session 18's GPU-host run (docs/BENCHMARKS.md, session 18). Background work (index builds, graph insertions)
# now runs its CUDA work on a stream of its own (threads.background_cuda_stream); before, it shared the legacy
# default stream with the layer-by-layer prefill. In order, on one machine:
#   tests     the new stream test (tests/test_threads.py);
#   d32k      32K at the defaults (it fills inductor's cache: the next runs start with a warm cache, the case
#             where the stock compile backend stalled the first decode steps in session 17);
#   d128k     128K at the defaults (this code): stalled steps? (decode_ms_steps), build and wait;
#   d128k_old the same command with session 17's code (49e0d0a, carried as .carry/old): the build A/B;
#   ref       offload / full for the same-run ratios;
#   tests     (again) the CUDA decode-loop tests;
#   kernels   the build of 2 layers of 128K synthetic keys alone (2,048 training queries per query head = 8,192 per graph, no prefill);
#   d128k_kernel  128K with the projection on the CPU kernels (roar:projection=kernel) against torch on the GPU.
# For the device tool: carry .carry/f (the faiss wheel), .carry/run (this script and device_lib.sh) and .carry/old
# (git archive 49e0d0a retrieval_attention pyproject.toml | tar -x -C .carry/old).
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 -m pytest -q -p no:cacheprovider tests/test_threads.py > $RUN/out/tests.log 2>&1
${B%128K}32K --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d32k.json > $RUN/out/d32k.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
(cd .carry/old && PYTHONPATH=/tmp/site:. $B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k_old.json > $RUN/out/d128k_old.log 2>&1)
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_decode_loop.py -k cuda >> $RUN/out/tests.log 2>&1
python3 -m retrieval_attention.cli bench kernels --keys 128K --shape llama3-8b --ef 128 --steps 8 --train-queries 2048 --layers 2 --threads 16 --json $RUN/out/kernels.json > $RUN/out/kernels.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar:projection=kernel --json $RUN/out/d128k_kernel.json > $RUN/out/d128k_kernel.log 2>&1
EOS
device_poll "${1:-540}" d32k d128k d128k_old ref kernels d128k_kernel
